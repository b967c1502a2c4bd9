"""The bundle and the `build` orchestrator: golden -> export -> optimize -> quantize -> engines.

A bundle is what travels from the host to the target:
  artifacts/        the graphs, embedding table, tokenizer, manifest.json (reference/: the export)
  golden/           the golden tensors
  plugins/peg/      the PEG plugin's sources, built on the target
  recipe.yaml, bundle.json, BUILD_ON_TARGET.txt
  engines-<target>/ the engines and engines.json, once built

Two entry points: from a checkpoint on a host (all stages; the engines only where TensorRT
and a GPU of the target's SM are present), or from a bundle made elsewhere (the Jetson
workflow: export on x86, copy, build on the Orin). Stages whose inputs are unchanged are
skipped (content hashes in the manifest); `force` reruns them. Without TensorRT or the
right GPU, the output is a self-contained bundle and the exact command to run on the target.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mvlm_compile import __version__
from mvlm_compile.engine.plan import (
    BuildSettings,
    DecodeTraffic,
    Geometry,
    MemoryPlan,
    check_fits,
    decode_traffic,
    fit_batch,
    plan_memory,
)
from mvlm_compile.engines_record import ENGINES_MANIFEST
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.fileio import (
    check_output_dir,
    digest,
    directory_kind,
    directory_lock,
    safe_join,
    write_bytes,
    write_json,
    write_marker,
)
from mvlm_compile.manifest import (
    IN_PLACE_STAGES,
    MANIFEST_NAME,
    Manifest,
    keep_reference,
    load_manifest,
    restore_export,
)
from mvlm_compile.peg_op import PEG_DIR, PLUGIN_LIBRARY, chosen_plugin_library, find_plugin_library
from mvlm_compile.recipes import Recipe, Target, check_recipe_fits_artifacts, load_recipe, load_target, manifest_recipe
from mvlm_compile.trt_env import Flavour, import_flavour, query_gpu

ARTIFACTS_DIR = "artifacts"
GOLDEN_DIR = "golden"
BUNDLE_RECORD = "bundle.json"
BUNDLE_NOTE = "BUILD_ON_TARGET.txt"
HOST_STAGES = ".host-stages.json"  # what golden and export were made from
Progress = Callable[[str], None]


def resolve_artifacts(path: Path) -> tuple[Path, Path]:
    """(bundle, artifacts) for a bundle directory or a bare artifacts directory (then bundle = artifacts)."""
    path = Path(path)
    if (path / ARTIFACTS_DIR / MANIFEST_NAME).exists():
        return path, path / ARTIFACTS_DIR
    if (path / MANIFEST_NAME).exists():
        return path, path
    raise ArtifactError(
        f"{path}: neither a bundle ({ARTIFACTS_DIR}/{MANIFEST_NAME}) nor an artifacts directory ({MANIFEST_NAME})"
    )


def source_kind(path: Path) -> str:
    """What `build SOURCE` was given: "bundle" (or a bare artifacts directory) or "checkpoint"."""
    path = Path(path)
    if (path / ARTIFACTS_DIR / MANIFEST_NAME).exists() or (path / MANIFEST_NAME).exists():
        return "bundle"
    if (path / "config.json").exists():
        return "checkpoint"
    raise ArtifactError(
        f"{path}: neither a checkpoint (config.json) nor a bundle ({ARTIFACTS_DIR}/{MANIFEST_NAME}) "
        f"nor an artifacts directory ({MANIFEST_NAME})"
    )


def engines_dir_for(bundle: Path, target: str) -> Path:
    return Path(bundle) / f"engines-{target}"


def default_engines_dir(bundle: Path) -> Path:
    """The bundle's only engines-<target> directory, when there is exactly one."""
    found = sorted(Path(bundle).glob(f"engines-*/{ENGINES_MANIFEST}"))
    if len(found) != 1:
        raise MvlmError(
            f"--engines: {'no' if not found else len(found)} engines-<target>/{ENGINES_MANIFEST} in {bundle}; "
            "pass --engines DIR"
        )
    return found[0].parent


def open_bundle_backend(
    path: Path,
    backend: str,
    engines: Path | None = None,
    threads: int = 0,
    int4_activations: str = "fp32",
    plugin: Path | None = None,
    graphs: tuple[str, ...] | None = None,
):
    """runtime.backend.open_backend over a bundle or a bare artifacts directory (a context manager);
    TensorRT's engines default to the bundle's only engines-<target>/."""
    from mvlm_compile.runtime.backend import open_backend

    bundle, artifacts = resolve_artifacts(Path(path))
    if backend == "trt" and engines is None:
        engines = default_engines_dir(bundle)
    return open_backend(backend, artifacts, engines, threads, int4_activations, plugin, graphs)


