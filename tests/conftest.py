"""Shared fixtures: synthetic tiny checkpoints in both published vision-weight layouts (these
need torch), and the committed tiny bundle (tests/data/tiny-bundle, which needs nothing: it is
what the TensorRT tests build from, on a Jetson too)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN_TINY = REPO / "golden" / "tiny"
# The seed-0 tiny model after export, optimize and quantize (`make tiny-bundle`; its golden
# tensors are GOLDEN_TINY). tests/test_build_pipeline.py checks it is what the code makes now.
TINY_BUNDLE = REPO / "tests" / "data" / "tiny-bundle"
SHAPES_MODEL = REPO / "models" / "tiny-shapes"  # the committed model that answers (make tiny-model)
GOLDEN_SHAPES = REPO / "golden" / "tiny-shapes"


def copy_tiny_bundle(destination: Path) -> Path:
    """A writable copy of the committed tiny bundle (builds write into the bundle)."""
    import shutil

    return Path(shutil.copytree(TINY_BUNDLE, destination))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Vision weights inside the checkpoint (model.vision_tower.vision_tower.vision_model.*)."""
    from mvlm_compile.model.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "checkpoint", seed=0)


@pytest.fixture(scope="session")
def tiny_separate(tmp_path_factory) -> tuple[Path, Path]:
    """Vision weights in a separate CLIP checkpoint directory: (checkpoint, clip_dir)."""
    from mvlm_compile.model.synth import write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("tiny_separate")
    write_synthetic_checkpoint("tiny", root / "checkpoint", seed=0, clip_out=root / "clip")
    return root / "checkpoint", root / "clip"


@pytest.fixture(scope="session")
def tiny_golden(tiny_checkpoint, tmp_path_factory) -> Path:
    """Golden tensors computed in this test session from the seed-0 tiny checkpoint."""
    from mvlm_compile.model.golden import write_golden

    out = tmp_path_factory.mktemp("golden") / "tiny"
    write_golden(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint, tmp_path_factory) -> Path:
    """FP32 export of the seed-0 tiny checkpoint."""
    from mvlm_compile.export.exporter import export_artifacts

    out = tmp_path_factory.mktemp("artifacts") / "fp32"
    export_artifacts(tiny_checkpoint, out, dtype="fp32")
    return out


def save_graph_by_hand(model, artifacts: Path, name: str) -> None:
    """Replace graph `name` of an artifacts directory with `model` and record its new content in
    manifest.json, as a stage does (stages refuse a graph whose content the manifest does not describe)."""
    from mvlm_compile.manifest import load_manifest
    from mvlm_compile.onnx_io import save_model

    manifest = load_manifest(artifacts)
    entry = manifest.graphs[name]
    save_model(model, manifest.graph_path(artifacts, name))
    manifest.record_graph(artifacts, name, entry["file"], entry["dtype"], entry["inputs"], entry["outputs"])
    manifest.save(artifacts)


@pytest.fixture(scope="session")
def shapes_fp32(tmp_path_factory) -> Path:
    """FP32 export of the committed shapes model."""
    from mvlm_compile.export.exporter import export_artifacts

    out = tmp_path_factory.mktemp("shapes") / "fp32"
    export_artifacts(SHAPES_MODEL, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def shapes_fp16(tmp_path_factory) -> Path:
    """FP16 export of the committed shapes model, optimized: what `build` quantizes."""
    from mvlm_compile.export.exporter import export_artifacts
    from mvlm_compile.manifest import keep_reference
    from mvlm_compile.surgery import optimize_artifacts

    out = tmp_path_factory.mktemp("shapes") / "fp16"
    export_artifacts(SHAPES_MODEL, out, dtype="fp16")
    keep_reference(out)
    optimize_artifacts(out)
    return out


@pytest.fixture(scope="session")
def shapes_int4(shapes_fp16, tmp_path_factory) -> Path:
    """The deployed form: INT4 decoder and FP16 vision/projector with the recipe's settings
    (AWQ, group 32, calibrated on the task's train split)."""
    from mvlm_compile.quantize import quantize_artifacts

    out = tmp_path_factory.mktemp("shapes") / "int4-awq"
    quantize_artifacts(shapes_fp16, out=out)
    return out


def cli_argv_without_torch(args: list[str]) -> list[str]:
    """argv for the CLI in a subprocess where importing torch or transformers fails, as on a JetPack
    without them: the target side (build from a bundle, verify, eval, run, serve) must not need them."""
    import sys

    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'{name} is not installed on this Jetson')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mvlm_compile.cli import main\n"
        "main()\n"
    )
    return [sys.executable, "-c", blocker, *args]


def run_cli_without_torch(args: list[str]):
    """Run the CLI to completion without torch and transformers (cli_argv_without_torch)."""
    import subprocess

    return subprocess.run(cli_argv_without_torch(args), capture_output=True, text=True)


QUESTION = "Describe the image in one sentence."  # golden/tiny-shapes/generation.json's question


def shapes_reference_answer() -> tuple[str, int]:
    """(text, tokens) of the FP32 PyTorch reference's answer to QUESTION about the golden image:
    golden/tiny-shapes/generation.json's greedy tokens up to EOS, decoded with the model's tokenizer."""
    import json

    from tokenizers import Tokenizer

    generation = json.loads((GOLDEN_SHAPES / "generation.json").read_text())
    assert QUESTION in generation["prompt"]
    tokens = generation["generated_ids"]
    answer = tokens[: tokens.index(2)]  # EOS
    tokenizer = Tokenizer.from_file(str(SHAPES_MODEL / "tokenizer.json"))
    return tokenizer.decode(answer), len(answer)
