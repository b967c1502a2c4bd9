"""Calibration data for the decoder: image + prompt sequences through the FP32 graphs, and the
inputs of the decoder's Linear MatMuls captured in ONNX Runtime.

The sequences are built like the runtime builds them (Pipeline.image_embeds + splice): a few
deterministic images made in code (the golden image transformed, and some others) with
questions in the v1 template and a short answer, tokenized with the artifacts' tokenizer.json
through `tokenizers`. None of them is the golden prompt: the golden tensors are kept for
evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mvlm_compile import contract
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.manifest import Manifest
from mvlm_compile.model.preprocess import golden_image, load_image, preprocess_image
from mvlm_compile.model.prompt import build_prompt, tokenize_with_image
from mvlm_compile.runtime.ort_backend import OrtBackend, ort_session
from mvlm_compile.runtime.pipeline import Pipeline, prefill_feed
from mvlm_compile.tinytask.dataset import EVAL_SEED, TASK_NAME, TRAIN_SEED

# (question, answer): the answer text makes the calibration see assistant-side positions too.
CALIBRATION_TEXTS = (
    ("What colours can you see in this picture?", "I can see red, green and blue, with a yellow circle."),
    (
        "How many shapes are there, and where are they?",
        "There is one round shape near the top right and stripes at the bottom.",
    ),
    ("Is there any text in the image? Read it.", "No, there is no text in the image."),
    ("Describe the background of the scene.", "The background is a smooth gradient from dark to light."),
    ("What is the main object, and what colour is it?", "The main object is a circle. It is yellow."),
    ("Write a short caption for this photo.", "A colourful abstract pattern with a bright disc."),
)


def _checkerboard() -> Image.Image:
    y, x = np.mgrid[0:320, 0:480]
    board = (((x // 40) + (y // 40)) % 2).astype(np.float32)
    rgb = np.stack([board * 230 + 10, (1 - board) * 200 + 30, 60 + 120 * (x / 479.0)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), mode="RGB")


def _smooth_noise(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
    return Image.fromarray(coarse, mode="RGB").resize((512, 384), Image.Resampling.BICUBIC)


def calibration_images() -> list[tuple[str, Image.Image]]:
    """Deterministic images made in code (never the golden image itself, only transformed)."""
    base = golden_image()
    return [
        ("golden_image mirrored", ImageOps.mirror(base)),
        ("golden_image rotated 90 degrees", base.rotate(90, expand=True)),
        ("golden_image colours inverted", ImageOps.invert(base)),
        (
            "golden_image centre crop 200x150 in greyscale",
            ImageOps.grayscale(base.crop((100, 75, 300, 225))).convert("RGB"),
        ),
        ("checkerboard 480x320", _checkerboard()),
        ("smooth random colours (seed 0)", _smooth_noise(0)),
    ]


@dataclass
class CalibrationSpec:
    """What to calibrate on. `images`: a directory of image files instead of the built-in set;
    `task`: a task model's own train split (images and questions with their answers)."""

    images: Path | None = None
    texts: Sequence[tuple[str, str]] = CALIBRATION_TEXTS
    max_samples: int = 6
    task: str | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task != TASK_NAME:
            raise MvlmError(f"calibration task {self.task!r}: the known task is {TASK_NAME!r}")
        if not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise MvlmError(f"calibration samples {self.max_samples!r}: expected a positive integer")

    def describe(self) -> str:
        if self.task is not None and self.images is None:
            return (
                f"{self.max_samples} sequences, batch 1: the first {self.max_samples} samples of the "
                f"{self.task} task's train split (seed {TRAIN_SEED}: images, the first question and its answer); "
                f"the eval split (seed {EVAL_SEED}) is never used"
            )
        source = (
            f"images from {self.images}"
            if self.images
            else "built-in images made in code (golden image transformed, checkerboard, smooth noise)"
        )
        return (
            f"{self.max_samples} sequences at most, batch 1: {source}, "
            "v1-template questions with short answers (not the golden prompt)"
        )


def spec_for_recipe(recipe) -> CalibrationSpec:
    """The recipe's calibration data (`calibration: {task: shapes, samples: N}`), else the built-in set."""
    if recipe is None or not recipe.calibration:
        return CalibrationSpec()
    settings = dict(recipe.calibration)
    unknown = sorted(set(settings) - {"task", "samples"})
    if unknown:
        raise MvlmError(f"{recipe.path}: unknown calibration keys {unknown} (known: task, samples)")
    return CalibrationSpec(task=settings.get("task"), max_samples=settings.get("samples", 32))


