"""The train and eval splits of the shapes task, deterministic from fixed seeds (no torch).

Train: an endless stream of scenes (index -> scene), each with question/answer turns in training
phrasings (the count, the description, and the shape, colour and position of every shape),
never showing a held-out combination: five colour+shape pairs and two shape+position pairs.
Eval: a fixed list of single questions drawn from another seed; the kinds of question take
turns, every other group of five items shows a held-out combination (and asks about that
shape), and the phrasings include those kept out of training. Calibration data for
quantization comes from the train split (`calibration_samples`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from mvlm_compile.tinytask.questions import KINDS, QA, TEMPLATES, make_qa
from mvlm_compile.tinytask.scenes import Scene, sample_scene

TASK_NAME = "shapes"
TASK_VERSION = 1
TRAIN_SEED = 14_001
EVAL_SEED = 14_002
EXAMPLE_SEED = 14_004
# Combinations never drawn in the train split.
HELD_OUT_COLOUR_SHAPE = frozenset(
    {("red", "star"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "diamond")}
)
HELD_OUT_SHAPE_SLOT = frozenset({("triangle", "left"), ("star", "bottom")})
EVAL_ITEMS = 200
# The example of the demo and of the golden set: fixed shapes (kind, colour, slot); jitter and
# background from EXAMPLE_SEED. None of its pairs is held out.
EXAMPLE_LAYOUT = (("star", "yellow", "top"), ("circle", "red", "left"), ("square", "blue", "right"))
EXAMPLE_QUESTION = "Describe the image in one sentence."


def held_out_shapes(scene: Scene) -> list[str]:
    """Kinds of the scene's shapes that show a held-out combination."""
    return [
        s.kind
        for s in scene.shapes
        if (s.colour, s.kind) in HELD_OUT_COLOUR_SHAPE or (s.kind, s.slot) in HELD_OUT_SHAPE_SLOT
    ]


def _scene_where(seed: tuple[int, ...], held_out: bool) -> Scene:
    """The first scene drawn from (seed..., attempt) that shows (or does not show) a held-out combination."""
    attempt = 0
    while True:
        scene = sample_scene((*seed, attempt))
        if bool(held_out_shapes(scene)) == held_out:
            return scene
        attempt += 1


@dataclass(frozen=True)
class TrainSample:
    scene: Scene
    turns: tuple[QA, ...]


def train_sample(index: int, seed: int = TRAIN_SEED) -> TrainSample:
    """Scene `index` of the train split and its question/answer turns."""
    scene = _scene_where((seed, index), held_out=False)
    rng = np.random.default_rng([seed, index, 0x0A])
    # The count, the description, and the shape, colour and position of every shape, in random
    # order: the first turn is the runtime's prompt; the others make each image's 144 tokens (the
    # costly part of a step) pay for more answers, most of them about finding one named shape.
    asks = [("count", None), ("describe", None)] + [
        (kind, shape) for shape in scene.shapes for kind in ("shape", "colour", "position")
    ]
    turns = tuple(make_qa(rng, scene, *asks[int(i)]) for i in rng.permutation(len(asks)))
    return TrainSample(scene, turns)


def train_stream(start: int = 0, seed: int = TRAIN_SEED) -> Iterator[TrainSample]:
    index = start
    while True:
        yield train_sample(index, seed)
        index += 1


def calibration_samples(count: int) -> list[TrainSample]:
    """Quantization calibration data: the first `count` samples of the train split (never the eval split)."""
    return [train_sample(i) for i in range(count)]


@dataclass(frozen=True)
class EvalItem:
    index: int
    seed: list[int]  # the scene's seed: sample_scene(seed) redraws it
    kind: str
    question: str
    answer: str
    held_out_combination: bool
    held_out_phrasing: bool

    def scene(self) -> Scene:
        return sample_scene(tuple(self.seed))

    def to_json(self) -> dict:
        return asdict(self)


def eval_item(index: int) -> EvalItem:
    kind = KINDS[index % len(KINDS)]
    held_out = (index // len(KINDS)) % 2 == 0
    scene = _scene_where((EVAL_SEED, index), held_out)
    rng = np.random.default_rng([EVAL_SEED, index, 0x0A])
    # A held-out item asks about the shape that shows the held-out combination.
    target = scene.by_kind(held_out_shapes(scene)[0]) if held_out else None
    qa = make_qa(rng, scene, kind, target=target, train=False)
    return EvalItem(index, list(scene.seed), kind, qa.question, qa.answer, held_out, not TEMPLATES[qa.template].train)


def eval_items(count: int = EVAL_ITEMS) -> list[EvalItem]:
    return [eval_item(i) for i in range(count)]


def example_scene() -> Scene:
    return sample_scene((EXAMPLE_SEED,), layout=EXAMPLE_LAYOUT)
