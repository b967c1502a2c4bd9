"""The shapes task's data: deterministic, splits as promised, and every answer true of the image.

Answers are checked against the pixels (colour under the shape, where its pixels are, how many
saturated blobs there are), not against the code that wrote them.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mvlm_compile.tinytask import dataset
from mvlm_compile.tinytask.questions import TEMPLATES
from mvlm_compile.tinytask.scenes import COLOURS, IMAGE_SIZE, draw_scene, sample_scene

# The colour words and their sRGB anchors, as a person would name them (not the generator's table).
NAMED = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.65, 0.2),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.8, 0.1),
    "purple": (0.55, 0.2, 0.7),
    "orange": (0.95, 0.5, 0.1),
}


def _saturated(image: Image.Image) -> np.ndarray:
    """Pixels a person calls coloured: max - min channel above 0.3 (backgrounds and bars are near grey)."""
    rgb = np.asarray(image, np.float32) / 255
    return rgb.max(-1) - rgb.min(-1) > 0.3


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (iterative flood fill), each as an array of (y, x)."""
    seen = np.zeros_like(mask)
    blobs = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, points = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(points) > 150:  # a shape is a few thousand pixels; bar crossings cut off only slivers
            blobs.append(np.asarray(points))
    return blobs


def _colour_name(rgb: np.ndarray) -> str:
    return min(NAMED, key=lambda n: float(np.sum((np.asarray(NAMED[n]) - rgb) ** 2)))


def _where(centroid_yx: np.ndarray) -> str:
    y, x = centroid_yx - IMAGE_SIZE / 2
    if abs(x) > abs(y):
        return "on the left" if x < 0 else "on the right"
    return "at the top" if y < 0 else "at the bottom"


def _blob_facts(image: Image.Image) -> list[tuple[str, str]]:
    """(colour name, where) of every coloured blob, merged per colour (a bar may cut a shape in two)."""
    rgb = np.asarray(image, np.float32) / 255
    by_colour: dict[str, list[np.ndarray]] = {}
    for blob in _blobs(_saturated(image)):
        colour = _colour_name(np.median(rgb[blob[:, 0], blob[:, 1]], axis=0))
        by_colour.setdefault(colour, []).append(blob)
    return [(c, _where(np.concatenate(b).mean(0))) for c, b in by_colour.items()]


def test_same_seed_same_image_and_different_seeds_differ():
    first = np.asarray(draw_scene(dataset.train_sample(3).scene))
    again = np.asarray(draw_scene(dataset.train_sample(3).scene))
    other = np.asarray(draw_scene(dataset.train_sample(4).scene))
    assert first.shape == (336, 336, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert dataset.eval_items(7) == dataset.eval_items(7)


@pytest.mark.parametrize("index", range(0, 60, 3))
def test_eval_answers_are_true_of_the_pixels(index):
    item = dataset.eval_item(index)
    facts = _blob_facts(draw_scene(item.scene()))
    scene = item.scene()
    assert len(facts) == len(scene.shapes)
    if item.kind == "count":
        assert item.answer == ["One.", "Two.", "Three."][len(facts) - 1]
    elif item.kind == "colour":
        target = scene.by_kind(_asked_kind(item))
        (colour,) = [c for c, where in facts if where == _place(target.slot)]
        assert item.answer == f"{colour.capitalize()}."
    elif item.kind == "position":
        (where,) = [w for c, w in facts if c == scene.by_kind(_asked_kind(item)).colour]
        assert item.answer == f"{where[0].upper()}{where[1:]}."
    elif item.kind == "describe":
        for colour, where in facts:
            assert f"{colour} " in item.answer.lower() and where in item.answer.lower()


def _asked_kind(item) -> str:
    """The shape a question is about, read from its words and the scene (kind, colour or place named)."""
    scene, text = item.scene(), item.question.lower()
    for shape in scene.shapes:
        if shape.kind in text or f" {shape.colour} " in f" {text} " or _place(shape.slot) in text:
            return shape.kind
    assert len(scene.shapes) == 1, item
    return scene.shapes[0].kind


def _place(slot: str) -> str:
    return {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}[slot]


def test_train_split_never_shows_a_held_out_combination_or_phrasing():
    held_out_texts = {t.text for t in TEMPLATES if not t.train}
    assert held_out_texts and all(t.train for t in TEMPLATES if t.text not in held_out_texts)
    for index in range(400):
        sample = dataset.train_sample(index)
        for shape in sample.scene.shapes:
            assert (shape.colour, shape.kind) not in dataset.HELD_OUT_COLOUR_SHAPE
            assert (shape.kind, shape.slot) not in dataset.HELD_OUT_SHAPE_SLOT
        assert all(TEMPLATES[turn.template].train for turn in sample.turns)
        assert sorted(t.kind for t in sample.turns) == sorted(
            ["count", "describe"] + ["shape", "colour", "position"] * len(sample.scene.shapes)
        )


def test_eval_split_holds_out_combinations_and_phrasings():
    items = dataset.eval_items()
    assert len(items) == dataset.EVAL_ITEMS
    held = [i for i in items if i.held_out_combination]
    assert len(held) == len(items) // 2
    for item in held:
        shapes = item.scene().shapes
        assert any(
            (s.colour, s.kind) in dataset.HELD_OUT_COLOUR_SHAPE or (s.kind, s.slot) in dataset.HELD_OUT_SHAPE_SLOT
            for s in shapes
        )
    for item in items:
        if not item.held_out_combination:
            assert all((s.colour, s.kind) not in dataset.HELD_OUT_COLOUR_SHAPE for s in item.scene().shapes)
    # Every kind, both spellings of colour, and unseen phrasings are asked.
    assert {i.kind for i in items} == {"shape", "colour", "count", "position", "describe"}
    questions = " ".join(i.question.lower() for i in items)
    assert "colour" in questions and "color" in questions
    assert 0.1 < sum(i.held_out_phrasing for i in items) / len(items) < 0.5
    # Eval scenes are not train scenes (other seeds).
    train_images = {draw_scene(dataset.train_sample(i).scene).tobytes() for i in range(20)}
    assert not any(draw_scene(i.scene()).tobytes() in train_images for i in items[:20])


def test_example_scene_is_the_documented_one():
    scene = dataset.example_scene()
    facts = sorted(_blob_facts(draw_scene(scene)))
    assert facts == [("blue", "on the right"), ("red", "on the left"), ("yellow", "at the top")]
    assert {s.kind for s in scene.shapes} == {"star", "circle", "square"}


def test_colours_are_far_apart_and_shapes_never_overlap():
    names = list(COLOURS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(np.subtract(COLOURS[a], COLOURS[b])).max() > 2 * 16 + 20, (a, b)
    for index in range(200):
        scene = sample_scene((dataset.TRAIN_SEED, index, 0))
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1 :]:
                distance = np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1])
                assert distance > 1.25 * (a.radius + b.radius)
