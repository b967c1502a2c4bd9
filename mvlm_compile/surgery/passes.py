"""The named passes over the exported graphs, in the style of onnx-graphsurgeon's examples.

Each pass takes a `gs.Graph` and a `PassContext`, rewrites the graph in place and returns one
line saying what it did. Every pass is idempotent: on its own output it finds nothing to do and
says so. A pass whose pattern is in the graph neither as exported nor as rewritten raises
`PatternMissing`; the runner (optimize.py) turns that into an error naming graph and pass,
unless the caller opted out for that pass. Passes check a whole pattern before touching the
graph, so a raising pass leaves it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mvlm_compile.peg_op import PEG_CONTRACT
from mvlm_compile.surgery.shapes import annotate_shapes, quiet_fold_constants

FOLD_ROUNDS = 4  # a folded Shape can make its consumers constant; in practice 2 rounds reach the fixpoint


class PatternMissing(Exception):
    """What the pass expected to find (the message completes 'expected ...')."""


@dataclass(frozen=True)
class PassContext:
    graph_name: str
    model: Mapping[str, Any]  # the manifest's model geometry (num_layers, hidden_size, ...)


Pass = Callable[[gs.Graph, PassContext], str]


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type `op` that produces `tensor`, if that is what produces it."""
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _only_consumer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if len(tensor.outputs) == 1 and tensor.outputs[0].op == op:
        return tensor.outputs[0]
    return None


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def _split_constant(node: gs.Node) -> tuple[gs.Tensor, gs.Constant] | None:
    """(variable input, constant input) of a binary node with exactly one constant input."""
    a, b = node.inputs
    if isinstance(b, gs.Constant) and not isinstance(a, gs.Constant):
        return a, b
    if isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
        return b, a
    return None


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def _reduces_last_axis(node: gs.Node, rank: int | None) -> bool:
    """ReduceMean over the last axis with keepdims (axes as input since opset 18, else attribute)."""
    if node.op != "ReduceMean" or node.attrs.get("keepdims", 1) != 1:
        return False
    axes = _constant(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
    if axes is None:
        return False
    axes = [int(a) for a in np.ravel(axes)]
    return axes == [-1] or (rank is not None and axes == [rank - 1])


def _unique_name(graph: gs.Graph, wanted: str) -> str:
    """`wanted`, or `wanted_<n>` if a node already has that name (ONNX requires unique node names)."""
    taken = {n.name for n in graph.nodes}
    name, n = wanted, 0
    while name in taken:
        n += 1
        name = f"{wanted}_{n}"
    return name


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


# ---------------------------------------------------------------------------------------------
# Clean-ups (every graph)


def cleanup(graph: gs.Graph, ctx: PassContext) -> str:
    """Remove nodes and initializers nothing depends on, then sort topologically."""
    nodes = len(graph.nodes)
    constants = sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
    graph.cleanup().toposort()
    removed_constants = constants - sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
    return f"removed {nodes - len(graph.nodes)} dead nodes, {removed_constants} unused initializers"


def fold_constants(graph: gs.Graph, ctx: PassContext) -> str:
    """Evaluate everything that depends only on constants and static shapes (onnx-graphsurgeon's
    fold_constants, run in ONNX Runtime), to a fixpoint. Shape nodes fold only where the shape is
    known, so shapes are inferred first; the batch / sequence dimensions stay dynamic."""
    nodes = len(graph.nodes)
    for _ in range(FOLD_ROUNDS):
        annotate_shapes(graph)
        before = graph_fingerprint(graph, annotations=False)
        quiet_fold_constants(graph)
        graph.toposort()
        if graph_fingerprint(graph, annotations=False) == before:
            break
    return f"{nodes - len(graph.nodes)} nodes folded into initializers or removed"


def remove_identity_casts(graph: gs.Graph, ctx: PassContext) -> str:
    """Drop Cast nodes whose input already has the target type (the FP32 export keeps the
    RMSNorm's `.to(float32)` and mask casts as float->float, int64->int64, bool->bool). Casts
    producing a graph output stay, so that the graph's I/O names do not change."""
    annotate_shapes(graph)
    outputs = {t.name for t in graph.outputs}
    removed = 0
    for node in graph.nodes:
        if node.op != "Cast" or node.outputs[0].name in outputs:
            continue
        source = node.inputs[0]
        if source.dtype is None or np.dtype(source.dtype) != onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]):
            continue
        _replace_uses(node.outputs[0], source)
        node.outputs.clear()  # now dead: the runner's cleanup removes it
        removed += 1
    return f"removed {removed} Casts to the type their input already has"


