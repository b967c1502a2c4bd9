"""CPU reference of the MvlmPEG op, so that ONNX Runtime runs a projector carrying the plugin node.

The op is defined in plugins/peg/peg_contract.json (read through
`mvlm_compile.build.plugin.PEG_CONTRACT`): y = x + bias + depthwise_conv3x3(x, weight), NCHW,
stride 1, zero padding 1. It runs as an onnxruntime-extensions Python op in the contract's
domain ("ai.onnx.contrib").

FP16: onnxruntime-extensions' Python ops take no float16 tensors (declaring them passes session
creation, then the first run aborts the whole process with "Type float16 not supported by python
customops api"). So only a float32 op is registered, and for ONNX Runtime an FP16 graph's MvlmPEG
nodes are wrapped in memory as Cast(float32) -> MvlmPEG(float32 weights) -> Cast(float16). The
graph on disk keeps its FP16 node, which is what TensorRT's plugin gets.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from mvlm_compile.build.plugin import PEG_CONTRACT
from mvlm_compile.errors import MvlmError
from mvlm_compile.onnx_io import load_model

PEG_OP = PEG_CONTRACT["op_type"]
PEG_DOMAIN = PEG_CONTRACT["onnx_domain"]


def peg_numpy(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """y = x + bias + depthwise_conv3x3(x, weight) for x [N, C, H, W], weight [C, 1, 3, 3], bias [C].

    Accumulates in float32 and returns x's dtype.
    """
    x32 = np.asarray(x, np.float32)
    w32 = np.asarray(weight, np.float32)
    height, width = x32.shape[2:]
    padded = np.pad(x32, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = x32 + np.asarray(bias, np.float32)[None, :, None, None]
    for i in range(3):
        for j in range(3):
            y = y + padded[:, :, i : i + height, j : j + width] * w32[None, :, 0, i, j, None, None]
    return y.astype(x.dtype)


@functools.cache
def _library_path() -> str:
    """Register the float32 Python op once per process; the path of the library that serves it.
    Raises ImportError without onnxruntime-extensions (not cached: a later install is seen)."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    float32 = PyCustomOpDef.dt_float
    onnx_op(op_type=PEG_OP, inputs=[float32] * 3, outputs=[float32])(peg_numpy)
    return get_library_path()


def _wrap_fp16_nodes(model: onnx.ModelProto) -> None:
    """Cast FP16 MvlmPEG nodes to float32 around the op (in place)."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.domain != PEG_DOMAIN or node.op_type != PEG_OP:
            continue
        weight, bias = (initializers.get(name) for name in node.input[1:3])
        if weight is None or bias is None:
            raise MvlmError(f"{node.name}: {PEG_OP} weight and bias must be constant initializers")
        if weight.data_type != TensorProto.FLOAT16:
            continue
        x, y = node.input[0], node.output[0]
        names = [f"{node.name}/fp32/{what}" for what in ("x", "weight", "bias", "y")]
        graph.initializer.extend(
            numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), name)
            for t, name in ((weight, names[1]), (bias, names[2]))
        )
        graph.node.remove(node)
        replacement = [
            helper.make_node("Cast", [x], [names[0]], name=f"{node.name}/cast_in", to=TensorProto.FLOAT),
            helper.make_node(PEG_OP, names[:3], [names[3]], name=node.name, domain=PEG_DOMAIN),
            helper.make_node("Cast", [names[3]], [y], name=f"{node.name}/cast_out", to=TensorProto.FLOAT16),
        ]
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]  # the FP16 weights just replaced
    for tensor in unused:
        graph.initializer.remove(tensor)


def ort_model_source(path: Path, options) -> str | bytes:
    """What to hand onnxruntime.InferenceSession for `path`: the path itself, unless the graph has
    nodes in the PEG domain; then the extensions library is registered on `options`, and an FP16
    graph is returned as bytes with its PEG nodes computed in float32."""
    model = load_model(path, load_weights=False)
    pegs = [node for node in model.graph.node if node.domain == PEG_DOMAIN]
    if not pegs:
        return str(path)
    try:
        options.register_custom_ops_library(_library_path())
    except ImportError:
        raise MvlmError(
            f"{path}: has {PEG_OP} nodes (domain {PEG_DOMAIN}): install onnxruntime-extensions to run the PEG op in ONNX Runtime"
        ) from None
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    if all(dtypes.get(node.input[1]) != TensorProto.FLOAT16 for node in pegs):
        return str(path)
    load_external_data_for_model(model, str(Path(path).parent))
    _wrap_fp16_nodes(model)
    return model.SerializeToString()  # a projector is tens of MB, far from protobuf's 2 GB
