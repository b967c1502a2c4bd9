"""Activation-aware INT4 (AWQ): per-input-channel scales and weight clipping, searched on
captured calibration activations (numpy only).

Scale search (AWQ, Lin et al. 2023): for the Linears sharing one input X [T, K] (q/k/v,
gate/up, o, down), s = mean|X|^alpha (normalised by sqrt(max s * min s)), alpha on a grid
in [0, 1]; the loss is the output error of the quantized MatMul on the calibration tokens,
|| X W - (X / s) Q(s W) ||^2 summed over the group's Linears. alpha = 0 is plain
round-to-nearest, so the chosen scales never do worse than RTN on the calibration loss.

Clip search (AWQ's auto_clip): per group of `group_size` input rows and output column,
shrink amax by a ratio in [1 - max_shrink, 1] minimising that block's contribution to the
output error, dW_g^T (X_g^T X_g) dW_g, on all calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mvlm_compile.quantize.int4 import INT4_MAX, INT4_MIN, group_amax, scales_from_amax


@dataclass
class ScaleSearch:
    scales: np.ndarray  # [K]: weight rows are multiplied by s, the input divided by s
    alpha: float
    loss_rtn: float  # output error of RTN relative to the output's mean square
    loss: float  # the same with the chosen scales


def subsample(x: np.ndarray, max_tokens: int) -> np.ndarray:
    """Evenly spaced rows (deterministic)."""
    if x.shape[0] <= max_tokens:
        return x
    return x[np.linspace(0, x.shape[0] - 1, max_tokens).round().astype(np.int64)]


def _fake_quantize(w: np.ndarray, group: int, scale_dtype, ratio: np.ndarray | float = 1.0) -> np.ndarray:
    k, n = w.shape
    scale = scales_from_amax(group_amax(w, group) * ratio, np.dtype(scale_dtype)).astype(np.float32)
    blocks = w.reshape(k // group, group, n) / scale[:, None, :]
    np.rint(blocks, out=blocks)
    np.clip(blocks, INT4_MIN, INT4_MAX, out=blocks)
    blocks *= scale[:, None, :]
    return blocks.reshape(k, n)


def awq_scales(x_mean: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(x_mean.astype(np.float64), 1e-4), alpha)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def search_scales(
    x: np.ndarray, weights: list[np.ndarray], group: int, scale_dtype=np.float32, grid: int = 20, max_tokens: int = 512
) -> ScaleSearch:
    """The best AWQ input-channel scales for the Linears in `weights` ([K, N_i]) sharing input x [T, K]."""
    x_mean = np.abs(x).mean(axis=0)  # statistics from every calibration token
    xs = np.ascontiguousarray(subsample(x, max_tokens), dtype=np.float32)
    w = np.concatenate(weights, axis=1).astype(np.float32)
    reference = xs @ w
    norm = float(np.mean(np.square(reference))) or 1.0
    best: ScaleSearch | None = None
    for i in range(grid + 1):
        alpha = i / grid
        s = awq_scales(x_mean, alpha)
        quantized = _fake_quantize(w * s[:, None], group, scale_dtype) / s[:, None]
        error = xs @ quantized
        error -= reference
        loss = float(np.mean(np.square(error))) / norm
        if i == 0:
            loss_rtn = loss
        if best is None or loss < best.loss:
            best = ScaleSearch(s, alpha, loss_rtn, loss)
    assert best is not None
    return best


def block_hessians(x: np.ndarray, group: int) -> np.ndarray:
    """X_g^T X_g / T per group of input channels: [K / group, group, group]."""
    t, k = x.shape
    xg = x.reshape(t, k // group, group).transpose(1, 0, 2).astype(np.float32)
    return np.matmul(xg.transpose(0, 2, 1), xg) / max(t, 1)


def search_clip(
    x: np.ndarray, w: np.ndarray, group: int, scale_dtype=np.float32, grid: int = 20, max_shrink: float = 0.5
) -> tuple[np.ndarray, float, float]:
    """Per (group, column) amax shrink ratios [K / group, N] and the relative block error before/after."""
    k, n = w.shape
    hessians = block_hessians(x, group)
    wg = w.reshape(k // group, group, n).astype(np.float32)
    best_err = None
    best_ratio = np.ones((k // group, n), np.float32)
    first = None
    for i in range(int(grid * max_shrink) + 1):
        ratio = 1.0 - i / grid
        dw = _fake_quantize(w, group, scale_dtype, ratio).reshape(wg.shape) - wg
        err = np.einsum("gan,gan->gn", np.matmul(hessians, dw), dw)
        if best_err is None:
            best_err, first = err, err.sum()
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio[better] = ratio
    reference = float(np.einsum("gan,gan->", np.matmul(hessians, wg), wg)) or 1.0
    return best_ratio, float(first) / reference, float(best_err.sum()) / reference
