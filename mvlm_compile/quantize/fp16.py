"""FP32 -> FP16 conversion of the vision encoder and projector graphs (native, small).

* float32 initializers, Constant / ConstantOfShape values -> float16, clipped to +-65504
  (an FP32 mask constant like -3.4e38 would otherwise become -inf);
* Cast(to=float) -> Cast(to=float16); graph inputs/outputs float -> float16 (the I/O contract:
  FP16 graphs take and return FP16, the runtime casts);
* nodes whose op type is in `keep_fp32` run in FP32 between Casts (their float initializers
  stay FP32 when nothing else uses them);
* nodes of a custom domain (the projector's MvlmPEG, domain ai.onnx.contrib) keep their op type
  and attributes; only their initializer inputs become FP16 (the plugin contract: weight and
  bias have the dtype of x).
Stale value_info is dropped (ORT and TensorRT infer shapes).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_MAX = float(np.finfo(np.float16).max)
STANDARD_DOMAINS = ("", "ai.onnx")
# Ops whose inputs are all float (so Casts can be put on every input without type inference).
_ALL_FLOAT_INPUT_OPS = {
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Gelu",
    "Sigmoid",
    "Exp",
    "Erf",
    "Tanh",
}


def _to_fp16(array: np.ndarray) -> np.ndarray:
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


def _convert_tensor(tensor: TensorProto) -> None:
    if tensor.data_type == TensorProto.FLOAT:
        tensor.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(tensor)), tensor.name))


def graph_float_type(model: onnx.ModelProto) -> int:
    return model.graph.input[0].type.tensor_type.elem_type


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A converted copy of `model` (FP32 graph); an FP16 graph is returned unchanged."""
    if graph_float_type(model) == TensorProto.FLOAT16:
        return model
    unknown = set(keep_fp32) - _ALL_FLOAT_INPUT_OPS
    if unknown:
        raise ValueError(f"keep_fp32 supports {sorted(_ALL_FLOAT_INPUT_OPS)}, not {sorted(unknown)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    kept_nodes = [n for n in graph.node if n.op_type in keep_fp32 and n.domain in STANDARD_DOMAINS]
    kept_ids = {id(n) for n in kept_nodes}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    fp32_inits = {
        name
        for name in inits
        if inits[name].data_type == TensorProto.FLOAT
        and users.get(name)
        and all(id(u) in kept_ids for u in users[name])
    }
    for name, tensor in inits.items():
        if name not in fp32_inits:
            _convert_tensor(tensor)

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    _convert_tensor(attr.t)
                elif attr.name in ("value_float", "value_floats"):
                    raise ValueError(f"{node.name}: Constant {attr.name} is not converted")
        elif node.op_type == "ConstantOfShape":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    _convert_tensor(attr.t)
        elif node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
        if id(node) in kept_ids:
            for i, name in enumerate(node.input):
                if not name or name in fp32_inits:
                    continue
                cast_out = f"{name}_fp32_for_{node.name or node.output[0]}"
                nodes.append(
                    helper.make_node(
                        "Cast", [name], [cast_out], name=f"{node.name}/CastInFp32_{i}", to=TensorProto.FLOAT
                    )
                )
                node.input[i] = cast_out
            nodes.append(node)
            for i, name in enumerate(node.output):
                if not name:
                    continue
                fp32_out = f"{name}_fp32"
                node.output[i] = fp32_out
                nodes.append(
                    helper.make_node(
                        "Cast", [fp32_out], [name], name=f"{node.name}/CastOutFp16_{i}", to=TensorProto.FLOAT16
                    )
                )
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    return model
