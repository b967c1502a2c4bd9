"""INT4 weight-only rewrite of the exported decoder graph.

Every Linear of the export is a MatMul whose second input is a constant 2-D initializer
[K, N] (already transposed); its node name carries the module path
(/language_model/model/layers.0/mlp/down_proj/MatMul). Each selected Linear becomes

    DequantizeLinear(W int4 [K, N], scale [K / group, N], axis=0, block_size=group) -> MatMul

with scales in the graph's activation type (FP32 graph: FP32 scales; FP16 graph: FP16), no
zero point, opset 21 / IR 10: the form TensorRT's ONNX parser takes and ONNX Runtime fuses
into MatMulNBits.

AWQ input scales s (weights' rows times s) need the input divided by s. Where that goes:
  * q/k/v (after input_layernorm), gate/up (after post_attention_layernorm), lm_head (after
    the final norm): into the RMSNorm weight initializer of the Mul that feeds them. Exact, free.
  * down_proj, input silu(gate) * up: into up_proj's output columns (default, exact, free:
    per-column scaling commutes with per-column group scales) or an inserted Mul ("mul").
  * o_proj, input the attention output: an inserted Mul by 1/s (default), or v_proj's output
    columns ("v_proj"). Folding into v_proj would change what the graph returns as
    new.*.value (the KV cache would hold V / s), so the cache no longer matches the golden
    tensors nor keeps its natural range (for a later KV-cache quantization); the Mul is one
    element-wise op on [tokens, hidden] per layer.
Weights are read tensor by tensor (external data included), so peak memory stays near one
copy of the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.quantize import awq, int4
from mvlm_compile.quantize.settings import OUTSIDE_GRAPH, QuantizeSettings

ACTIVATION_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_SHAPE_ONLY = ("Shape", "Size")


class AlreadyQuantizedError(ArtifactError):
    """The decoder already holds INT4 weights: quantizing again would quantize twice."""


@dataclass
class Linear:
    node: onnx.NodeProto
    path: str  # language_model/model/layers.0/self_attn/q_proj
    short: str  # layers.0.self_attn.q_proj, lm_head
    weight: str  # initializer [K, N]
    input: str
    output: str
    k: int
    n: int


def module_path(node_name: str) -> str:
    path = node_name.strip("/")
    return path.rsplit("/", 1)[0] if "/" in path else path


def short_name(path: str) -> str:
    for prefix in ("language_model/model/", "language_model/"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    return path.replace("/", ".")


def find_linears(graph: onnx.GraphProto) -> list[Linear]:
    """MatMuls whose second input is a constant 2-D float initializer."""
    inits = {t.name: t for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        tensor = inits[node.input[1]]
        if len(tensor.dims) != 2 or tensor.data_type not in ACTIVATION_TYPES:
            continue
        path = module_path(node.name or node.output[0])
        found.append(
            Linear(
                node,
                path,
                short_name(path),
                node.input[1],
                node.input[0],
                node.output[0],
                int(tensor.dims[0]),
                int(tensor.dims[1]),
            )
        )
    return found


def is_kept(linear: Linear, keep: tuple[str, ...]) -> bool:
    """A Linear is kept unquantized when a keep entry names it: its last component (lm_head,
    down_proj), or a dotted suffix of its name (layers.0.mlp.down_proj)."""
    return any(linear.short == k or linear.short.endswith("." + k) for k in keep)


def int4_weights(graph: onnx.GraphProto) -> list[str]:
    """Names of INT4/UINT4 initializers feeding DequantizeLinear (non-empty = already quantized)."""
    inits = {t.name: t for t in graph.initializer}
    return [
        n.input[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4)
    ]


class Weights:
    """Initializers of a graph loaded without its external data: read one tensor at a time."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self.tensors = {t.name: t for t in model.graph.initializer}

    def read(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            count = int(np.prod(tensor.dims)) if tensor.dims else 1
            path = self.base_dir / info["location"]
            try:
                array = np.fromfile(path, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
            except FileNotFoundError:
                raise ArtifactError(f"{path}: missing external weights of {name}") from None
            if array.size != count:
                raise ArtifactError(f"{path}: truncated external weights of {name}")
            return array.reshape(tuple(tensor.dims))
        return numpy_helper.to_array(tensor)

    def write(self, name: str, array: np.ndarray) -> None:
        """Replace a tensor's content in place (same name), stored inline."""
        self.tensors[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def materialize(self) -> None:
        """Load every remaining external tensor inline (before the graph is saved elsewhere)."""
        for name, tensor in self.tensors.items():
            if tensor.data_location == TensorProto.EXTERNAL:
                self.write(name, self.read(name))


@dataclass
class LinearRecord:
    name: str
    k: int
    n: int
    quantized: bool  # to INT4
    int8: bool | None = None  # weight-only INT8 per output channel (lm_head, when asked)
    alpha: float | None = None  # AWQ scale exponent of its input group
    loss_rtn: float | None = None  # relative output error of its group with RTN, calibration tokens
    loss_awq: float | None = None
    clip_error_before: float | None = None  # relative block error before/after the clip search
    clip_error_after: float | None = None
    fold: str | None = None  # where 1/s went

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class DecoderQuantization:
    model: onnx.ModelProto
    records: list[LinearRecord] = field(default_factory=list)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def group_inputs(linears: list[Linear]) -> dict[str, list[Linear]]:
    groups: dict[str, list[Linear]] = {}
    for linear in linears:
        groups.setdefault(linear.input, []).append(linear)
    return groups


def plan_folds(
    graph: onnx.GraphProto, linears: list[Linear], fold_down: str, fold_o: str, same_kv_heads: bool
) -> dict[str, tuple[str, str]]:
    """Per input tensor of a Linear group: ("norm", initializer) | ("columns", linear weight) | ("mul", "")."""
    producers, consumers = _producers(graph), _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    by_output = {lin.output: lin for lin in linears}
    by_path = {lin.path: lin for lin in linears}
    plan: dict[str, tuple[str, str]] = {}
    for name, group in group_inputs(linears).items():
        k = group[0].k
        users = [n for n in consumers.get(name, []) if n.op_type not in _SHAPE_ONLY]  # Shape does not see a scale
        only_linears = {id(n) for n in users} == {id(lin.node) for lin in group}
        producer = producers.get(name)
        plan[name] = ("mul", "")
        if producer is None or producer.op_type != "Mul" or not only_linears:
            continue
        constant = [i for i in producer.input if i in inits]
        if len(constant) == 1 and list(inits[constant[0]].dims) == [k]:
            plan[name] = ("norm", constant[0])  # RMSNorm's weight
            continue
        leaf = group[0].path.rsplit("/", 1)[-1]
        if len(group) == 1 and leaf == "down_proj" and fold_down == "up_proj":
            ups = [by_output[i] for i in producer.input if i in by_output]
            if len(ups) == 1 and len(consumers.get(ups[0].output, [])) == 1:
                plan[name] = ("columns", ups[0].weight)
    if fold_o == "v_proj" and same_kv_heads:
        for name, group in group_inputs(linears).items():
            if len(group) == 1 and group[0].path.endswith("/o_proj"):
                v = by_path.get(group[0].path[: -len("o_proj")] + "v_proj")
                if v is not None and v.n == group[0].k:
                    plan[name] = ("columns", v.weight)
    return plan


def quantize_decoder(
    model: onnx.ModelProto,
    base_dir: Path,
    settings: QuantizeSettings,
    captures: dict[str, np.ndarray] | None = None,
    same_kv_heads: bool = True,
    progress: Callable[[str], None] = lambda m: None,
) -> DecoderQuantization:
    """Rewrite `model` (loaded without external data; weights read from base_dir) in place."""
    method, group_size, keep = settings.method, settings.group_size, settings.keep_fp16
    graph = model.graph
    already = int4_weights(graph)
    if already:
        raise AlreadyQuantizedError(
            f"decoder graph already holds {len(already)} INT4 weights (e.g. {already[0]}): it was quantized before"
        )
    act_type = graph.input[0].type.tensor_type.elem_type
    if act_type not in ACTIVATION_TYPES:
        raise ArtifactError(f"decoder input {graph.input[0].name}: element type {act_type}, expected float or float16")
    act_dtype = ACTIVATION_TYPES[act_type]
    linears = find_linears(graph)
    if not linears:
        raise ArtifactError("decoder graph has no MatMul with a constant 2-D weight: not an exported decoder")
    unmatched = [k for k in keep if k not in OUTSIDE_GRAPH and not any(is_kept(lin, (k,)) for lin in linears)]
    if unmatched:
        raise MvlmError(
            f"--keep {unmatched[0]!r}: names no Linear of the decoder (e.g. lm_head, down_proj, layers.0.mlp.down_proj)"
        )
    selected = [lin for lin in linears if not is_kept(lin, keep)]
    bad = [f"{lin.short} (K={lin.k})" for lin in selected if lin.k % group_size]
    if bad:
        raise MvlmError(f"--group-size {group_size}: does not divide the input dimension of {bad[:3]}")
    selected_ids = {id(lin) for lin in selected}
    weights = Weights(model, base_dir)
    groups = group_inputs(linears)
    records = {lin.weight: LinearRecord(lin.short, lin.k, lin.n, id(lin) in selected_ids) for lin in linears}

    row_scale: dict[str, np.ndarray] = {}  # weight -> s (rows multiplied)
    col_scale: dict[str, np.ndarray] = {}  # weight -> 1/s of a downstream group (columns multiplied)
    mul_inputs: dict[str, np.ndarray] = {}  # input tensor -> 1/s, by an inserted Mul
    if method == "awq":
        if captures is None:
            raise MvlmError("AWQ needs calibration activations")
        plan = plan_folds(graph, linears, settings.fold_down, settings.fold_o, same_kv_heads)
        for index, (name, group) in enumerate(groups.items()):
            chosen = [lin for lin in group if id(lin) in selected_ids]
            if not chosen:
                continue
            progress(f"AWQ scale search {index + 1}/{len(groups)}: {', '.join(lin.short for lin in chosen)}")
            search = awq.search_scales(
                captures[name],
                [weights.read(lin.weight).astype(np.float32) for lin in chosen],
                group_size,
                act_dtype,
                settings.grid,
                settings.max_tokens,
            )
            kind, target = plan[name]
            for lin in group:
                row_scale[lin.weight] = search.scales
                records[lin.weight].alpha = search.alpha
                records[lin.weight].loss_rtn = search.loss_rtn
                records[lin.weight].loss_awq = search.loss
                records[lin.weight].fold = f"{kind}:{target}" if target else kind
            inverse = (1.0 / search.scales).astype(np.float32)
            if kind == "norm":
                weights.write(target, (weights.read(target).astype(np.float32) * inverse).astype(act_dtype))
            elif kind == "columns":
                col_scale[target] = inverse
            else:
                mul_inputs[name] = inverse

    replaced: dict[str, tuple[str, str]] = {}  # weight -> (int4 name, dq output)
    dq_nodes: dict[str, onnx.NodeProto] = {}
    new_inits: list[TensorProto] = []
    # lm_head, kept out of INT4, in weight-only INT8 per output channel when the settings ask.
    int8_ids = {id(lin) for lin in linears if settings.lm_head == "int8" and is_kept(lin, ("lm_head",))}
    for index, lin in enumerate(linears):
        scaled = lin.weight in row_scale or lin.weight in col_scale
        if not scaled and id(lin) not in selected_ids and id(lin) not in int8_ids:
            continue
        w = weights.read(lin.weight).astype(np.float32)
        if lin.weight in row_scale:
            w *= row_scale[lin.weight][:, None]
        if lin.weight in col_scale:
            w *= col_scale[lin.weight][None, :]
        if id(lin) in int8_ids:
            progress(f"INT8 {index + 1}/{len(linears)}: {lin.short}")
            q, scale = int4.quantize_int8_per_column(w, act_dtype)
            q_name, s_name, dq_out = (
                f"{lin.short}.weight_int8",
                f"{lin.short}.weight_scale",
                f"{lin.short}.weight_dequantized",
            )
            new_inits += [numpy_helper.from_array(q, q_name), int4.scale_tensor(s_name, scale)]
            dq_nodes[lin.weight] = int4.int8_dequantize_node(q_name, s_name, dq_out, f"/{lin.path}/DequantizeLinear")
            replaced[lin.weight] = (q_name, dq_out)
            records[lin.weight].int8 = True
            continue
        if id(lin) not in selected_ids:
            weights.write(lin.weight, w.astype(act_dtype))  # kept, but its input was scaled
            continue
        progress(f"INT4 {index + 1}/{len(linears)}: {lin.short}")
        ratio = None
        if method == "awq" and settings.clip and captures is not None:
            x = captures[lin.input]
            if lin.weight in row_scale:
                x = x / row_scale[lin.weight][None, :]
            ratio, before, after = awq.search_clip(x, w, group_size, act_dtype, settings.grid)
            records[lin.weight].clip_error_before, records[lin.weight].clip_error_after = before, after
        q, scale = int4.quantize_weight(w, group_size, act_dtype, ratio)
        base = lin.short
        q_name, s_name, dq_out = f"{base}.weight_int4", f"{base}.weight_scale", f"{base}.weight_dequantized"
        new_inits += [int4.int4_tensor(q_name, q), int4.scale_tensor(s_name, scale)]
        dq_nodes[lin.weight] = int4.dequantize_node(q_name, s_name, dq_out, group_size, f"/{lin.path}/DequantizeLinear")
        replaced[lin.weight] = (q_name, dq_out)

    # Rewire: DequantizeLinear before each quantized MatMul, Mul before a "mul"-folded group.
    first_consumer = {name: group[0] for name, group in groups.items() if name in mul_inputs}
    nodes = []
    for node in graph.node:
        for name, lin in first_consumer.items():
            if node is lin.node:
                scaled = f"{name}_awq_scaled"
                inv_name = f"{lin.short}.awq_inverse_scale"
                new_inits.append(numpy_helper.from_array(mul_inputs[name].astype(act_dtype), inv_name))
                nodes.append(
                    onnx.helper.make_node("Mul", [name, inv_name], [scaled], name=f"/{lin.path}/AwqInputScale")
                )
                for member in groups[name]:
                    member.node.input[0] = scaled
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in replaced:
            weight = node.input[1]
            nodes.append(dq_nodes[weight])
            node.input[1] = replaced[weight][1]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)

    still_used = {i for n in graph.node for i in n.input}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in still_used:
            del graph.initializer[i]
    weights.tensors = {t.name: t for t in graph.initializer}
    weights.materialize()
    graph.initializer.extend(new_inits)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21
    model.ir_version = max(model.ir_version, 10)
    del graph.value_info[:]  # shapes of rewired tensors; ORT and TensorRT infer them
    return DecoderQuantization(model, list(records.values()))