def infer_shapes(graph: gs.Graph, ctx: PassContext) -> str:
    """Store ONNX shape inference's (symbolic) type and shape of every intermediate tensor in the
    graph, through the MvlmPEG node too (its output has its input's type and shape)."""
    changed = annotate_shapes(graph)
    known = sum(t.shape is not None for t in graph.tensors().values() if not isinstance(t, gs.Constant))
    return f"{known} tensors with a known shape ({changed} annotations changed)"


# ---------------------------------------------------------------------------------------------
# Vision: LayerNormalization


def _match_decomposed_layernorm(div: gs.Node) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor, float, gs.Node] | None:
    """x, gamma, beta, epsilon and the final Add of
    Add(Mul(Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub(...), 2)), eps))), gamma), beta)."""
    centered, std = div.inputs
    sub, sqrt = _producer(centered, "Sub"), _producer(std, "Sqrt")
    if sub is None or sqrt is None:
        return None
    x, mean = sub.inputs
    reduce_mean = _producer(mean, "ReduceMean")
    if reduce_mean is None or reduce_mean.inputs[0] is not x or not _reduces_last_axis(reduce_mean, _rank(x)):
        return None
    add_eps = _producer(sqrt.inputs[0], "Add")
    split = _split_constant(add_eps) if add_eps is not None else None
    if split is None or split[1].values.size != 1:
        return None
    variance, epsilon = split
    reduce_var = _producer(variance, "ReduceMean")
    if reduce_var is None or not _reduces_last_axis(reduce_var, _rank(x)):
        return None
    square = _producer(reduce_var.inputs[0], "Pow")
    if square is None or square.inputs[0] is not centered or _constant(square.inputs[1]) is None:
        return None
    if float(np.ravel(_constant(square.inputs[1]))[0]) != 2.0 or {n.name for n in centered.outputs} != {
        square.name,
        div.name,
    }:
        return None
    scale = _only_consumer(div.outputs[0], "Mul")
    shift = _only_consumer(scale.outputs[0], "Add") if scale is not None else None
    gamma = _split_constant(scale) if shift is not None else None
    beta = _split_constant(shift) if gamma is not None else None
    if beta is None or len(gamma[1].shape) != 1 or len(beta[1].shape) != 1:
        return None
    return x, gamma[1], beta[1], float(np.ravel(epsilon.values)[0]), shift


def layernorm_fusion(graph: gs.Graph, ctx: PassContext) -> str:
    """Fuse decomposed layer norms (what exporters below opset 17 emit) into LayerNormalization,
    which TensorRT maps to its normalization layer. The TorchScript exporter at opset 21 already
    emits LayerNormalization for CLIP's pre_layrnorm / layer_norm1 / layer_norm2, so on our
    exports this pass finds them fused."""
    annotate_shapes(graph)
    fused = 0
    for div in [n for n in graph.nodes if n.op == "Div"]:
        match = _match_decomposed_layernorm(div)
        if match is None:
            continue
        x, gamma, beta, epsilon, shift = match
        y = shift.outputs[0]
        shift.outputs.clear()  # the decomposed chain is now dead: the runner's cleanup removes it
        graph.nodes.append(
            gs.Node(
                "LayerNormalization",
                name=_unique_name(graph, f"{shift.name or y.name}/LayerNormalization"),
                attrs={"axis": -1, "epsilon": epsilon},
                inputs=[x, gamma, beta],
                outputs=[y],
            )
        )
        fused += 1
    total = sum(n.op == "LayerNormalization" for n in graph.nodes)
    if total == 0:
        raise PatternMissing(
            "LayerNormalization nodes or their decomposition "
            "(ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add)"
        )
    if fused == 0:
        return f"already fused: {total} LayerNormalization"
    return f"fused {fused} decomposed layer norms ({total} LayerNormalization in all)"


# ---------------------------------------------------------------------------------------------
# Decoder: RMSNorm


