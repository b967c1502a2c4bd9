"""The MvlmPEG op: its contract, its CPU reference, and its native libraries seen from Python.

PEG (the LDPv2 projector's positional encoding) is y = x + bias + depthwise_conv3x3(x, weight),
NCHW, stride 1, zero padding 1. Its identity (ONNX op type and domain, TensorRT plugin
name/version/namespace) is read from plugins/peg/peg_contract.json, the file CMake also reads
when it builds the plugin; the graph pass, the ONNX Runtime reference and the plugin loader
all take it from here.

CPU reference: the op runs in ONNX Runtime as an onnxruntime-extensions Python op in the
contract's domain ("ai.onnx.contrib"). onnxruntime-extensions' Python ops take no float16
tensors (declaring them passes session creation, then the first run aborts the whole process
with "Type float16 not supported by python customops api"). So only a float32 op is
registered, and for ONNX Runtime an FP16 graph's MvlmPEG nodes are wrapped in memory as
Cast(float32) -> MvlmPEG(float32 weights) -> Cast(float16). The graph on disk keeps its FP16
node, which is what TensorRT's plugin gets.

Native form: `peg_to_native` rewrites MvlmPEG nodes back into the depthwise Conv + Add they stand
for, for builders without the plugin library (TensorRT-RTX in CI, where no TensorRT headers exist
to build it).

Native libraries (built by `cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build`):
  libmvlm_peg_plugin.so  TensorRT plugin, registered by mvlm_compile.trt_env.load_plugin_library; taken
                         only from where the user chose (chosen_plugin_library), never from a bundle
  libmvlm_peg_kernel.so  the kernel alone behind a C function, for tests and benchmarks (no TensorRT)
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from mvlm_compile import resources
from mvlm_compile.errors import MvlmError
from mvlm_compile.onnx_io import load_model

PEG_DIR = resources.PEG_DIR  # the plugin's sources (CMake) and its contract
CONTRACT_PATH = PEG_DIR / "peg_contract.json"
BUILD_DIRS = (PEG_DIR / "build",)

PLUGIN_LIBRARY = "libmvlm_peg_plugin.so"
KERNEL_LIBRARY = "libmvlm_peg_kernel.so"
PLUGIN_ENV = "MVLM_PEG_PLUGIN"  # path of libmvlm_peg_plugin.so, looked at first
KERNEL_ENV = "MVLM_PEG_KERNEL"  # path of libmvlm_peg_kernel.so, looked at first

# The `dtype` argument of mvlmPegForward (enum MvlmPegDtype in plugins/peg/pegKernel.h).
KERNEL_DTYPES = {"float32": 0, "float16": 1}

_CONTRACT_KEYS = ("op_type", "plugin_version", "plugin_namespace", "onnx_domain", "inputs", "outputs")


class PluginLibraryError(MvlmError):
    """A PEG library is missing, or TensorRT did not accept it."""


def load_contract(path: Path = CONTRACT_PATH) -> dict[str, Any]:
    """Read and check the op contract (the fields the ONNX pass and the plugin loader rely on)."""
    try:
        contract = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PluginLibraryError(f"cannot read the PEG op contract {path}: {err}") from err
    missing = [key for key in _CONTRACT_KEYS if key not in contract]
    if missing:
        raise PluginLibraryError(f"PEG op contract {path} lacks {', '.join(missing)}")
    return contract


PEG_CONTRACT: dict[str, Any] = load_contract()


def _not_found(
    name: str, env_var: str, search_dirs: Iterable[Path | str] | None, needs: str, option: str = ""
) -> PluginLibraryError:
    looked = ", ".join(str(Path(d) / name) for d in (*BUILD_DIRS, *(search_dirs or ())))
    return PluginLibraryError(
        f"{name} not found: {env_var} is unset and it is not in {looked}. Build it with "
        "`cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build -j` "
        f"(make plugin; {needs}), or set {env_var} to its path" + (f" or pass {option} PATH." if option else ".")
    )


def _chosen_library(name: str, env_var: str, search_dirs: Iterable[Path | str] | None) -> Path | None:
    explicit = os.environ.get(env_var)
    if explicit:
        # An explicit choice that is wrong is an error, not a reason to pick some other build.
        if Path(explicit).is_file():
            return Path(explicit)
        raise PluginLibraryError(f"{env_var}={explicit} is not a file")
    for directory in (*BUILD_DIRS, *(search_dirs or ())):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def chosen_plugin_library(option: Path | str | None = None) -> Path | None:
    """The libmvlm_peg_plugin.so the user chose or this installation built: `option` (--plugin),
    else $MVLM_PEG_PLUGIN, else this installation's plugins/peg/build (`make plugin`, from
    mvlm-compile's own sources); None when there is none. An explicit choice that is not a file is
    an error (exit 2), never a reason to go without the plugin.

    Never a library found in a bundle or an engines directory: a bundle may come from another
    machine, and loading a library runs its code (its constructors run when it is opened). Such a
    library is loaded only when the user names it, and by the runtime only once its SHA-256 is
    the one engines.json records (mvlm_compile.engines_record.check_plugin_library)."""
    if option is not None:
        if Path(option).is_file():
            return Path(option)
        raise PluginLibraryError(f"--plugin {option}: not a file")
    return _chosen_library(PLUGIN_LIBRARY, PLUGIN_ENV, None)


def find_plugin_library(option: Path | str | None = None) -> Path:
    """chosen_plugin_library, or a PluginLibraryError naming where it looked and how to build one."""
    found = chosen_plugin_library(option)
    if found is None:
        raise _not_found(PLUGIN_LIBRARY, PLUGIN_ENV, None, "needs TensorRT 10+ headers, see TENSORRT_ROOT", "--plugin")
    return found


def find_kernel_library(search_dirs: Iterable[Path | str] | None = None) -> Path:
    """libmvlm_peg_kernel.so: $MVLM_PEG_KERNEL, else plugins/peg/build, else each of `search_dirs`."""
    found = _chosen_library(KERNEL_LIBRARY, KERNEL_ENV, search_dirs)
    if found is None:
        raise _not_found(KERNEL_LIBRARY, KERNEL_ENV, search_dirs, "needs only nvcc")
    return found


def load_kernel_library(path: Path | str | None = None) -> ctypes.CDLL:
    """Open libmvlm_peg_kernel.so (default: find_kernel_library()) with its C signatures declared."""
    lib = ctypes.CDLL(str(path if path is not None else find_kernel_library()))
    lib.mvlmPegForward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    lib.mvlmPegForward.restype = ctypes.c_int
    lib.mvlmPegErrorString.argtypes = [ctypes.c_int]
    lib.mvlmPegErrorString.restype = ctypes.c_char_p
    return lib


def peg_forward_gpu(
    lib: ctypes.CDLL,
    x: int,
    weight: int,
    bias: int,
    y: int,
    shape: tuple[int, int, int, int],
    dtype: str,
    stream: int = 0,
) -> None:
    """Enqueue y = x + bias + depthwise_conv3x3(x, weight) on `stream`.

    x, weight, bias, y are CUDA device addresses (e.g. torch's `tensor.data_ptr()`) of
    contiguous tensors [N,C,H,W], [C,1,3,3], [C], [N,C,H,W]; `shape` is (N, C, H, W); dtype is
    "float32" or "float16"; stream is a cudaStream_t as an int (0: the legacy default stream).
    Raises RuntimeError with CUDA's error name when the launch is refused.
    """
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(KERNEL_DTYPES)}, not {dtype!r}")
    n, c, h, w = shape
    status = lib.mvlmPegForward(x, weight, bias, y, n, c, h, w, KERNEL_DTYPES[dtype], stream)
    if status != 0:
        message = lib.mvlmPegErrorString(status).decode()
        raise RuntimeError(f"mvlmPegForward{tuple(shape)} {dtype} failed: CUDA error {status} ({message})")


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


def peg_to_native(model: onnx.ModelProto) -> int:
    """Rewrite every MvlmPEG node as the ops it stands for, in place: y = x + Conv(x, weight, bias)
    with group = C, 3x3, stride 1, padding 1 (a native depthwise Conv, what the export had before
    the plugin pass). Weights keep their dtype, so an FP16 projector stays FP16. For builders that
    cannot load the plugin library (TensorRT-RTX in CI: no TensorRT headers to build it). Returns
    the number of nodes rewritten."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    count = 0
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.domain != PEG_DOMAIN or node.op_type != PEG_OP:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 4 or list(weight.dims[1:]) != [1, 3, 3]:
            raise MvlmError(f"{node.name}: {PEG_OP} weight must be a constant [C, 1, 3, 3] initializer")
        conv_out = f"{node.name}/depthwise_conv"
        replacement = [
            helper.make_node(
                "Conv",
                list(node.input[:3]),
                [conv_out],
                name=f"{node.name}/Conv",
                group=int(weight.dims[0]),
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
            ),
            helper.make_node("Add", [node.input[0], conv_out], [node.output[0]], name=f"{node.name}/Add"),
        ]
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        count += 1
    if count and not any(n.domain == PEG_DOMAIN for n in graph.node):
        kept = [o for o in model.opset_import if o.domain != PEG_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return count


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
            f"{path}: has {PEG_OP} nodes (domain {PEG_DOMAIN}): "
            "install onnxruntime-extensions to run the PEG op in ONNX Runtime"
        ) from None
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    if all(dtypes.get(node.input[1]) != TensorProto.FLOAT16 for node in pegs):
        return str(path)
    load_external_data_for_model(model, str(Path(path).parent))
    _wrap_fp16_nodes(model)
    return model.SerializeToString()  # a projector is tens of MB, far from protobuf's 2 GB