def planned_batch(path: Path) -> int | None:
    """The decoder batch the bundle's memory plan chose for its target (bundle.json), if it has one."""
    record = Path(path) / BUNDLE_RECORD
    if not record.is_file():
        return None
    try:
        batch = json.loads(record.read_text())["settings"]["batch"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ArtifactError(f"{record}: not a readable bundle record (settings.batch)") from None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ArtifactError(f"{record}: settings.batch {batch!r}, expected a positive integer")
    return batch


@dataclass
class BuildResult:
    bundle: Path  # artifacts/, golden/, plugins/peg/ (+ engines-<target>/ when built)
    plan: MemoryPlan
    settings: BuildSettings
    engines_dir: Path | None = None  # None: deferred to the target
    deferred_reason: str = ""
    target_command: str = ""
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "skipped (unchanged)"
    traffic: DecodeTraffic | None = None  # bytes of a decode step on the TensorRT path, from the built graph


def _host_stages(
    checkpoint: Path, vision_tower: Path | None, bundle: Path, force: bool, progress: Progress
) -> dict[str, str]:
    """Golden tensors and export (need the host extra: torch, transformers)."""
    from mvlm_compile.export.exporter import export_artifacts
    from mvlm_compile.model.config import load_mobilevlm_config
    from mvlm_compile.model.golden import write_golden

    load_mobilevlm_config(checkpoint)  # fail fast on a wrong model, before any work
    ran = {}
    golden, artifacts = bundle / GOLDEN_DIR, bundle / ARTIFACTS_DIR
    key = digest(str(checkpoint), _checkpoint_stamp(checkpoint, vision_tower), __version__)
    stamp = bundle / HOST_STAGES
    previous = _read_stamp(stamp)
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
    _copy_plugin_sources(bundle)
    write_json(stamp, {"golden": key, "export": key})
    return ran


def _read_stamp(path: Path) -> dict:
    """The host stages' record; one that cannot be read is no record (the stages run again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _checkpoint_stamp(checkpoint: Path, vision_tower: Path | None) -> list:
    """Cheap identity of the checkpoint files (name, size, mtime): hashing GBs on every build is too slow."""
    files = [p for d in (checkpoint, vision_tower) if d for p in sorted(Path(d).iterdir()) if p.is_file()]
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _stage_is_current(manifest: Manifest, name: str, params: dict, on_disk: dict[str, str]) -> bool:
    """The stage ran with these params, and every later stage consumed exactly what it
    produced, up to the graphs now on disk (content hashes)."""
    record = manifest.stages.get(name, {})
    if record.get("params_sha256") != digest(params):
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


def _graph_stage(
    name: str, artifacts: Path, params: dict, run: Callable[[dict], object], force: bool, progress: Progress
) -> str:
    """Run an in-place graph stage unless it is current (see _stage_is_current). The stage writes
    `record` (its params and inputs; it adds its outputs) in the same manifest save that commits
    its graphs, so the manifest and the disk never disagree about what ran."""
    manifest = load_manifest(artifacts)
    before = manifest.graph_hashes(artifacts)
    if not force and _stage_is_current(manifest, name, params, before):
        return "skipped (unchanged)"
    progress(f"{name}: running")
    run({"params_sha256": digest(params), "inputs_sha256": before})
    return "ran"


def _target_commands(target: Target, bundle: Path) -> list[str]:
    """What to run on the target (TensorRT-RTX: on any x86-64 Linux host), standing in the
    directory that holds the copied bundle, paths quoted for the shell. The build command is
    always the second. The plugin is built from the bundle's sources into a new directory beside
    the bundle, and named with --plugin: mvlm-compile never loads a library found in a bundle (a
    build directory copied with it could hold one made elsewhere)."""
    name = f"./{bundle.name}" if bundle.name.startswith("-") else bundle.name  # never read as an option
    build = ["mvlm-compile", "build", name, "--target", target.name]
    if target.flavour.ahead_of_time:  # the plugin is optional there, and verifying needs the RTX GPU
        return ["pip install 'mvlm-compile[rtx]'", shlex.join(build)]
    plugin_build = f"{name}-peg-plugin"
    plugin = ["--plugin", f"{plugin_build}/{PLUGIN_LIBRARY}"]
    return [
        f"{shlex.join(['cmake', '-S', f'{name}/plugins/peg', '-B', plugin_build])} && "
        f"{shlex.join(['cmake', '--build', plugin_build, '-j'])}",
        shlex.join([*build, *plugin]),
        shlex.join(["mvlm-compile", "verify", name, "--golden", f"{name}/{GOLDEN_DIR}", "--backend", "trt", *plugin]),
    ]


def _copy_plugin_sources(bundle: Path) -> None:
    """The PEG plugin's sources, so the target builds the library itself. Files are updated in
    place: a plugins/peg/build/ made on the target is kept."""
    shutil.copytree(
        PEG_DIR, bundle / "plugins" / "peg", ignore=shutil.ignore_patterns("build", "__pycache__"), dirs_exist_ok=True
    )


def _write_bundle_record(
    bundle: Path, recipe: Recipe, target: Target, plan: MemoryPlan, settings: BuildSettings, reason: str
) -> str:
    """recipe.yaml, bundle.json and BUILD_ON_TARGET.txt; returns the build command for the target."""
    if not (bundle / "recipe.yaml").exists() or recipe.path.resolve() != (bundle / "recipe.yaml").resolve():
        write_bytes(bundle / "recipe.yaml", recipe.path.read_bytes())
    commands = _target_commands(target, bundle)
    write_json(
        bundle / BUNDLE_RECORD,
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
    where = (
        "On any x86-64 Linux machine (TensorRT for RTX builds ahead of time: no GPU needed),\n"
        if target.flavour.ahead_of_time
        else "On the target (JetPack 6.1/6.2: TensorRT 10.3 from the system packages; CUDA in /usr/local/cuda),\n"
    )
    write_bytes(
        bundle / BUNDLE_NOTE,
        (
            f"Engines for {target.name} (SM {target.sm}) were not built where this bundle was made:\n  {reason}\n\n"
            + where
            + f"with mvlm-compile installed, in the directory that holds {bundle.name}/:\n"
            + "".join(f"  {c}\n" for c in commands)
        ).encode(),
    )
    return commands[1]


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
    plugin: Path | None = None,
) -> BuildResult:
    """Run every stage into `bundle` (see the module docstring), its only writer while it runs.

    From a checkpoint, `bundle` must be new, empty or a bundle we made, and neither the
    checkpoint nor one of its parents. `plugin`: the PEG plugin library to build the projector
    with (--plugin; else $MVLM_PEG_PLUGIN or this installation's build, see _check_plugin_choice)."""
    bundle = Path(bundle)
    if checkpoint is not None:  # a wrong or absurd config is refused before anything is written
        from mvlm_compile.model.config import load_mobilevlm_config
        from mvlm_compile.recipes import check_recipe_fits_checkpoint

        config = load_mobilevlm_config(checkpoint)
        if recipe_name is not None:
            check_recipe_fits_checkpoint(load_recipe(recipe_name), config)
    if checkpoint is not None:
        check_output_dir(bundle, "bundle", inputs=[checkpoint, vision_tower])
        bundle.mkdir(parents=True, exist_ok=True)
    else:
        bundle = resolve_artifacts(bundle)[0]
    with directory_lock(bundle):
        if checkpoint is not None:
            check_output_dir(bundle, "bundle", inputs=[checkpoint, vision_tower])  # now that no one else writes
            if directory_kind(bundle) != "bundle":
                write_marker(bundle, "bundle")
        return _build_locked(
            target_name, bundle, checkpoint, vision_tower, recipe_name, context, batch, force, progress, plugin
        )


def _build_locked(
    target_name: str,
    bundle: Path,
    checkpoint: Path | None = None,
    vision_tower: Path | None = None,
    recipe_name: str | None = None,
    context: int | None = None,
    batch: int | None = None,
    force: bool = False,
    progress: Progress = lambda msg: None,
    plugin_option: Path | None = None,
) -> BuildResult:
    from mvlm_compile.quantize import QuantizeSettings, quantize_artifacts
    from mvlm_compile.quantize.calibration import spec_for_recipe
    from mvlm_compile.surgery import optimize_artifacts

    target = load_target(target_name)
    plugin = chosen_plugin_library(plugin_option)  # a wrong explicit choice fails before any work
    stages: dict[str, str] = {}
    if checkpoint is not None:
        stages.update(_host_stages(Path(checkpoint), vision_tower, Path(bundle), force, progress))
    bundle, artifacts = resolve_artifacts(Path(bundle))
    manifest = load_manifest(artifacts)
    # --recipe, else the recipe name the manifest records, else the bundle's own recipe.yaml.
    recipe = load_recipe(recipe_name) if recipe_name else manifest_recipe(manifest, artifacts / MANIFEST_NAME)
    if recipe is None and (bundle / "recipe.yaml").exists():
        recipe = load_recipe(safe_join(bundle, "recipe.yaml", bundle / BUNDLE_RECORD))
    if recipe is None:
        raise MvlmError(f"{artifacts / MANIFEST_NAME}: no recipe matches this model; pass --recipe NAME|PATH")
    check_recipe_fits_artifacts(recipe, manifest.model, artifacts / MANIFEST_NAME)
    settings = BuildSettings.resolve(recipe, target, int(manifest.model["max_context"]), context, batch)
    geometry = Geometry.from_recipe_and_manifest(recipe, manifest.model)
    if batch is None:
        settings = fit_batch(geometry, recipe, target, settings)
    plan = plan_memory(geometry, recipe, target, settings)
    check_fits(plan, target, recipe)

    keep_reference(artifacts)
    redo_graphs = force
    if force and not restore_export(artifacts):
        redo_graphs = False  # the rewritten graphs cannot be rewritten again (INT4 twice): kept unless stale
        progress(f"--force: {artifacts / 'reference'} holds no export to redo optimize and quantize from; kept")
    stages["optimize"] = _graph_stage(
        "optimize",
        artifacts,
        {},
        lambda record: optimize_artifacts(artifacts, progress=progress, stage_record=record),
        redo_graphs,
        progress,
    )
    quantize = QuantizeSettings.resolve(recipe)
    calibration = spec_for_recipe(recipe)  # a task model calibrates on its own train split
    stages["quantize"] = _graph_stage(
        "quantize",
        artifacts,
        {**quantize.to_json(), "calibration": calibration.describe()},
        lambda record: quantize_artifacts(artifacts, quantize, calibration, progress=progress, stage_record=record),
        redo_graphs,
        progress,
    )

    traffic = decode_traffic(manifest.graph_path(artifacts, "decoder"), geometry)
    flavour = target.flavour
    trt, why = import_flavour(flavour)
    gpu = query_gpu() if trt is not None and not flavour.ahead_of_time else None
    if trt is not None and not flavour.ahead_of_time:  # TensorRT builds for the GPU it runs on
        if gpu is None:
            why = "no CUDA GPU is visible"
        elif gpu.sm != target.sm:
            why = f"this GPU ({gpu.name}, SM {gpu.sm}) is not the target's (SM {target.sm}): engines are not portable"
    if why:
        command = _write_bundle_record(bundle, recipe, target, plan, settings, why)
        return BuildResult(
            bundle, plan, settings, deferred_reason=why, target_command=command, stages=stages, traffic=traffic
        )

    from mvlm_compile.engine.builder import build_engines

    engines_dir = engines_dir_for(bundle, target.name)
    _check_plugin_choice(flavour, bundle, plugin, progress)
    stages["engines"] = build_engines(
        trt, flavour, gpu, artifacts, engines_dir, plugin, target, geometry, settings, plan, force, progress
    )
    return BuildResult(bundle, plan, settings, engines_dir=engines_dir, stages=stages, traffic=traffic)


def _check_plugin_choice(flavour: Flavour, bundle: Path, plugin: Path | None, progress: Progress) -> None:
    """`plugin` is the library the user chose (--plugin, $MVLM_PEG_PLUGIN) or this installation
    built (peg_op.chosen_plugin_library). None builds the projector's PEG as a native Conv, where
    the flavour allows that. A library inside the bundle (plugins/peg/build/) is never taken by
    itself: the bundle may come from another machine, and loading a library runs its code."""
    in_bundle = bundle / "plugins" / "peg" / "build" / PLUGIN_LIBRARY
    if plugin is None and (in_bundle.is_file() or in_bundle.is_symlink()):
        progress(f"{in_bundle}: not loaded (a library inside a bundle is used only when named with --plugin)")
    if plugin is None and flavour.peg_plugin_required:
        find_plugin_library()  # raises: where it looked, and how to build the library or name one
