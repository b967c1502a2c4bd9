"""Shape inference and a MAC counter for onnx-graphsurgeon graphs of any size.

ONNX's shape inference needs a ModelProto under 2 GB, and exporting a 1.7B decoder with its
weights would copy gigabytes per call. So inference runs on a skeleton: a copy of the graph
whose large constants are turned into graph inputs of the same type and shape (the small ones,
which carry shapes and axes, stay constants for data propagation), and whose MvlmPEG nodes are
Identity (by the op contract y has x's type and shape).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mvlm_compile.peg_op import PEG_DOMAIN, PEG_OP

# Constants with more elements than this go into the skeleton as typed inputs; shape-carrying
# constants (Reshape targets, axes, Slice bounds) are far smaller.
SKELETON_CONSTANT_LIMIT = 1024
_UNKNOWN_DIM = re.compile(r"^unk__\d+$")

Shape = list  # of int (static), str (symbolic) or None (unknown)


def quiet_fold_constants(graph: gs.Graph) -> None:
    """onnx-graphsurgeon's fold_constants and cleanup, without ONNX Runtime's warnings about the
    throw-away sessions it evaluates constants in (optimizer notices, not problems of the graph)."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    try:
        graph.fold_constants().cleanup()
    finally:
        onnxruntime.set_default_logger_severity(2)  # ONNX Runtime's default; it has no getter


def _skeleton(graph: gs.Graph, dims: Mapping[str, int] | None) -> gs.Graph:
    skeleton = graph.copy().cleanup()  # a pass may have left dead nodes for the runner's cleanup
    graph_io = {t.name for t in [*graph.inputs, *graph.outputs]}
    weights: dict[str, gs.Variable] = {}
    for tensor in skeleton.tensors().values():
        if isinstance(tensor, gs.Constant):
            if prod(tensor.shape) > SKELETON_CONSTANT_LIMIT:
                weights[tensor.name] = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
        elif tensor.name not in graph_io:
            # Shapes recorded before a rewrite may be stale: infer every intermediate afresh.
            tensor.dtype, tensor.shape = None, None
    for node in skeleton.nodes:
        for index, tensor in enumerate(node.inputs):
            if tensor.name in weights and isinstance(tensor, gs.Constant):
                node.inputs[index] = weights[tensor.name]
    for tensor in skeleton.outputs:
        tensor.shape = None
    if dims is not None:
        for tensor in skeleton.inputs:
            tensor.shape = [dims.get(d, d) if isinstance(d, str) else d for d in tensor.shape]
    skeleton.inputs = [*skeleton.inputs, *weights.values()]
    for node in skeleton.nodes:
        if node.domain == PEG_DOMAIN and node.op == PEG_OP:
            node.op, node.domain, node.attrs = "Identity", None, {}
            node.inputs = node.inputs[:1]
    return skeleton


def _infer(skeleton: gs.Graph) -> dict[str, tuple[np.dtype | None, Shape]]:
    inferred = onnx.shape_inference.infer_shapes(gs.export_onnx(skeleton, do_type_check=False), data_prop=True)
    result = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else None
        shape = None
        if tensor_type.HasField("shape"):
            shape = [
                d.dim_value
                if d.HasField("dim_value")
                else (None if _UNKNOWN_DIM.match(d.dim_param) else d.dim_param or None)
                for d in tensor_type.shape.dim
            ]
        result[value.name] = (dtype, shape)
    return result


def _write(graph: gs.Graph, inferred: Mapping[str, tuple[np.dtype | None, Shape]]) -> int:
    """Put inferred dtypes and shapes on the intermediate tensors; how many changed."""
    graph_io = {t.name for t in [*graph.inputs, *graph.outputs]}
    changed = 0
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant) or name in graph_io:
            continue
        dtype, shape = inferred.get(name, (None, None))
        if (tensor.dtype, tensor.shape) != (dtype, shape):
            tensor.dtype, tensor.shape = dtype, shape
            changed += 1
    return changed


def infer_shapes(graph: gs.Graph, dims: Mapping[str, int] | None = None) -> dict[str, tuple[np.dtype | None, Shape]]:
    """{tensor name: (dtype, shape)} for the graph's variables, by ONNX shape inference with data
    propagation. With `dims` (e.g. {"batch": 1, "seq": 224}) the symbolic input dimensions are set
    and the skeleton's shape computations are folded first, which makes shapes that ONNX's data
    propagation alone cannot (a Slice bound computed by Shape -> Gather -> Div -> Cast) concrete."""
    skeleton = _skeleton(graph, dims)
    if dims is not None:
        _write(skeleton, _infer(skeleton))
        quiet_fold_constants(skeleton)
    return _infer(skeleton)


def annotate_shapes(graph: gs.Graph) -> int:
    """Write inferred (symbolic) dtypes and shapes onto the graph's intermediate tensors, replacing
    what they carried. Returns how many tensors changed annotation."""
    return _write(graph, infer_shapes(graph))


@dataclass(frozen=True)
class MacCount:
    macs: int  # multiply-accumulates of MatMul, Gemm, Conv and MvlmPEG at the given dims
    unknown: list[str]  # such nodes whose shapes inference could not make concrete


def _concrete(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def count_macs(graph: gs.Graph, dims: Mapping[str, int]) -> MacCount:
    """Multiply-accumulates of the graph's MatMul / Gemm / Conv / MvlmPEG nodes with its symbolic
    input dimensions set to `dims` (FLOPs are about twice this). Element-wise ops, softmax and
    pooling are not counted: they are a small share and memory-bound."""
    inferred = infer_shapes(graph, dims)

    def shape_of(tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        return inferred.get(tensor.name, (None, None))[1]

    macs, unknown = 0, []
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm", "Conv") or (node.domain == PEG_DOMAIN and node.op == PEG_OP):
            a, b, out = shape_of(node.inputs[0]), shape_of(node.inputs[1]), shape_of(node.outputs[0])
            if not (_concrete(a) and _concrete(b) and _concrete(out)):
                unknown.append(node.name)
                continue
            if node.op == "MatMul":
                macs += prod(out) * a[-1]  # each output element is a K-long dot product
            elif node.op == "Gemm":
                macs += prod(out) * (a[0] if node.attrs.get("transA", 0) else a[1])
            else:  # Conv and the PEG's depthwise conv: weight [C_out, C_in / group, kh, kw]
                macs += prod(out) * prod(b[1:])
    return MacCount(macs, unknown)