def _is_rmsnorm(square: gs.Node) -> bool:
    """Pow(x, 2) -> ReduceMean(last axis) -> Add(eps) -> Sqrt -> Div(1, .) -> Mul(x, .)
    [-> Cast] -> Mul(weight): LlamaRMSNorm as the TorchScript exporter writes it."""
    x, exponent = square.inputs
    if _constant(exponent) is None or float(np.ravel(_constant(exponent))[0]) != 2.0:
        return False
    reduce_mean = _only_consumer(square.outputs[0], "ReduceMean")
    if reduce_mean is None or not _reduces_last_axis(reduce_mean, _rank(x)):
        return False
    add_eps = _only_consumer(reduce_mean.outputs[0], "Add")
    if add_eps is None or _split_constant(add_eps) is None:
        return False
    sqrt = _only_consumer(add_eps.outputs[0], "Sqrt")
    reciprocal = _only_consumer(sqrt.outputs[0], "Div") if sqrt is not None else None
    if reciprocal is None or reciprocal.inputs[1] is not sqrt.outputs[0] or _constant(reciprocal.inputs[0]) is None:
        return False
    normalize = _only_consumer(reciprocal.outputs[0], "Mul")
    if normalize is None or x not in normalize.inputs:
        return False
    weighted = normalize.outputs[0]
    cast = _only_consumer(weighted, "Cast")
    if cast is not None:
        weighted = cast.outputs[0]
    scale = _only_consumer(weighted, "Mul")
    return scale is not None and _split_constant(scale) is not None


def rmsnorm_check(graph: gs.Graph, ctx: PassContext) -> str:
    """Check that every RMSNorm is still the primitive chain (2 per layer + the final norm).
    Nothing is fused: ONNX's RMSNormalization (opset 23) does not exist in TensorRT 10.3, which
    parses the primitive ops; this pass makes sure the clean-ups before it kept them intact."""
    expected = 2 * int(ctx.model["num_layers"]) + 1
    found = sum(_is_rmsnorm(n) for n in graph.nodes if n.op == "Pow")
    if found != expected:
        raise PatternMissing(
            f"{expected} RMSNorm chains Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> Mul(weight) "
            f"(2 per layer + the final norm), found {found}"
        )
    return f"{found} RMSNorm chains intact"


# ---------------------------------------------------------------------------------------------
# Projector: LDPv2


def _linear_before_pool(pool: gs.Node) -> tuple[gs.Node, gs.Node] | None:
    """(MatMul, Add) of the Linear whose [B, T, C] output reaches the pool as
    Add -> Transpose(0, 2, 1) -> Reshape [B, C, side, side] -> AveragePool (the exporter's layout)."""
    reshape = _producer(pool.inputs[0], "Reshape")
    transpose = _producer(reshape.inputs[0], "Transpose") if reshape is not None else None
    if transpose is None or list(transpose.attrs.get("perm", [])) != [0, 2, 1] or len(reshape.outputs[0].outputs) != 1:
        return None
    add = _producer(transpose.inputs[0], "Add")
    split = _split_constant(add) if add is not None else None
    matmul = _producer(split[0], "MatMul") if split is not None and len(split[1].shape) == 1 else None
    if matmul is None or not isinstance(matmul.inputs[1], gs.Constant) or len(matmul.inputs[1].shape) != 2:
        return None
    # The Linear's output may feed nothing but the pooling chain and Shape nodes (whose results
    # the rewrite keeps valid: they then read the Linear's input, which the chain then carries).
    others = [n for n in add.outputs[0].outputs if n is not transpose]
    if len(split[0].outputs) != 1 or any(n.op != "Shape" for n in others):
        return None
    return matmul, add


def _linear_after_pool(pool: gs.Node) -> bool:
    """The rewritten form: AveragePool -> Transpose(0, 2, 3, 1) -> MatMul(constant weight)."""
    for transpose in pool.outputs[0].outputs:
        if transpose.op == "Transpose" and list(transpose.attrs.get("perm", [])) == [0, 2, 3, 1]:
            matmul = _only_consumer(transpose.outputs[0], "MatMul")
            if matmul is not None and isinstance(matmul.inputs[1], gs.Constant):
                return True
    return False


