"""Symmetric blocked INT4 weights and their ONNX form (DequantizeLinear, axis 0, block_size).

Choice of range: a group's scale is amax / 7 (amax = max |w| of the group, optionally shrunk by
a clipping ratio found by search) and codes are round(w / scale) clipped to [-8, 7]. Without
clipping, -8 is never produced (a symmetric [-7, 7] grid, error at most scale / 2 per weight);
with clipping the outermost weights saturate to -8 or 7. This is ModelOpt's INT4 convention
too (amax / 7), and it needs no zero point, as TensorRT requires.

ONNX INT4 storage (TensorProto.INT4): two values per byte, the first in the low nibble,
row-major; onnx's numpy_helper reads it back as ml_dtypes.int4.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

INT4_MIN, INT4_MAX = -8, 7
INT8_MAX = 127
_SCALE_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def group_amax(w: np.ndarray, group: int) -> np.ndarray:
    """max |w| per group of `group` rows (input dimension K) and column: [K / group, N]."""
    k, n = w.shape
    if k % group:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {group}")
    return np.abs(w.reshape(k // group, group, n)).max(axis=1)


def scales_from_amax(amax: np.ndarray, scale_dtype: np.dtype, code_max: int = INT4_MAX) -> np.ndarray:
    """amax / code_max (7 for INT4) rounded to the stored type (what DequantizeLinear will multiply
    by), never zero: TensorRT wants positive scales; an all-zero group keeps code 0 whatever the scale."""
    scale = (amax / code_max).astype(scale_dtype)
    tiny = np.finfo(scale_dtype).tiny
    return np.where(scale > 0, scale, np.asarray(max(tiny, 1e-30), scale_dtype)).astype(scale_dtype)


def quantize(w: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """int8 codes in [-8, 7] of w [K, N] with scale [K / group, N]."""
    k, n = w.shape
    s = scale.astype(np.float32)[:, None, :]
    q = np.rint(w.reshape(k // group, group, n) / s)
    return np.clip(q, INT4_MIN, INT4_MAX).astype(np.int8).reshape(k, n)


def dequantize(q: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    k, n = q.shape
    return (q.reshape(k // group, group, n).astype(np.float32) * scale.astype(np.float32)[:, None, :]).reshape(k, n)


def quantize_weight(
    w: np.ndarray, group: int, scale_dtype=np.float32, clip: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [K, N], scale [K / group, N] of scale_dtype). `clip` [K / group, N] in (0, 1] shrinks amax."""
    amax = group_amax(np.asarray(w, np.float32), group)
    if clip is not None:
        amax = amax * clip
    scale = scales_from_amax(amax, np.dtype(scale_dtype))
    return quantize(np.asarray(w, np.float32), scale, group), scale


def fake_quantize(w: np.ndarray, group: int, scale_dtype=np.float32, clip: np.ndarray | None = None) -> np.ndarray:
    """dequantize(quantize(w)): the weights the INT4 graph computes with."""
    q, scale = quantize_weight(w, group, scale_dtype, clip)
    return dequantize(q, scale, group)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: row-major, two codes per byte, first code in the low nibble."""
    flat = np.ascontiguousarray(q, dtype=np.int8).ravel().view(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def int4_tensor(name: str, q: np.ndarray) -> TensorProto:
    if q.min(initial=0) < INT4_MIN or q.max(initial=0) > INT4_MAX:
        raise ValueError(f"{name}: codes outside [{INT4_MIN}, {INT4_MAX}]")
    return helper.make_tensor(name, TensorProto.INT4, list(q.shape), pack_int4(q), raw=True)


def scale_tensor(name: str, scale: np.ndarray) -> TensorProto:
    if scale.dtype not in _SCALE_TYPES:
        raise ValueError(f"{name}: scale dtype {scale.dtype} (expected float32 or float16)")
    return onnx.numpy_helper.from_array(np.ascontiguousarray(scale), name)


def dequantize_node(weight: str, scale: str, output: str, group: int, name: str) -> onnx.NodeProto:
    """DequantizeLinear(W int4 [K, N], scale [K / group, N], axis=0, block_size=group): no zero point."""
    return helper.make_node("DequantizeLinear", [weight, scale], [output], name=name, axis=0, block_size=group)


def quantize_int8_per_column(w: np.ndarray, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [K, N] in [-127, 127], scale [N] of scale_dtype): symmetric, one scale per output
    channel (column), amax / 127, never zero."""
    w = np.asarray(w, np.float32)
    scale = scales_from_amax(np.abs(w).max(axis=0), np.dtype(scale_dtype), INT8_MAX)
    q = np.clip(np.rint(w / scale.astype(np.float32)[None, :]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def int8_dequantize_node(weight: str, scale: str, output: str, name: str) -> onnx.NodeProto:
    """DequantizeLinear(W int8 [K, N], scale [N], axis=1): per output channel, no zero point."""
    return helper.make_node("DequantizeLinear", [weight, scale], [output], name=name, axis=1)
