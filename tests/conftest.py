"""Shared fixtures: synthetic tiny checkpoints in both published vision-weight layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN_TINY = REPO / "golden" / "tiny"


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


def load_component(golden_dir: Path, component: str):
    """(feed dict, outputs dict) of one golden component, read with Polygraphy."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    feed = load_json(str(golden_dir / f"{component}.inputs.json"))[0]
    runner, iterations = RunResults.load(str(golden_dir / f"{component}.outputs.json"))[0]
    return feed, dict(iterations[0])
