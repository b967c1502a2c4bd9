"""Error metrics between an output and its golden tensor."""

from __future__ import annotations

import numpy as np


def greedy_agreement(tokens: list[int], golden: list[int]) -> dict[str, int]:
    """How far `tokens` follow the golden greedy tokens: matching prefix and matching positions."""
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, golden)) if a != b), min(len(tokens), len(golden)))
    return {"prefix": prefix, "matching": sum(a == b for a, b in zip(tokens, golden)), "total": len(golden)}


def compare(got: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """max/mean abs error, max error relative to the golden tensor's scale (max |x|), cosine."""
    if got.shape != expected.shape:
        raise ValueError(f"shape {list(got.shape)} differs from the golden {list(expected.shape)}")
    a = got.astype(np.float64).ravel()
    b = expected.astype(np.float64).ravel()
    if a.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "rel_to_scale": 0.0, "cosine": 1.0}
    diff = np.abs(a - b)
    scale = float(np.abs(b).max()) or 1.0
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / norms) if norms else float(np.array_equal(a, b))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "rel_to_scale": float(diff.max() / scale),
        "cosine": cosine,
    }
