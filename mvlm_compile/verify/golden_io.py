"""Read golden directories (Polygraphy JSON) without torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mvlm_compile.errors import ArtifactError


def load_component(golden_dir: Path, component: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feed dict, expected outputs) of one golden component."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    inputs_path = Path(golden_dir) / f"{component}.inputs.json"
    outputs_path = Path(golden_dir) / f"{component}.outputs.json"
    for path in (inputs_path, outputs_path):
        if not path.exists():
            raise ArtifactError(f"{path}: missing golden file for component {component!r}")
    try:
        feed = load_json(str(inputs_path))[0]
        iterations = RunResults.load(str(outputs_path))[0][1]
    except Exception as e:  # Polygraphy raises several types for malformed files
        raise ArtifactError(
            f"{outputs_path.parent}: cannot read golden {component!r} ({type(e).__name__}: {e})"
        ) from None
    return dict(feed), {name: np.asarray(value) for name, value in iterations[0].items()}


def load_generation(golden_dir: Path) -> dict:
    path = Path(golden_dir) / "generation.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (golden greedy generation)") from None