def ldpv2_pool_first(graph: gs.Graph, ctx: PassContext) -> str:
    """Run LDPv2's second pointwise Linear after the 2x2 average pooling instead of before it.

    Pooling is linear, per channel, with weights summing to 1, so pool(xW + b) = pool(x)W + b:
    exact up to float rounding. The Linear then runs on 144 tokens instead of 576, a quarter of
    its MACs (about half the projector's). The pooling now reads the GELU output, and the Linear
    runs channels-last on the pooled grid: AveragePool -> Transpose(0, 2, 3, 1) -> MatMul -> Add ->
    Transpose(0, 3, 1, 2) -> what read the pooled grid before (the PEG's input).
    """
    annotate_shapes(graph)
    pools = [n for n in graph.nodes if n.op == "AveragePool"]
    if len(pools) != 1:
        raise PatternMissing(f"one AveragePool (LDPv2's token pooling), found {len(pools)}")
    pool = pools[0]
    linear = _linear_before_pool(pool)
    if linear is None:
        if _linear_after_pool(pool):
            return "already rewritten: the second Linear runs after the pooling"
        raise PatternMissing(
            "LDPv2's second Linear (MatMul by a constant [K, N] weight, Add of a constant [N] bias) "
            "feeding the AveragePool through Transpose(0, 2, 1) -> Reshape"
        )
    matmul, add = linear
    tokens = matmul.inputs[0].shape[-2] if matmul.inputs[0].shape else "?"
    linear_in, linear_out = matmul.inputs[0], add.outputs[0]
    _replace_uses(linear_out, linear_in)  # the pooling chain (and its Shape nodes) read the GELU output

    pooled = pool.outputs[0]
    pooled_readers = list(pooled.outputs)
    channels_last = gs.Variable(f"{pooled.name}/channels_last", dtype=pooled.dtype)
    channels_first = gs.Variable(f"{linear_out.name}/channels_first", dtype=linear_out.dtype)
    matmul.inputs[0] = channels_last
    for stale in (matmul.outputs[0], linear_out):  # they were [B, T, C]; now [B, side, side, C]
        stale.shape = None
    graph.nodes += [
        gs.Node(
            "Transpose",
            _unique_name(graph, f"{pool.name}/to_channels_last"),
            {"perm": [0, 2, 3, 1]},
            [pooled],
            [channels_last],
        ),
        gs.Node(
            "Transpose",
            _unique_name(graph, f"{add.name}/to_channels_first"),
            {"perm": [0, 3, 1, 2]},
            [linear_out],
            [channels_first],
        ),
    ]
    for reader in pooled_readers:
        for index, tensor in enumerate(reader.inputs):
            if tensor is pooled:
                reader.inputs[index] = channels_first
    weight = matmul.inputs[1]
    pooled_tokens = int(np.prod(pooled.shape[2:])) if pooled.shape and None not in pooled.shape[2:] else "?"
    shape = f"{weight.shape[0]}x{weight.shape[1]}"
    return f"Linear {matmul.name} ({shape}) moved after the pooling: {tokens} -> {pooled_tokens} tokens"


def _match_peg(conv: gs.Node) -> gs.Node | None:
    """The residual Add of a PEG: depthwise 3x3 Conv (group = channels, stride 1, pads 1,
    dilation 1, with bias) whose output is added to its own input."""
    if conv.op != "Conv" or len(conv.inputs) != 3:
        return None
    x, weight, bias = conv.inputs
    w, b = _constant(weight), _constant(bias)
    if w is None or b is None or w.ndim != 4 or w.shape[1:] != (1, 3, 3) or b.shape != (w.shape[0],):
        return None
    attrs = conv.attrs
    if (
        attrs.get("group") != w.shape[0]
        or list(attrs.get("pads", [])) != [1, 1, 1, 1]
        or list(attrs.get("strides", [1, 1])) != [1, 1]
        or list(attrs.get("dilations", [1, 1])) != [1, 1]
        or attrs.get("auto_pad", "NOTSET") != "NOTSET"
    ):
        return None
    add = _only_consumer(conv.outputs[0], "Add")
    if add is None or x not in add.inputs:
        return None
    return add


