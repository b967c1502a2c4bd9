"""Read golden directories (Polygraphy JSON) without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mvlm_compile.errors import ArtifactError
from mvlm_compile.fileio import read_json_object
from mvlm_compile.model.prompt import IMAGE_TOKEN_INDEX


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
        feed = dict(load_json(str(inputs_path))[0])
        outputs = {name: np.asarray(value) for name, value in RunResults.load(str(outputs_path))[0][1][0].items()}
    except Exception as e:  # Polygraphy raises several types for malformed files
        raise ArtifactError(
            f"{outputs_path.parent}: cannot read golden {component!r} ({type(e).__name__}: {e})"
        ) from None
    for name, value in {**feed, **outputs}.items():
        if not isinstance(value, np.ndarray):
            raise ArtifactError(f"{outputs_path.parent}: golden {component!r} tensor {name!r} is not an array")
    return feed, outputs


def load_generation(golden_dir: Path) -> dict:
    """generation.json: the prompt's ids (the image token once) and the golden greedy tokens (at least one)."""
    path = Path(golden_dir) / "generation.json"
    data = read_json_object(path, "golden greedy generation", required=("input_ids", "generated_ids"))
    for key in ("input_ids", "generated_ids"):
        ids = data[key]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ArtifactError(f"{path}: corrupt, {key!r} must be a non-empty list of token ids")
    if data["input_ids"].count(IMAGE_TOKEN_INDEX) != 1:
        raise ArtifactError(f"{path}: corrupt, 'input_ids' must hold the image token {IMAGE_TOKEN_INDEX} exactly once")
    return data
