"""`build --target`: export -> optimize -> quantize -> engines -> verify, as the recipe says.

Two entry points: from a checkpoint on a host (all stages; the engines only where TensorRT
and a GPU of the target's SM are present), or from a bundle made elsewhere (the Jetson
workflow: export on x86, copy, build on the Orin). Stages whose inputs are unchanged are
skipped (content hashes in the manifest); `force` reruns them. Without TensorRT or the
right GPU, the output is a self-contained bundle and the exact command to run on the target.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mvlm_compile import __version__
from mvlm_compile.build.engines import EngineSpec, build_serialized_engine, import_tensorrt
from mvlm_compile.build.gpu import query_gpu
from mvlm_compile.build.plan import BuildSettings, Geometry, MemoryPlan, check_fits, optimization_profiles, plan_memory
from mvlm_compile.build.plugin import PEG_DIR, find_plugin_library, load_plugin_library
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.fileio import sha256_file, write_bytes, write_json
from mvlm_compile.manifest import MANIFEST_NAME, Manifest, keep_reference, load_manifest
from mvlm_compile.recipes import Recipe, Target, load_recipe, load_target

ENGINES_MANIFEST = "engines.json"
BUNDLE_NOTE = "BUILD_ON_TARGET.txt"
GRAPHS = ("vision", "projector", "decoder")
Progress = Callable[[str], None]


@dataclass
class BuildResult:
    bundle: Path  # artifacts/, golden/, plugins/peg/ (+ engines-<target>/ when built)
    plan: MemoryPlan
    settings: BuildSettings
    engines_dir: Path | None = None  # None: deferred to the target
    deferred_reason: str = ""
    target_command: str = ""
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "skipped (unchanged)"


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _graph_hashes(artifacts: Path, manifest: Manifest) -> dict[str, str]:
    return {name: sha256_file(manifest.graph_path(artifacts, name)) for name in manifest.graphs}


def _host_stages(checkpoint: Path, vision_tower: Path | None, bundle: Path, force: bool, progress: Progress) -> dict[str, str]:
    """Golden tensors and export (need the host extra: torch, transformers)."""
    from mvlm_compile.export.exporter import export_artifacts
    from mvlm_compile.model.config import load_mobilevlm_config
    from mvlm_compile.model.golden import write_golden

    load_mobilevlm_config(checkpoint)  # fail fast on a wrong model, before any work
    ran = {}
    golden, artifacts = bundle / "golden", bundle / "artifacts"
    key = _digest(str(checkpoint), _checkpoint_stamp(checkpoint, vision_tower), __version__)
    stamp = bundle / ".host-stages.json"
    previous = json.loads(stamp.read_text()) if stamp.exists() else {}
    if force or previous.get("golden") != key or not (golden / MANIFEST_NAME).exists():
        progress("golden: running the FP32 reference")
        write_golden(checkpoint, golden, vision_tower=vision_tower)
        ran["golden"] = "ran"
    else:
        ran["golden"] = "skipped (unchanged)"
    if force or previous.get("export") != key or not (artifacts / MANIFEST_NAME).exists():
        # FP16: TensorRT builds strongly typed networks, so the decoder's activations must be
        # FP16 in the graph itself (the INT4 scales take the graph's float type).
        progress("export: ONNX graphs in FP16")
        export_artifacts(checkpoint, artifacts, vision_tower=vision_tower, dtype="fp16", progress=progress)
        ran["export"] = "ran"
    else:
        ran["export"] = "skipped (unchanged)"
    write_json(stamp, {"golden": key, "export": key})
    return ran


def _checkpoint_stamp(checkpoint: Path, vision_tower: Path | None) -> list:
    """Cheap identity of the checkpoint files (name, size, mtime): hashing GBs on every build is too slow."""
    files = [p for d in (checkpoint, vision_tower) if d for p in sorted(Path(d).iterdir()) if p.is_file()]
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


IN_PLACE_STAGES = ("optimize", "quantize")  # rewrite the artifacts' graphs, in this order


def _stage_is_current(manifest: Manifest, name: str, params: dict, on_disk: dict[str, str]) -> bool:
    """The stage ran with these params, and every later stage consumed exactly what it
    produced, up to the graphs now on disk (content hashes)."""
    record = manifest.stages.get(name, {})
    if record.get("params_sha256") != _digest(params):
        return False
    produced = record.get("outputs_sha256")
    for later in IN_PLACE_STAGES[IN_PLACE_STAGES.index(name) + 1 :]:
        later_record = manifest.stages.get(later, {})
        if "inputs_sha256" not in later_record:
            break
        if later_record["inputs_sha256"] != produced:
            return False
        produced = later_record.get("outputs_sha256")
    return produced == on_disk


def _graph_stage(name: str, artifacts: Path, params: dict, run: Callable[[], None], force: bool, progress: Progress) -> str:
    """Run an in-place graph stage unless it is current (see _stage_is_current)."""
    manifest = load_manifest(artifacts)
    before = _graph_hashes(artifacts, manifest)
    if not force and _stage_is_current(manifest, name, params, before):
        return "skipped (unchanged)"
    progress(f"{name}: running")
    run()
    manifest = load_manifest(artifacts)
    manifest.stages.setdefault(name, {})
    manifest.stages[name]["params_sha256"] = _digest(params)
    manifest.stages[name]["inputs_sha256"] = before
    manifest.stages[name]["outputs_sha256"] = _graph_hashes(artifacts, manifest)
    manifest.save(artifacts)
    return "ran"


def _target_command(target: Target, bundle: Path) -> str:
    return f"mvlm-compile build --target {target.name} {bundle.name}   # in the copied bundle's parent directory"


def _write_bundle_extras(bundle: Path, recipe: Recipe, target: Target, plan: MemoryPlan, settings: BuildSettings, reason: str) -> str:
    """Plugin sources and the recipe go into the bundle so the target needs nothing else from this host."""
    plugin_copy = bundle / "plugins" / "peg"
    shutil.rmtree(plugin_copy, ignore_errors=True)
    shutil.copytree(PEG_DIR, plugin_copy, ignore=shutil.ignore_patterns("build", "__pycache__"))
    shutil.copy2(recipe.path, bundle / "recipe.yaml")
    command = _target_command(target, bundle)
    write_json(
        bundle / "bundle.json",
        {
            "kind": "mvlm-compile bundle",
            "mvlm_compile_version": __version__,
            "recipe": recipe.name,
            "target": target.name,
            "settings": settings.__dict__,
            "memory_plan": plan.to_json(),
            "engines_deferred_because": reason,
        },
    )
    (bundle / BUNDLE_NOTE).write_text(
        f"Engines for {target.name} (SM {target.sm}) were not built where this bundle was made:\n  {reason}\n\n"
        "On the target (JetPack 6.1/6.2: TensorRT 10.3 from the system packages), with mvlm-compile installed:\n"
        "  make plugin        # or: cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build -j\n"
        f"  {command}\n"
    )
    return command


def _resolve_bundle(path: Path) -> tuple[Path, Path]:
    """(bundle, artifacts) for a bundle directory or a bare artifacts directory."""
    path = Path(path)
    if (path / "artifacts" / MANIFEST_NAME).exists():
        return path, path / "artifacts"
    if (path / MANIFEST_NAME).exists():
        return path, path
    raise ArtifactError(f"{path}: neither a bundle (artifacts/{MANIFEST_NAME}) nor an artifacts directory ({MANIFEST_NAME})")


def build(
    target_name: str,
    bundle: Path,
    checkpoint: Path | None = None,
    vision_tower: Path | None = None,
    recipe_name: str | None = None,
    context: int | None = None,
    batch: int | None = None,
    force: bool = False,
    progress: Progress = lambda msg: None,
) -> BuildResult:
    """Run every stage into `bundle`; see the module docstring."""
    from mvlm_compile.quantize import quantize_artifacts
    from mvlm_compile.surgery import optimize_artifacts

    target = load_target(target_name)
    stages: dict[str, str] = {}
    if checkpoint is not None:
        stages.update(_host_stages(Path(checkpoint), vision_tower, Path(bundle), force, progress))
    bundle, artifacts = _resolve_bundle(Path(bundle))
    manifest = load_manifest(artifacts)
    recipe_ref = recipe_name or manifest.model.get("recipe") or (bundle / "recipe.yaml" if (bundle / "recipe.yaml").exists() else None)
    if recipe_ref is None:
        raise MvlmError(f"{artifacts / MANIFEST_NAME}: no recipe matches this model; pass --recipe NAME|PATH")
    recipe = load_recipe(recipe_ref)
    settings = BuildSettings.resolve(recipe, target, int(manifest.model["max_context"]), context, batch)
    geometry = Geometry.from_recipe_and_manifest(recipe, manifest.model)
    plan = plan_memory(geometry, recipe, target, settings)
    check_fits(plan, target, recipe)

    keep_reference(artifacts)
    stages["optimize"] = _graph_stage("optimize", artifacts, {}, lambda: optimize_artifacts(artifacts, progress=progress), force, progress)
    decoder = recipe.precision["decoder"]
    quantize_params = {
        "decoder": decoder["weights"],
        "method": decoder["method"],
        "group_size": decoder["group_size"],
        "keep_fp16": decoder.get("keep_fp16", []),
    }
    stages["quantize"] = _graph_stage(
        "quantize",
        artifacts,
        quantize_params,
        lambda: quantize_artifacts(artifacts, progress=progress, **quantize_params),
        force,
        progress,
    )

    trt, why = import_tensorrt()
    gpu = query_gpu() if trt is not None else None
    if trt is not None and gpu is None:
        why = "no CUDA GPU is visible"
    elif gpu is not None and gpu.sm != target.sm:
        why = f"this GPU ({gpu.name}, SM {gpu.sm}) is not the target's (SM {target.sm}): engines are not portable"
    if why:
        command = _write_bundle_extras(bundle, recipe, target, plan, settings, why)
        return BuildResult(bundle, plan, settings, deferred_reason=why, target_command=command, stages=stages)

    engines_dir = bundle / f"engines-{target.name}"
    stages["engines"] = build_engines(trt, gpu, artifacts, engines_dir, target, geometry, settings, plan, force, progress)
    return BuildResult(bundle, plan, settings, engines_dir=engines_dir, stages=stages)


def build_engines(trt, gpu, artifacts: Path, engines_dir: Path, target: Target, geometry: Geometry, settings: BuildSettings, plan: MemoryPlan, force: bool, progress: Progress) -> str:
    """Build the three engines and engines.json (what the runtime checks before loading)."""
    manifest = load_manifest(artifacts)
    plugin_path = find_plugin_library([artifacts.parent / "plugins" / "peg" / "build"])
    load_plugin_library(plugin_path, trt)
    profiles = optimization_profiles(geometry, settings)
    inputs = {
        "onnx_sha256": _graph_hashes(artifacts, manifest),
        "plugin_sha256": sha256_file(plugin_path),
        "tensorrt": trt.__version__,
        "gpu_sm": gpu.sm,
        "target": target.name,
        "settings": settings.__dict__,
        "profiles": profiles,
        "workspace": plan.workspace,
    }
    record_path = engines_dir / ENGINES_MANIFEST
    if not force and record_path.exists() and json.loads(record_path.read_text()).get("inputs_sha256") == _digest(inputs):
        return "skipped (unchanged)"
    engines_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = engines_dir / "timing.cache"
    engines = {}
    for name in GRAPHS:
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
    write_json(
        record_path,
        {
            "kind": "mvlm-compile engines",
            "mvlm_compile_version": __version__,
            "tensorrt_version": trt.__version__,
            "gpu": {"name": gpu.name, "sm": gpu.sm},
            "target": target.name,
            "plugin": {"file": plugin_path.name, "sha256": inputs["plugin_sha256"]},
            "settings": settings.__dict__,
            "memory_plan": plan.to_json(),
            "engines": engines,
            "inputs_sha256": _digest(inputs),
        },
    )
    return "ran"