def peg_to_plugin(graph: gs.Graph, ctx: PassContext) -> str:
    """Replace LDPv2's PEG block, depthwise 3x3 Conv + residual Add, by ONE plugin node.

    The node's op_type, domain and attributes come from the op contract
    plugins/peg/peg_contract.json (as `mvlm_compile.peg_op.PEG_CONTRACT`), the same file
    CMake builds the TensorRT plugin from: op "MvlmPEG" in domain "ai.onnx.contrib", with
    `plugin_version` and `plugin_namespace` attributes (TensorRT's ONNX parser finds the plugin
    by op_type + those two; without `plugin_namespace` it would look in namespace ""). Inputs x
    [N, C, H, W], weight [C, 1, 3, 3] and bias [C] (the Conv's initializers, x's dtype); output
    y = x + bias + depthwise_conv3x3(x), taking the Add's output tensor so that the Reshape /
    Transpose the exporter put around the block are untouched. ONNX Runtime runs the node with
    mvlm_compile/peg_op.py.
    """
    annotate_shapes(graph)
    op_type, domain = PEG_CONTRACT["op_type"], PEG_CONTRACT["onnx_domain"]
    matches = [(conv, add) for conv in graph.nodes if (add := _match_peg(conv)) is not None]
    existing = sum(n.op == op_type and n.domain == domain for n in graph.nodes)
    if not matches:
        if existing:
            return f"already rewritten: {existing} {op_type} node"
        raise PatternMissing("a PEG block: depthwise 3x3 Conv (group = channels, pads 1, with bias) + Add of its input")
    for conv, _ in matches:
        x, weight, bias = conv.inputs
        if x.dtype is not None and not np.dtype(x.dtype) == weight.dtype == bias.dtype:
            raise PatternMissing(f"{conv.name}'s weight and bias in its input's dtype {x.dtype} (the op contract)")
    attrs = {
        "plugin_version": PEG_CONTRACT["plugin_version"],
        "plugin_namespace": PEG_CONTRACT["plugin_namespace"],
        **PEG_CONTRACT.get("attributes", {}),
    }
    for conv, add in matches:
        x, weight, bias = conv.inputs
        y = add.outputs[0]
        add.outputs.clear()  # Conv and Add are now dead: the runner's cleanup removes them
        name = _unique_name(graph, f"{conv.name or y.name}/{op_type}")
        graph.nodes.append(gs.Node(op_type, name, dict(attrs), [x, weight, bias], [y], domain=domain))
    return f"replaced {len(matches)} depthwise Conv + Add by {op_type} ({domain})"


# ---------------------------------------------------------------------------------------------


def graph_fingerprint(graph: gs.Graph, annotations: bool = True) -> tuple:
    """What a pass can change: nodes and their wiring and attributes, the constants' names and
    shapes, the graph I/O, and (with `annotations`) the intermediate tensors' types and shapes.
    Not the order of the nodes: any topological order is the same graph."""
    nodes = tuple(
        sorted(
            (
                n.op,
                n.domain,
                n.name,
                tuple(t.name for t in n.inputs),
                tuple(t.name for t in n.outputs),
                repr(sorted(n.attrs.items())),
            )
            for n in graph.nodes
        )
    )
    tensors = tuple(
        (name, type(t).__name__, str(t.dtype), tuple(t.shape) if t.shape is not None else None)
        for name, t in sorted(graph.tensors().items())
        if annotations or isinstance(t, gs.Constant)
    )
    return nodes, tensors, tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs)


PASSES: dict[str, Pass] = {
    "cleanup": cleanup,
    "fold_constants": fold_constants,
    "remove_identity_casts": remove_identity_casts,
    "layernorm_fusion": layernorm_fusion,
    "rmsnorm_check": rmsnorm_check,
    "ldpv2_pool_first": ldpv2_pool_first,
    "peg_to_plugin": peg_to_plugin,
    "infer_shapes": infer_shapes,
}

_FIRST = ("cleanup", "fold_constants", "remove_identity_casts")
# Pool-first before the PEG pass: both orders work (neither pattern involves the other's nodes).
GRAPH_PASSES: dict[str, tuple[str, ...]] = {
    "vision": (*_FIRST, "layernorm_fusion", "infer_shapes"),
    "projector": (*_FIRST, "ldpv2_pool_first", "peg_to_plugin", "infer_shapes"),
    "decoder": (*_FIRST, "rmsnorm_check", "infer_shapes"),
}