def _task_samples(spec: CalibrationSpec) -> list[tuple[str, Image.Image, str, str]]:
    """(name, image, question, answer) of the task's train split."""
    from mvlm_compile.tinytask.dataset import calibration_samples
    from mvlm_compile.tinytask.scenes import draw_scene

    return [
        (f"train sample {i}", draw_scene(sample.scene), sample.turns[0].question, sample.turns[0].answer)
        for i, sample in enumerate(calibration_samples(spec.max_samples))
    ]


def _image_samples(spec: CalibrationSpec) -> list[tuple[str, Image.Image, str, str]]:
    """(name, image, question, answer): the images (a directory's, or built in) with the texts in turn."""
    if spec.images is not None:
        files = sorted(
            p for p in Path(spec.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp")
        )
        if not files:
            raise MvlmError(f"--calib-images {spec.images}: no image files (.png, .jpg, .jpeg, .bmp, .webp)")
        # Sample i takes image i modulo their number: only the first `count` files are ever used,
        # and only they are decoded (a folder of thousands is not read into memory).
        count = min(spec.max_samples, max(len(files), len(spec.texts)))
        images = [(p.name, load_image(p)) for p in files[:count]]
    else:
        images = calibration_images()
    count = min(spec.max_samples, max(len(images), len(spec.texts)))
    return [(*images[i % len(images)], *spec.texts[i % len(spec.texts)]) for i in range(count)]


@dataclass
class Calibration:
    captures: dict[str, np.ndarray]  # tensor name -> [tokens, features] float32 (all sequences concatenated)
    tokens: int
    sequences: list[dict] = field(default_factory=list)  # per sequence: image, question, length


def _tokenizer_encode(artifacts: Path, manifest: Manifest) -> Callable[[str], list[int]]:
    from tokenizers import Tokenizer

    path = manifest.file_path(artifacts, "tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise ArtifactError(f"{path}: cannot load the tokenizer ({e})") from None
    return lambda text: tokenizer.encode(text).ids


def calibration_sequences(
    artifacts: Path, manifest: Manifest, spec: CalibrationSpec, progress=lambda m: None
) -> tuple[list[np.ndarray], list[dict]]:
    """inputs_embeds [1, seq, hidden] per calibration sample, through the FP32/FP16 vision and projector graphs."""
    samples = _task_samples(spec) if spec.task is not None and spec.images is None else _image_samples(spec)
    # Only vision and projector sessions open here: the decoder (5.6 GB at 1.7B FP32) is run
    # by collect() with its Linear inputs exposed.
    encode = _tokenizer_encode(artifacts, manifest)
    bos = int(manifest.model["bos_token_id"])
    embeds, described = [], []
    with OrtBackend(artifacts, manifest) as backend:
        pipeline = Pipeline(backend)
        for i, (name, image, question, answer) in enumerate(samples):
            progress(f"calibration sequence {i + 1}/{len(samples)}: {name}")
            ids = tokenize_with_image(f"{build_prompt(question)} {answer}", encode, bos)
            image_embeds = pipeline.image_embeds(preprocess_image(image))
            sequence = pipeline.splice(ids, image_embeds)
            embeds.append(np.asarray(sequence, np.float32))
            described.append({"image": name, "question": question, "tokens": int(sequence.shape[1])})
    return embeds, described


def collect(
    artifacts: Path,
    manifest: Manifest,
    tensors: Sequence[str],
    spec: CalibrationSpec,
    progress=lambda m: None,
) -> Calibration:
    """Run the (unquantized) decoder on the calibration sequences, capturing `tensors`."""
    embeds, described = calibration_sequences(artifacts, manifest, spec, progress)
    progress("decoder: capturing the Linear inputs")
    session = ort_session(manifest.graph_path(artifacts, "decoder"), extra_outputs=tensors)
    dtype = manifest.input_dtype("decoder", contract.DECODER_EMBEDS)
    kv_dtype = manifest.input_dtype("decoder", contract.past_names(0)[0])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for sequence in embeds:
        values = session.run(list(tensors), prefill_feed(manifest.model, sequence.astype(dtype), kv_dtype))
        for name, value in zip(tensors, values):
            parts[name].append(np.asarray(value, np.float32).reshape(-1, value.shape[-1]))
    del session
    captures = {name: np.concatenate(parts.pop(name)) for name in list(parts)}  # one tensor's copy at a time
    return Calibration(captures, int(sum(e.shape[1] for e in embeds)), described)
