"""TensorRT engines from the artifacts' ONNX graphs, through the TensorRT Python API.

Strongly typed networks: the graphs carry their precisions (FP16 vision/projector, INT4
DequantizeLinear weights with FP16 activations in the decoder), which is how TensorRT wants
explicit quantization built (no precision flags). The PEG plugin library is loaded before
parsing; a persistent timing cache makes rebuilds fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import write_bytes

MIN_TENSORRT = (10, 3)


class EngineBuildError(MvlmError):
    """TensorRT refused a graph or a configuration."""


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """(tensorrt module, "") or (None, why it cannot be used here)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return None, f"the TensorRT Python package is not importable ({e})"
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        return None, f"TensorRT {trt.__version__} is older than {'.'.join(map(str, MIN_TENSORRT))} (IPluginV3, INT4 weights)"
    return trt, ""


@dataclass(frozen=True)
class EngineSpec:
    name: str
    onnx_path: Path
    profiles: list[dict[str, list[list[int]]]]  # per profile: input -> [min, opt, max]
    workspace_bytes: int


def build_serialized_engine(
    trt: ModuleType,
    spec: EngineSpec,
    timing_cache: Path,
    log: Callable[[str], None] = lambda msg: None,
) -> bytes:
    """Parse, configure and build one engine; the timing cache is read and updated on disk."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx_path)):  # reads <graph>.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{spec.onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    for shapes in spec.profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, False)

    log(f"building {spec.name} engine from {spec.onnx_path.name} ({len(spec.profiles)} profile(s))")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{spec.onnx_path}: TensorRT could not build the {spec.name} engine (see its log above)")
    write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)

