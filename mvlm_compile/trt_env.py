"""What this machine offers TensorRT: the tensorrt module, the CUDA GPU, the PEG plugin library.

Shared by engine building (mvlm_compile.engine) and the TensorRT backend (mvlm_compile.runtime),
so it sits below both. Torch-free: the GPU is queried through the driver API (libcuda) with ctypes.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mvlm_compile.peg_op import CONTRACT_PATH, PEG_CONTRACT, PluginLibraryError

MIN_TENSORRT = (10, 3)


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """(tensorrt module, "") or (None, why it cannot be used here)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return None, f"the TensorRT Python package is not importable ({e})"
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        return (
            None,
            f"TensorRT {trt.__version__} is older than {'.'.join(map(str, MIN_TENSORRT))} (IPluginV3, INT4 weights)",
        )
    return trt, ""


_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


@dataclass(frozen=True)
class GpuInfo:
    name: str
    sm: int  # e.g. 87 for Orin
    memory_bytes: int


def query_gpu(index: int = 0) -> GpuInfo | None:
    """Device `index`, or None when there is no driver or no device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:
        return None
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None
    device = ctypes.c_int()
    cuda.cuDeviceGet(ctypes.byref(device), index)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, len(name), device)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device)
    memory = ctypes.c_size_t()
    cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), device)
    return GpuInfo(name.value.decode(errors="replace"), major.value * 10 + minor.value, memory.value)


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
