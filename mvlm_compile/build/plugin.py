"""The PEG op's native libraries seen from Python: the TensorRT plugin and the bare CUDA kernel.

Torch-free (ctypes only). The op's identity (ONNX op type, plugin name/version/namespace) is
read from plugins/peg/peg_contract.json, the file CMake also reads when it builds the plugin.

Libraries (built by `cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build`):
  libmvlm_peg_plugin.so  TensorRT plugin, loaded with IPluginRegistry.load_library (needs TensorRT 10+)
  libmvlm_peg_kernel.so  the kernel alone behind a C function, for tests and benchmarks (no TensorRT)
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from mvlm_compile.errors import MvlmError

PEG_DIR = Path(__file__).resolve().parents[2] / "plugins" / "peg"
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


def _find_library(name: str, env_var: str, search_dirs: Iterable[Path | str] | None, needs: str) -> Path:
    explicit = os.environ.get(env_var)
    if explicit:
        # An explicit choice that is wrong is an error, not a reason to pick some other build.
        if Path(explicit).is_file():
            return Path(explicit)
        raise PluginLibraryError(f"{env_var}={explicit} is not a file")
    candidates = [Path(d) / name for d in (*BUILD_DIRS, *(search_dirs or ()))]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise PluginLibraryError(
        f"{name} not found: {env_var} is unset and it is not in {looked}. Build it with "
        "`cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build -j` "
        f"(make plugin; {needs}), or set {env_var} to its path."
    )


def find_plugin_library(search_dirs: Iterable[Path | str] | None = None) -> Path:
    """libmvlm_peg_plugin.so: $MVLM_PEG_PLUGIN, else plugins/peg/build, else each of `search_dirs`
    (e.g. an artifacts directory). Raises PluginLibraryError naming every place it looked."""
    return _find_library(
        PLUGIN_LIBRARY, PLUGIN_ENV, search_dirs, "needs TensorRT 10+ headers, see TENSORRT_ROOT"
    )


def find_kernel_library(search_dirs: Iterable[Path | str] | None = None) -> Path:
    """libmvlm_peg_kernel.so: $MVLM_PEG_KERNEL, else plugins/peg/build, else each of `search_dirs`."""
    return _find_library(KERNEL_LIBRARY, KERNEL_ENV, search_dirs, "needs only nvcc")


def load_plugin_library(path: Path | str, trt_module: ModuleType) -> Any:
    """Register the PEG plugin creator with TensorRT's plugin registry and return it.

    Loads `path` with `trt.get_plugin_registry().load_library` (the loader trtexec's
    --dynamicPlugins uses) unless a creator of the contract's name/version/namespace is already
    registered in this process, since loading a library whose creator is registered fails.
    """
    name = PEG_CONTRACT["op_type"]
    version = PEG_CONTRACT["plugin_version"]
    namespace = PEG_CONTRACT["plugin_namespace"]
    registry = trt_module.get_plugin_registry()
    creator = registry.get_creator(name, version, namespace)
    if creator is not None:
        return creator
    if registry.load_library(str(path)) is None:
        raise PluginLibraryError(f"TensorRT could not load the plugin library {path} (see the TensorRT log)")
    creator = registry.get_creator(name, version, namespace)
    if creator is None:
        raise PluginLibraryError(
            f"{path} loaded, but TensorRT has no creator {name!r} version {version!r} in namespace "
            f"{namespace!r}: was it built from {CONTRACT_PATH}?"
        )
    return creator


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
