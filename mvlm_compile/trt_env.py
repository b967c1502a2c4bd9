"""What this machine offers TensorRT: the builder flavours, the CUDA GPU, the PEG plugin library.

Shared by engine building (mvlm_compile.engine) and the TensorRT backend (mvlm_compile.runtime),
so it sits below both. Torch-free: the GPU is queried through the driver API (libcuda) with ctypes.

Two builder flavours share one build module (mvlm_compile.engine.builder): TensorRT 10.3+
(`tensorrt`: JetPack on the Orin, or an x86 GPU machine; it builds for the GPU it runs on) and
TensorRT for RTX (`tensorrt_rtx_bindings`: builds ahead of time for a named compute capability,
without a GPU). What differs between them is described by `Flavour`, here and nowhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mvlm_compile.errors import MvlmError
from mvlm_compile.peg_op import CONTRACT_PATH, PEG_CONTRACT, PluginLibraryError


@dataclass(frozen=True)
class Flavour:
    """One TensorRT builder family and what the build does differently for it."""

    name: str  # as targets.yaml's `builder` and engines.json's builder.flavour say it
    module: str  # the Python bindings
    install: str  # how to get them, for error messages
    min_version: tuple[int, int]
    ahead_of_time: bool  # True: builds for the target's compute capability with no GPU present
    sms: tuple[int, ...]  # compute capabilities it can build for (empty: the GPU it runs on)
    # TensorRT-RTX keeps ITimingCache only as deprecated no-ops, and setting one makes its
    # ahead-of-time build query for a GPU: the timing cache is used with TensorRT only.
    timing_cache: bool
    # TensorRT on the Orin must run PEG as the plugin (its whole point). TensorRT-RTX may build the
    # projector with PEG as a native depthwise Conv when no plugin library is at hand (CI: no
    # registry ships TensorRT's headers, which the plugin needs).
    peg_plugin_required: bool
    # The TensorRT backend drives the `tensorrt` module (execute_async_v3); it does not run engines
    # through TensorRT-RTX's `tensorrt_rtx` module, so those engines are built here but not run.
    runs_in_backend: bool


TENSORRT = Flavour(
    name="tensorrt",
    module="tensorrt",
    install="TensorRT 10.3+ (on JetPack: the python3-libnvinfer package; a venv needs --system-site-packages)",
    min_version=(10, 3),  # IPluginV3, blocked INT4 DequantizeLinear
    ahead_of_time=False,
    sms=(),
    timing_cache=True,
    peg_plugin_required=True,
    runs_in_backend=True,
)
TENSORRT_RTX = Flavour(
    name="tensorrt-rtx",
    module="tensorrt_rtx_bindings",
    install="TensorRT for RTX: pip install 'mvlm-compile[rtx]'",
    min_version=(1, 7),  # what CI builds with
    ahead_of_time=True,
    sms=(75, 80, 86, 89, 120, 121),  # trt.ComputeCapability of TensorRT-RTX 1.7: no SM87 (Orin), no SM90
    timing_cache=False,
    peg_plugin_required=False,
    runs_in_backend=False,
)
FLAVOURS = {f.name: f for f in (TENSORRT, TENSORRT_RTX)}


def sm_text(sm: int) -> str:
    """Compute capability as NVIDIA writes it: 86 -> "8.6", 120 -> "12.0"."""
    return f"{sm // 10}.{sm % 10}"


def import_flavour(flavour: Flavour) -> tuple[ModuleType | None, str]:
    """(bindings module, "") or (None, why they cannot be used here)."""
    if flavour is TENSORRT_RTX:
        why = link_unversioned_rtx_library()
        if why:
            return None, why
    try:
        trt = importlib.import_module(flavour.module)
    except ImportError as e:
        return (
            None,
            f"{flavour.name}: the {flavour.module} Python module is not importable ({e}); needs {flavour.install}",
        )
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < flavour.min_version:
        wanted = ".".join(map(str, flavour.min_version))
        return None, f"{flavour.name} {trt.__version__} is older than {wanted}: needs {flavour.install}"
    return trt, ""


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """(tensorrt module, "") or (None, why it cannot be used here)."""
    return import_flavour(TENSORRT)


RTX_LIBRARY = "libtensorrt_rtx.so"


def link_unversioned_rtx_library() -> str:
    """Make `libtensorrt_rtx.so` exist beside `libtensorrt_rtx.so.1` in the tensorrt_rtx_libs package.

    TensorRT-RTX's ONNX parser dlopens the unversioned name when it meets a plugin node, and the
    wheel ships only the .so.1: without the link the parse ends the whole process in
    std::terminate. Done here, at import time, rather than by the Makefile so that every install
    (pip install 'mvlm-compile[rtx]', a reinstalled wheel) is covered. The parser's RPATH is
    $ORIGIN, so the link must sit in that directory. Returns "" or why the link could not be made.
    """
    try:
        import tensorrt_rtx_libs
    except ImportError:
        return ""  # bindings from elsewhere (an SDK tarball ships the link), or none: import_flavour says
    directory = Path(tensorrt_rtx_libs.__file__).resolve().parent
    link, versioned = directory / RTX_LIBRARY, directory / f"{RTX_LIBRARY}.1"
    if link.exists() or not versioned.exists():
        return ""
    scratch = directory / f".{RTX_LIBRARY}.{os.getpid()}.tmp"
    try:
        os.symlink(versioned.name, scratch)
        os.replace(scratch, link)  # atomic: a concurrent process may be making the same link
    except OSError as e:
        scratch.unlink(missing_ok=True)
        return (
            f"tensorrt-rtx: {link} is missing and could not be created ({e.strerror}); TensorRT-RTX's ONNX parser "
            f"needs it: ln -s {versioned.name} {link}"
        )
    return ""


def compute_capability(trt: ModuleType, sm: int) -> Any:
    """trt.ComputeCapability.SM<sm> of an ahead-of-time flavour, or an error naming what it knows."""
    value = getattr(trt.ComputeCapability, f"SM{sm}", None)
    if value is None:
        known = sorted(n for n in dir(trt.ComputeCapability) if n.startswith("SM"))
        raise MvlmError(
            f"{trt.__name__} {trt.__version__} cannot build for compute capability {sm_text(sm)} (knows {known})"
        )
    return value


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


@contextlib.contextmanager
def no_collection_inside_tensorrt() -> Iterator[None]:
    """TensorRT calls our Python logger while it holds its own mutexes. A garbage collection that
    starts inside that callback may free another TensorRT object left in a reference cycle (a
    traceback of an earlier failed build holds one), whose destructor takes the same mutex: the
    process hangs (seen: TensorRT-RTX 1.7, createInferBuilder). So collect first, then keep the
    cyclic collector off while TensorRT works; reference counting still frees everything else."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
