"""TensorRT engines from the artifacts' ONNX graphs, through the TensorRT Python API.

One module for both builder flavours (mvlm_compile.trt_env.Flavour): TensorRT 10.3+ building
for the GPU it runs on, and TensorRT-RTX building ahead of time for a compute capability. The
differences are read from the flavour; nothing else here branches on which one it is.

Strongly typed networks: the graphs carry their precisions (FP16 vision/projector, INT4
DequantizeLinear weights with FP16 activations in the decoder), which is how TensorRT wants
explicit quantization built (no precision flags). Every return value TensorRT reports failure
with is checked: the parse (errors name the ONNX node), each add_optimization_profile (the
index it returns), set_timing_cache. The timing cache (TensorRT only) is locked and merged, so
two builds sharing it lose nothing. Each engine's equivalent `polygraphy convert` and
trtexec command lines go into engines.json, to rebuild one engine by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mvlm_compile.engine.plan import BuildSettings, Geometry, MemoryPlan, optimization_profiles
from mvlm_compile.engines_record import (
    PEG_NATIVE,
    PEG_PLUGIN,
    read_engines_record,
    stale_engines,
    write_engines_record,
)
from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import digest, sha256_file, sha256_graph, write_bytes
from mvlm_compile.manifest import load_manifest
from mvlm_compile.onnx_io import load_model, save_model
from mvlm_compile.peg_op import peg_to_native
from mvlm_compile.recipes import Target
from mvlm_compile.trt_env import (
    Flavour,
    GpuInfo,
    compute_capability,
    load_plugin_library,
    no_collection_inside_tensorrt,
    sm_text,
)

ENGINE_GRAPHS = ("vision", "projector", "decoder")
NATIVE_PROJECTOR = "projector-native.onnx"  # written into the engines directory when PEG is built natively
TIMING_CACHE = "timing.cache"
# Part of the build's inputs: engines.json written before each engine recorded its source graph
# (graph_sha256) is rebuilt rather than skipped.
RECORD_VERSION = 2
Progress = Callable[[str], None]


class EngineBuildError(MvlmError):
    """TensorRT refused a graph or a configuration."""


@dataclass(frozen=True)
class EngineSpec:
    name: str
    onnx_path: Path
    profiles: list[dict[str, list[list[int]]]]  # per profile: input -> [min, opt, max]
    workspace_bytes: int
    sm: int  # compute capability the engine is for (set explicitly by ahead-of-time flavours)


@dataclass
class BuiltEngine:
    data: bytes
    profile_indices: list[int]  # what add_optimization_profile returned, one per planned profile
    network_inputs: list[str]
    network_outputs: list[str]
    seconds: float


_LOGGERS: dict[str, Any] = {}  # TensorRT module name -> its one ILogger


def _logger(trt: ModuleType) -> Any:
    """One ILogger per TensorRT module: TensorRT keeps the first logger a builder, runtime or
    refitter registers and ignores later ones ("the current new logger is ignored"), so a
    logger per build would collect nothing after the first build."""
    if trt.__name__ not in _LOGGERS:

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, message: str) -> None:
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(" ".join(message.split()))  # one line in our messages
                if severity <= trt.ILogger.Severity.WARNING:
                    print(f"[{trt.__name__}] {message}", file=sys.stderr)

        _LOGGERS[trt.__name__] = Logger()
    return _LOGGERS[trt.__name__]


class BuildLog:
    """TensorRT's log as one build sees it: errors kept for our one-line messages, warnings shown
    on stderr."""

    def __init__(self, trt: ModuleType) -> None:
        self.logger = _logger(trt)
        self.errors: list[str] = self.logger.errors

    def error_since(self, start: int) -> str:
        """The first error logged after `start` (the first is the cause; later ones are consequences)."""
        return self.errors[start] if len(self.errors) > start else "no error logged"


def parse_onnx(trt: ModuleType, log: BuildLog, path: Path) -> tuple[Any, Any, Any]:
    """(builder, network, parser) with the graph parsed into a strongly typed network, or an
    EngineBuildError naming each node the parser refused."""
    builder = trt.Builder(log.logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log.logger)
    ok = parser.parse_from_file(str(path))  # reads <graph>.onnx.data beside it
    if not ok or parser.num_errors:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        where = "; ".join(
            f"node {e.node_name() or e.node()!r} ({e.node_operator()}): {' '.join(e.desc().split())}" for e in errors
        )
        raise EngineBuildError(f"{path}: TensorRT's ONNX parser failed at {where or 'no node (see the log above)'}")
    return builder, network, parser


def _add_profiles(builder: Any, config: Any, spec: EngineSpec, log: BuildLog) -> list[int]:
    """Each planned profile, in order; add_optimization_profile returns its index, -1 when refused."""
    indices = []
    for expected, shapes in enumerate(spec.profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        start = len(log.errors)
        index = config.add_optimization_profile(profile)
        if index != expected:
            raise EngineBuildError(
                f"{spec.onnx_path}: TensorRT refused optimisation profile {expected} of the {spec.name} engine "
                f"(add_optimization_profile returned {index}): {log.error_since(start)}"
            )
        indices.append(index)
    return indices


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `<path>.lock`: builds in other processes may share the file."""
    with open(f"{path}.lock", "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def load_timing_cache(config: Any, path: Path) -> None:
    """Give the build the timing cache on disk (or an empty one); refuse one TensorRT does not take."""
    with _locked(path):
        data = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(data)
    if cache is None:
        raise EngineBuildError(f"{path}: TensorRT could not read this timing cache; delete it to start a new one")
    if not config.set_timing_cache(cache, False):  # ignore_mismatch=False: a foreign cache is refused
        raise EngineBuildError(
            f"{path}: TensorRT refused this timing cache (another TensorRT version or GPU?); delete it to start anew"
        )


def save_timing_cache(config: Any, path: Path, progress: Progress) -> None:
    """Merge this build's timing cache into the one on disk, under the lock: what another build
    saved since we loaded is kept, not overwritten."""
    cache = config.get_timing_cache()
    with _locked(path):
        if path.exists():
            on_disk = config.create_timing_cache(path.read_bytes())
            if on_disk is None or not cache.combine(on_disk, False):
                progress(f"{path}: the timing cache on disk does not match this TensorRT/GPU; replacing it")
        write_bytes(path, bytes(cache.serialize()))


def build_serialized_engine(
    trt: ModuleType,
    flavour: Flavour,
    spec: EngineSpec,
    timing_cache: Path | None = None,
    progress: Progress = lambda msg: None,
) -> BuiltEngine:
    """Parse, configure and build one engine. `timing_cache` (flavours that have one) is read
    and merged back on disk."""
    with no_collection_inside_tensorrt():
        return _build(trt, flavour, spec, timing_cache, progress)


def _build(
    trt: ModuleType, flavour: Flavour, spec: EngineSpec, timing_cache: Path | None, progress: Progress
) -> BuiltEngine:
    log = BuildLog(trt)
    builder, network, _parser = parse_onnx(trt, log, spec.onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    if flavour.ahead_of_time:
        config.num_compute_capabilities = 1
        config.set_compute_capability(compute_capability(trt, spec.sm), 0)
    indices = _add_profiles(builder, config, spec, log)
    if timing_cache is not None and flavour.timing_cache:
        load_timing_cache(config, timing_cache)

    progress(f"building {spec.name} engine from {spec.onnx_path.name} ({len(spec.profiles)} profile(s))")
    start, started = len(log.errors), time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise EngineBuildError(
            f"{spec.onnx_path}: TensorRT could not build the {spec.name} engine: {log.error_since(start)}"
        )
    if timing_cache is not None and flavour.timing_cache:
        save_timing_cache(config, timing_cache, progress)
    return BuiltEngine(
        data=bytes(serialized),
        profile_indices=indices,
        network_inputs=[network.get_input(i).name for i in range(network.num_inputs)],
        network_outputs=[network.get_output(i).name for i in range(network.num_outputs)],
        seconds=seconds,
    )


def _shape(dims: list[int], sep: str) -> str:
    return sep.join(str(d) for d in dims)


def engine_commands(
    flavour: Flavour,
    spec: EngineSpec,
    engine: Path,
    plugin: Path | None,
    timing_cache: Path | None,
    cwd: Path,
) -> dict[str, str]:
    """The `polygraphy convert` and trtexec (TensorRT-RTX: tensorrt_rtx) command lines that build
    the same engine, with paths relative to `cwd` (the engines directory)."""

    def rel(path: Path) -> str:
        return os.path.relpath(path, cwd)

    polygraphy = ["polygraphy", "convert", rel(spec.onnx_path), "--convert-to", "trt", "-o", rel(engine)]
    polygraphy += ["--strongly-typed", "--pool-limit", f"workspace:{spec.workspace_bytes}"]
    cli = ["tensorrt_rtx" if flavour.ahead_of_time else "trtexec", f"--onnx={rel(spec.onnx_path)}"]
    cli += [f"--saveEngine={rel(engine)}", "--stronglyTyped", "--skipInference"]
    cli += [f"--memPoolSize=workspace:{spec.workspace_bytes // 2**20}M"]
    if flavour.ahead_of_time:
        polygraphy += ["--compute-capabilities", sm_text(spec.sm)]
        cli += [f"--computeCapabilities={spec.sm}"]
    if plugin is not None:
        polygraphy += ["--plugins", rel(plugin)]
        cli += [f"--dynamicPlugins={rel(plugin)}"]
    if timing_cache is not None and flavour.timing_cache:
        polygraphy += ["--load-timing-cache", rel(timing_cache), "--save-timing-cache", rel(timing_cache)]
        cli += [f"--timingCacheFile={rel(timing_cache)}"]
    for index, shapes in enumerate(spec.profiles):
        for position, (poly_flag, cli_flag) in enumerate(
            (
                ("--trt-min-shapes", "--minShapes"),
                ("--trt-opt-shapes", "--optShapes"),
                ("--trt-max-shapes", "--maxShapes"),
            )
        ):
            polygraphy += [poly_flag, *(f"{name}:[{_shape(s[position], ',')}]" for name, s in shapes.items())]
            if position == 0 and len(spec.profiles) > 1:
                cli += [f"--profile={index}"]
            cli += [f"{cli_flag}=" + ",".join(f"{name}:{_shape(s[position], 'x')}" for name, s in shapes.items())]
    # Polygraphy picks TensorRT-RTX (its `tensorrt_rtx` module) from this variable.
    prefix = "POLYGRAPHY_USE_TENSORRT_RTX=1 " if flavour.ahead_of_time else ""
    return {"polygraphy": prefix + shlex.join(polygraphy), "trtexec": shlex.join(cli)}


def _check_io(path: Path, built: BuiltEngine, graph: dict[str, Any]) -> None:
    """The network TensorRT parsed has the inputs and outputs the manifest promises the runtime."""
    expected = ([i["name"] for i in graph["inputs"]], [o["name"] for o in graph["outputs"]])
    if (built.network_inputs, built.network_outputs) != expected:
        raise EngineBuildError(
            f"{path}: TensorRT's network has inputs {built.network_inputs} and outputs {built.network_outputs}, "
            f"the manifest {expected[0]} and {expected[1]}"
        )


def native_projector(source: Path, engines_dir: Path) -> Path:
    """The projector with its MvlmPEG node rewritten as a native depthwise Conv + Add, saved in
    the engines directory (what the engine is built from, and what its command lines name)."""
    model = load_model(source)
    if peg_to_native(model) == 0:
        raise EngineBuildError(f"{source}: no MvlmPEG node to rewrite (was the optimize stage run?)")
    path = engines_dir / NATIVE_PROJECTOR
    save_model(model, path)
    return path


def build_engines(
    trt: ModuleType,
    flavour: Flavour,
    gpu: GpuInfo | None,
    artifacts: Path,
    engines_dir: Path,
    plugin_path: Path | None,
    target: Target,
    geometry: Geometry,
    settings: BuildSettings,
    plan: MemoryPlan,
    force: bool = False,
    progress: Progress = lambda msg: None,
) -> str:
    """Build the three engines and engines.json (what the runtime checks before loading).
    `plugin_path` None builds the projector's PEG natively (flavours that allow it). `gpu` is
    the GPU built on (None for an ahead-of-time build without one). Returns "ran", or
    "skipped (unchanged)" when engines.json records exactly these inputs and every engine file
    still has its recorded hash. The plugin library is hashed, then loaded, and only to build."""
    manifest = load_manifest(artifacts)
    if plugin_path is None and flavour.peg_plugin_required:
        raise EngineBuildError(f"{flavour.name}: the projector needs the PEG plugin library, and none was given")
    profiles = optimization_profiles(geometry, settings)
    builder_record = {
        "flavour": flavour.name,
        "module": flavour.module,
        "version": trt.__version__,
        "sm": target.sm,
        "compute_capability": sm_text(target.sm),
        "ahead_of_time": flavour.ahead_of_time,
    }
    for name in manifest.graphs:
        manifest.check_graph(artifacts, name)  # what TensorRT parses is what the manifest describes
    graphs = {name: graph["sha256"] for name, graph in manifest.graphs.items()}
    inputs = {
        "record": RECORD_VERSION,
        "onnx_sha256": graphs,
        "plugin_sha256": sha256_file(plugin_path) if plugin_path is not None else PEG_NATIVE,
        "builder": builder_record,
        "target": target.name,
        "settings": settings.__dict__,
        "profiles": profiles,
        "workspace": plan.workspace,
    }
    previous = read_engines_record(engines_dir)
    if (
        not force
        and previous is not None
        and previous.get("inputs_sha256") == digest(inputs)
        and not stale_engines(engines_dir, previous)  # a build killed before engines.json leaves new engines
    ):
        return "skipped (unchanged)"
    if plugin_path is not None:
        load_plugin_library(plugin_path, trt)  # after hashing it: engines.json names what was loaded
    engines_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = engines_dir / TIMING_CACHE if flavour.timing_cache else None
    engines = {}
    for name in ENGINE_GRAPHS:
        onnx_path = manifest.graph_path(artifacts, name)
        if name == "projector" and plugin_path is None:
            progress(f"projector: PEG as a native depthwise Conv ({NATIVE_PROJECTOR}; no plugin library)")
            onnx_path = native_projector(onnx_path, engines_dir)
        spec = EngineSpec(name, onnx_path, profiles[name], plan.workspace, target.sm)
        built = build_serialized_engine(trt, flavour, spec, timing_cache, progress)
        _check_io(spec.onnx_path, built, manifest.graphs[name])
        file = f"{name}.engine"
        write_bytes(engines_dir / file, built.data)
        engines[name] = {
            "file": file,
            "sha256": sha256_file(engines_dir / file),
            "bytes": len(built.data),
            "build_seconds": round(built.seconds, 2),
            "onnx": os.path.relpath(onnx_path, engines_dir),
            "onnx_sha256": sha256_graph(onnx_path),
            "graph_sha256": graphs[name],  # the artifacts' graph (the runtime checks it against their manifest)
            "precision": manifest.graphs[name]["dtype"],
            "profiles": profiles[name],
            "profile_indices": built.profile_indices,
            "inputs": manifest.graphs[name]["inputs"],
            "outputs": manifest.graphs[name]["outputs"],
            "commands": engine_commands(flavour, spec, engines_dir / file, plugin_path, timing_cache, engines_dir),
        }
    plugin = (
        {"mode": PEG_PLUGIN, "file": plugin_path.name, "sha256": inputs["plugin_sha256"]}
        if plugin_path is not None
        else {"mode": PEG_NATIVE, "graph": NATIVE_PROJECTOR}
    )
    write_engines_record(
        engines_dir,
        {
            "builder": builder_record,
            "gpu": {"name": gpu.name if gpu else None, "sm": target.sm},
            "target": target.name,
            "plugin": plugin,
            "settings": settings.__dict__,
            "max_batch": settings.batch,  # sequences one decode step takes: the runtime's cache slots
            "memory_plan": plan.to_json(),
            "engines": engines,
            "inputs_sha256": digest(inputs),
        },
    )
    return "ran"
