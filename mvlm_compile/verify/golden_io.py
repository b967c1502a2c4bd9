"""Read golden directories (Polygraphy JSON) without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mvlm_compile.engines_record import TokenLimits
from mvlm_compile.errors import ArtifactError
from mvlm_compile.fileio import check_regular_file, read_json_object
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
        check_regular_file(path, f"golden file for component {component!r}")  # a FIFO would block
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


def _shape_text(shape: tuple | list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_golden_fits_graph(
    golden_dir: Path, component: str, feed: dict[str, np.ndarray], graph: str, declared: dict
) -> None:
    """The golden inputs are what the graph takes (`declared`: its manifest entry): every input,
    its rank and its fixed sizes. A golden set of another model is an input error before any run."""
    path = Path(golden_dir) / f"{component}.inputs.json"
    for item in declared["inputs"]:
        name, shape = item["name"], item.get("shape")
        if name not in feed:
            raise ArtifactError(
                f"{path}: no tensor {name!r}, an input of graph {graph} (a golden set of another model?)"
            )
        if shape is None:
            continue
        got = feed[name].shape
        if len(got) != len(shape) or any(isinstance(d, int) and d != g for d, g in zip(shape, got)):
            raise ArtifactError(
                f"{path}: {name} is {_shape_text(got)}, graph {graph} takes {_shape_text(shape)} "
                "(a golden set of another model?)"
            )


def check_golden_outputs(golden_dir: Path, component: str, expected: dict, got: dict, graph: str) -> None:
    """Every golden output came back from the graph at the golden shape."""
    path = Path(golden_dir) / f"{component}.outputs.json"
    for name, value in expected.items():
        if name not in got:
            raise ArtifactError(f"{path}: {name!r} is not an output of graph {graph} (a golden set of another model?)")
        if got[name].shape != value.shape:
            raise ArtifactError(
                f"{path}: {name} is {_shape_text(value.shape)}, graph {graph} gives {_shape_text(got[name].shape)} "
                "(a golden set of another model?)"
            )


def check_generation_fits(golden_dir: Path, generation: dict, model: dict, limits: TokenLimits) -> None:
    """generation.json's ids are tokens of this model and its prompt + golden tokens fit the
    backend's limits: a usage error, not a failed run."""
    path = Path(golden_dir) / "generation.json"
    vocab, image = int(model["vocab_size"]), int(model["image_token_index"])
    for key in ("input_ids", "generated_ids"):
        outside = [i for i in generation[key] if not 0 <= i < vocab and not (key == "input_ids" and i == image)]
        if outside:
            raise ArtifactError(
                f"{path}: {key} holds {outside[0]}, outside this model's vocabulary of {vocab} "
                "(a golden set of another model?)"
            )
    prompt_tokens = len(generation["input_ids"]) - 1 + int(model["image_tokens"])
    limits.check(prompt_tokens, len(generation["generated_ids"]), f"{path}: input_ids", "generated_ids")
