"""TensorRT engines from the artifacts' ONNX graphs, through the TensorRT Python API.

Strongly typed networks: the graphs carry their precisions (FP16 vision/projector, INT4
DequantizeLinear weights with FP16 activations in the decoder), which is how TensorRT wants
explicit quantization built (no precision flags). The PEG plugin library is loaded before
parsing; a persistent timing cache makes rebuilds fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mvlm_compile.engine.plan import BuildSettings, Geometry, MemoryPlan, optimization_profiles
from mvlm_compile.engines_record import read_engines_record, write_engines_record
from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import digest, sha256_file, write_bytes
from mvlm_compile.manifest import load_manifest
from mvlm_compile.recipes import Target
from mvlm_compile.trt_env import GpuInfo, load_plugin_library

ENGINE_GRAPHS = ("vision", "projector", "decoder")


class EngineBuildError(MvlmError):
    """TensorRT refused a graph or a configuration."""


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


def build_engines(
    trt: ModuleType,
    gpu: GpuInfo,
    artifacts: Path,
    engines_dir: Path,
    plugin_path: Path,
    target: Target,
    geometry: Geometry,
    settings: BuildSettings,
    plan: MemoryPlan,
    force: bool = False,
    progress: Callable[[str], None] = lambda msg: None,
) -> str:
    """Build the three engines and engines.json (what the runtime checks before loading).
    Returns "ran", or "skipped (unchanged)" when engines.json records exactly these inputs."""
    manifest = load_manifest(artifacts)
    load_plugin_library(plugin_path, trt)
    profiles = optimization_profiles(geometry, settings)
    inputs = {
        "onnx_sha256": manifest.graph_hashes(artifacts),
        "plugin_sha256": sha256_file(plugin_path),
        "tensorrt": trt.__version__,
        "gpu_sm": gpu.sm,
        "target": target.name,
        "settings": settings.__dict__,
        "profiles": profiles,
        "workspace": plan.workspace,
    }
    previous = read_engines_record(engines_dir)
    if not force and previous is not None and previous.get("inputs_sha256") == digest(inputs):
        return "skipped (unchanged)"
    engines_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = engines_dir / "timing.cache"
    engines = {}
    for name in ENGINE_GRAPHS:
        spec = EngineSpec(name, manifest.graph_path(artifacts, name), profiles[name], plan.workspace)
        data = build_serialized_engine(trt, spec, timing_cache, progress)
        file = f"{name}.engine"
        write_bytes(engines_dir / file, data)
        engines[name] = {
            "file": file,
            "sha256": sha256_file(engines_dir / file),
            "onnx_sha256": inputs["onnx_sha256"][name],
            "precision": manifest.graphs[name]["dtype"],
            "profiles": profiles[name],
            "inputs": manifest.graphs[name]["inputs"],
            "outputs": manifest.graphs[name]["outputs"],
        }
    write_engines_record(
        engines_dir,
        {
            "tensorrt_version": trt.__version__,
            "gpu": {"name": gpu.name, "sm": gpu.sm},
            "target": target.name,
            "plugin": {"file": plugin_path.name, "sha256": inputs["plugin_sha256"]},
            "settings": settings.__dict__,
            "memory_plan": plan.to_json(),
            "engines": engines,
            "inputs_sha256": digest(inputs),
        },
    )
    return "ran"
