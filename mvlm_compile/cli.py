"""`mvlm-compile`: a thin click layer over the Python API.

Stage modules are imported inside the commands so that `--help` and the Jetson-side
commands never import torch or transformers. Every command that takes ARTIFACTS accepts an
artifacts directory or a bundle; `--json` prints JSON to stdout; `--report FILE` writes a file.
Errors are click exceptions carrying their exit status (mvlm_compile.errors).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import click

from mvlm_compile.errors import EnginesDeferred, InternalError, Interrupted, MvlmError, NumericalFailure
from mvlm_compile.runtime.scheduler import DEFAULT_PREFILL_CHUNK

EXIT_STATUS_HELP = """Exit status: 0 success; 1 numerical failure (verify); 2 usage or input error;
3 engines not built here (bundle prepared for the target); 4 internal error (see --debug);
130 interrupted."""


class PipelineGroup(click.Group):
    """Commands listed in pipeline order; unexpected exceptions become one-line errors."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise Interrupted(f"mvlm-compile {ctx.invoked_subcommand}") from None
        except OSError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise MvlmError(_os_error_line(e)) from None
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise InternalError(
                f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno}; "
                "rerun with --debug for the traceback and report it)"
            ) from None


def _os_error_line(e: OSError) -> str:
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system"}.get(
        e.errno, e.strerror or str(e)
    )
    # A copy that fills the disk names its source first and its destination second: name what did not fit.
    name = e.filename2 if e.errno == errno.ENOSPC and e.filename2 else e.filename
    return f"{name}: {what}" if name else what


def _quiet_libraries() -> None:
    """Keep library chatter (transformers' config notices, Polygraphy's [I] lines) off the console."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def _echo_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    from mvlm_compile.table import render_table

    click.echo(render_table(header, rows))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _progress(stage: str):
    return lambda message: click.echo(f"[{stage}] {message}", err=True)


def _check_report(report: Path | None, *inputs: Path, junit: bool = False) -> None:
    """--report must be a file outside the command's inputs (a report never overwrites what it
    reports on) that may be written (fileio.check_user_file: never a symbolic link). With `junit`
    (verify), the JUnit XML beside it (_junit_path) is held to the same rules."""
    if report is None:
        return
    from mvlm_compile.fileio import check_user_file

    paths = [report]
    if junit:
        if report.suffix == ".xml":
            raise MvlmError(
                f"--report {report}: the report is JSON, and the JUnit XML goes beside it as .xml: name it .json"
            )
        paths += [p for p in [_junit_path(report)] if p is not None]
    for path in paths:
        check_user_file(path, "--report")
        for source in inputs:
            if path.resolve().is_relative_to(Path(source).resolve()):
                raise MvlmError(f"--report {report}: {path} is inside the input {source}; write it elsewhere")


def _junit_path(report: Path) -> Path | None:
    """verify's JUnit XML, beside a report that is a regular file (or new); none beside a device or
    a pipe (`--report /dev/null` writes no /dev/null.xml)."""
    from mvlm_compile.fileio import is_regular_or_new

    return report.with_suffix(".xml") if is_regular_or_new(report) else None


def _write_report(report: Path, data: Any) -> None:
    from mvlm_compile.fileio import write_user_file

    write_user_file(report, (json.dumps(data, indent=2) + "\n").encode(), "--report")


def _artifacts_of(path: Path) -> tuple[Path, Path]:
    """(bundle, artifacts) for ARTIFACTS: a bundle or a bare artifacts directory."""
    from mvlm_compile.bundle import resolve_artifacts

    return resolve_artifacts(path)


@click.group(cls=PipelineGroup, epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="mvlm-compile", prog_name="mvlm-compile")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile MobileVLM V2 checkpoints to ONNX and TensorRT engines for Jetson Orin."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "mobilevlm-v2-1.7b", "mobilevlm-v2-3b"]), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint directory to write.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Default: fp32 for tiny, fp16 otherwise."
)
@click.option(
    "--clip-out",
    type=click.Path(path_type=Path),
    default=None,
    help="Put the vision tower in a separate CLIP checkpoint directory (like openai/clip-vit-large-patch14-336) "
    "instead of inside the checkpoint.",
)
def synth(preset: str, out: Path, seed: int, dtype: str | None, clip_out: Path | None) -> None:
    """Write a random-weight checkpoint in the published MobileVLM V2 layout."""
    from mvlm_compile.model.synth import write_synthetic_checkpoint

    count = 0
    interactive = sys.stderr.isatty()

    def progress(name: str) -> None:
        nonlocal count
        count += 1
        if interactive:
            click.echo(f"\r[synth] {count} tensors: {name[:60]:<60}", nl=False, err=True)

    write_synthetic_checkpoint(preset, out, seed=seed, dtype=dtype, clip_out=clip_out, progress=progress)
    if interactive:
        click.echo("", err=True)
    click.echo(
        f"wrote {preset} checkpoint (seed {seed}) to {out}" + (f", vision tower to {clip_out}" if clip_out else "")
    )


_checkpoint_option = click.option(
    "--checkpoint", type=click.Path(path_type=Path), required=True, help="MobileVLM V2 checkpoint directory."
)
_vision_tower_option = click.option(
    "--vision-tower",
    type=click.Path(path_type=Path),
    default=None,
    help="CLIP ViT-L/14-336 checkpoint directory, when the checkpoint has no vision weights.",
)
_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout instead of a table."
)


@cli.command()
@_checkpoint_option
@_vision_tower_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Golden directory to write.")
@_json_option
def golden(checkpoint: Path, vision_tower: Path | None, out: Path, as_json: bool) -> None:
    """Run the FP32 PyTorch reference on fixed inputs and write golden tensors (Polygraphy JSON)."""
    _quiet_libraries()
    from mvlm_compile.contract import COMPONENTS
    from mvlm_compile.model.golden import write_golden
    from mvlm_compile.verify.golden_io import load_component

    manifest = write_golden(checkpoint, out, vision_tower=vision_tower)
    if as_json:
        _echo_json(manifest)
        return
    rows = []
    for component in COMPONENTS:
        feed, outputs = load_component(out, component)
        first_in, first_out = next(iter(feed)), next(iter(outputs))
        rows.append((component, first_in, list(feed[first_in].shape), first_out, list(outputs[first_out].shape)))
    _echo_table(("component", "first input", "shape", "first output", "shape"), rows)
    click.echo(f"wrote golden tensors to {out} (checkpoint {manifest['checkpoint']['fingerprint_sha256'][:12]})")


@cli.command()
@_checkpoint_option
@_vision_tower_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Artifacts directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--golden",
    type=click.Path(path_type=Path),
    default=None,
    help="Check the graphs in ONNX Runtime against this golden directory.",
)
@_json_option
def export(
    checkpoint: Path, vision_tower: Path | None, out: Path, dtype: str, golden: Path | None, as_json: bool
) -> None:
    """Export vision.onnx, projector.onnx and decoder.onnx (+ embedding table, tokenizer, manifest)."""
    _quiet_libraries()
    from mvlm_compile.export.exporter import export_artifacts

    manifest = export_artifacts(checkpoint, out, vision_tower=vision_tower, dtype=dtype, progress=_progress("export"))
    checks = _golden_checks(out, golden) if golden is not None else []
    if as_json:
        _echo_json({"artifacts": str(out), "graphs": manifest.graphs, "golden_checks": [c.to_json() for c in checks]})
    else:
        rows = [
            (name, g["file"], g["dtype"], ", ".join(i["name"] for i in g["inputs"][:3]))
            for name, g in manifest.graphs.items()
        ]
        _echo_table(("graph", "file", "dtype", "inputs"), rows)
        click.echo(f"wrote {out} in {manifest.stages['export']['seconds']} s")
        if checks:
            _echo_table(
                ("component", "output", "max abs", "err/scale", "cosine", "result"),
                [
                    (
                        c.component,
                        c.output,
                        f"{c.metrics['max_abs']:.3g}",
                        f"{c.metrics['rel_to_scale']:.3g}",
                        f"{c.metrics['cosine']:.7f}",
                        "ok" if c.passed else "FAIL",
                    )
                    for c in checks
                ],
            )
    if not all(c.passed for c in checks):
        raise NumericalFailure(f"{out}: outputs differ from the golden tensors in {golden} beyond tolerance")


def _golden_checks(artifacts: Path, golden: Path) -> list:
    from mvlm_compile.runtime.backend import open_backend
    from mvlm_compile.verify.components import check_components

    with open_backend("ort", artifacts) as backend:
        return check_components(backend, golden)


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--allow-missing",
    "allow_missing",
    multiple=True,
    metavar="PASS",
    help="Report PASS as skipped when its pattern is not in the graph, instead of failing (repeatable).",
)
@_json_option
def optimize(artifacts: Path, allow_missing: tuple[str, ...], as_json: bool) -> None:
    """Rewrite the graphs in place: PEG plugin node, LDPv2 pool-first, constant folding and clean-ups."""
    _quiet_libraries()
    from mvlm_compile.manifest import keep_reference
    from mvlm_compile.surgery import optimize_artifacts
    from mvlm_compile.surgery.optimize import ROW_HEADER

    _, artifacts = _artifacts_of(artifacts)
    keep_reference(artifacts)
    report = optimize_artifacts(artifacts, allow_missing=allow_missing, progress=_progress("optimize"))
    if as_json:
        _echo_json(report.to_json())
        return
    _echo_table(ROW_HEADER, report.rows())
    click.echo(f"optimized {artifacts}" if report.changed else f"{artifacts}: already optimized, nothing changed")


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option(
    "--decoder",
    type=click.Choice(["int4"]),
    default=None,
    help="Decoder weight precision. Default: the recipe's (int4).",
)
@click.option(
    "--method", type=click.Choice(["awq", "rtn"]), default=None, help="INT4 method. Default: the recipe's (awq)."
)
@click.option(
    "--group-size",
    type=int,
    default=None,
    help="INT4 scale group along the input dimension. Default: the recipe's (128; tiny 32). "
    "256 decodes ~1.35x faster in ONNX Runtime on x86 CPUs; check its accuracy (docs: Performance).",
)
@click.option(
    "--keep",
    multiple=True,
    help="A Linear kept unquantized, e.g. lm_head (repeatable). Default: the recipe's keep_fp16.",
)
@click.option(
    "--lm-head",
    type=click.Choice(["fp16", "int8"]),
    default=None,
    help="lm_head (kept out of INT4): as exported, or weight-only INT8 per output channel. Default: fp16.",
)
@click.option(
    "--calib-images",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Directory of calibration images instead of the built-in ones (AWQ).",
)
@click.option(
    "--golden",
    type=click.Path(path_type=Path),
    default=None,
    help="Then report accuracy against this golden directory.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the quantized artifacts here; default: in place (the export stays in ARTIFACTS/reference).",
)
@_json_option
def quantize(
    artifacts: Path,
    decoder: str | None,
    method: str | None,
    group_size: int | None,
    keep: tuple[str, ...],
    lm_head: str | None,
    calib_images: Path | None,
    golden: Path | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """INT4 weight-only decoder (AWQ or RTN) and FP16 vision/projector; with --golden, an accuracy report."""
    _quiet_libraries()
    from mvlm_compile.manifest import MANIFEST_NAME, REFERENCE_DIR, keep_reference, load_manifest
    from mvlm_compile.quantize import quantize_artifacts, resolve_settings
    from mvlm_compile.quantize.calibration import CalibrationSpec

    _, artifacts = _artifacts_of(artifacts)
    settings = resolve_settings(
        load_manifest(artifacts),
        decoder=decoder,
        method=method,
        group_size=group_size,
        keep_fp16=keep or None,
        lm_head=lm_head,
    )
    if out is None:
        keep_reference(artifacts)
    report = quantize_artifacts(
        artifacts,
        settings,
        calibration=CalibrationSpec(images=calib_images) if calib_images else None,
        out=out,
        progress=_progress("quantize"),
    )
    accuracy = None
    if golden is not None:
        from mvlm_compile.verify.accuracy import accuracy_table, evaluate_artifacts

        kept = artifacts / REFERENCE_DIR  # none when the graphs were rewritten before it was kept
        reference = artifacts if out is not None else kept if (kept / MANIFEST_NAME).exists() else None
        accuracy = evaluate_artifacts(Path(report.artifacts), golden, reference, _progress("accuracy"))
    if as_json:
        _echo_json({"quantize": report.to_json(), "accuracy": accuracy})
    else:
        click.echo(report.table())
        if accuracy is not None:
            click.echo(accuracy_table(accuracy))
    if accuracy and not all(c.get("passed", True) for c in accuracy["components"].values()):
        raise NumericalFailure(
            f"{report.artifacts}: outputs differ from the golden tensors in {golden} beyond tolerance"
        )


_plugin_option = click.option(
    "--plugin",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="The PEG plugin library (libmvlm_peg_plugin.so) for TensorRT. Default: $MVLM_PEG_PLUGIN, else this "
    "installation's plugins/peg/build (make plugin); a library inside a bundle is loaded only when named here.",
)


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--target",
    required=True,
    help="Target profile (recipes/targets/targets.yaml), e.g. orin-agx-64gb, orin-nano-8gb, x86-sm89.",
)
@_vision_tower_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Bundle directory to write (when SOURCE is a checkpoint).",
)
@click.option("--recipe", default=None, help="Recipe name or YAML path (default: the one matching the model).")
@click.option(
    "--context", type=click.IntRange(min=2), default=None, help="Context length (default: target, then recipe)."
)
@click.option(
    "--max-batch",
    "--batch",
    "batch",
    type=click.IntRange(min=1),
    default=None,
    help="Sequences the decoder engine decodes together, one KV-cache slot each at the full context "
    "(default: the most, up to 8, that the target's memory plan holds).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Rerun every stage even when its inputs are unchanged (optimize and quantize from the export "
    "kept in artifacts/reference/).",
)
@_plugin_option
@_json_option
def build(
    source: Path,
    target: str,
    vision_tower: Path | None,
    out: Path | None,
    recipe: str | None,
    context: int | None,
    batch: int | None,
    force: bool,
    plugin: Path | None,
    as_json: bool,
) -> None:
    """SOURCE (a checkpoint or a bundle) -> golden, export, optimize, quantize -> TensorRT engines.

    On the host: `build CHECKPOINT --target T --out BUNDLE`. On the target, from a bundle made
    elsewhere: `build BUNDLE --target T`. Without TensorRT or a GPU of the target's SM, the
    bundle is prepared and the command for the target is printed (exit 3).
    """
    from mvlm_compile.bundle import build as run_build
    from mvlm_compile.bundle import source_kind

    kind = source_kind(source)
    if kind == "checkpoint" and out is None:
        raise click.UsageError(f"SOURCE {source} is a checkpoint: give --out BUNDLE")
    if kind == "bundle" and out is not None:
        raise click.UsageError(f"SOURCE {source} is a bundle: it is built in place, drop --out")
    _quiet_libraries()
    result = run_build(
        target,
        out or source,
        checkpoint=source if kind == "checkpoint" else None,
        vision_tower=vision_tower,
        recipe_name=recipe,
        context=context,
        batch=batch,
        force=force,
        progress=_progress("build"),
        plugin=plugin,
    )
    summary = {
        "bundle": str(result.bundle),
        "stages": result.stages,
        "settings": result.settings.__dict__,
        "memory_plan": result.plan.to_json(),
        "decode_traffic": result.traffic.to_json() if result.traffic else None,
        "engines_dir": str(result.engines_dir) if result.engines_dir else None,
        "deferred_reason": result.deferred_reason,
        "target_command": result.target_command,
    }
    if as_json:
        _echo_json(summary)
    else:
        _echo_table(("stage", "result"), list(result.stages.items()))
        click.echo(result.plan.table())
        if result.traffic is not None:
            click.echo(result.traffic.table())
    if result.engines_dir is None:
        raise EnginesDeferred(
            f"engines not built here: {result.deferred_reason}\n"
            f"bundle ready: {result.bundle}; copy it to the target and follow its BUILD_ON_TARGET.txt, "
            f"which builds with:\n  {result.target_command}"
        )
    if not as_json:  # stdout is the JSON document alone
        click.echo(f"engines in {result.engines_dir}")


def _check_threads(ctx: click.Context, param: click.Parameter, threads: int) -> int:
    from mvlm_compile.runtime.ort_backend import check_threads

    return check_threads(threads)  # before any file is read


def _backend_options(fn):
    fn = _plugin_option(fn)
    fn = click.option(
        "--threads",
        type=int,
        default=0,
        show_default=True,
        callback=_check_threads,
        help="ONNX Runtime threads (0: its default, one per core; at most 4 per usable core).",
    )(fn)
    fn = click.option(
        "--engines",
        type=click.Path(path_type=Path),
        default=None,
        help="Engines directory (trt; default: the bundle's engines-<target>/).",
    )(fn)
    fn = click.option(
        "--backend",
        type=click.Choice(["ort", "trt"]),
        default="ort",
        show_default=True,
        help="ONNX Runtime (CPU) or TensorRT engines.",
    )(fn)
    return fn


_prefix_cache_option = click.option(
    "--prefix-cache-mib",
    type=click.FloatRange(min=0),
    default=None,
    help="Memory (MiB) keeping finished answers' KV cache, so that a prompt starting the same way (a "
    "conversation's next turn, the same system prompt and image) prefills only its new tokens "
    "(default: one sequence at the full context; 0: no reuse).",
)


def _batching_options(fn):
    """--max-batch, --prefill-chunk and --prefix-cache-mib: the Session's scheduler (runtime/scheduler.py)."""
    fn = _prefix_cache_option(fn)
    fn = click.option(
        "--prefill-chunk",
        type=click.IntRange(min=1),
        default=DEFAULT_PREFILL_CHUNK,
        show_default=True,
        help="Prompt tokens prefilled between two decode steps while a request joins (smaller: shorter "
        "pauses of the running answers).",
    )(fn)
    return click.option(
        "--max-batch",
        type=click.IntRange(min=1),
        default=None,
        help="Requests decoded together, one KV-cache slot each at the full context (default: the "
        "engines' batch with TensorRT; the bundle's memory plan with ONNX Runtime, else 4).",
    )(fn)


def _int4_activations_option(fn):
    return click.option(
        "--int4-activations",
        type=click.Choice(["int8", "fp32"]),
        default="int8",
        show_default=True,
        help="ONNX Runtime's INT4 MatMul activations: int8 is ~2.5x faster at 1.7B; fp32 is what verify uses.",
    )(fn)


def _answer_options(
    max_new_tokens: int, temperature: float, top_p: float, seed: int, stop: tuple[str, ...]
) -> dict[str, Any]:
    """The sampling options' values as Session.generate and Conversation.ask take them (no --stop: EOS text)."""
    return dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop or ("</s>",))


def _sampling_options(fn):
    """--temperature, --top-p, --seed and --stop: how each answer is sampled (run, chat)."""
    fn = click.option("--stop", multiple=True, help="Stop string (repeatable); EOS always stops.")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True)(fn)
    fn = click.option("--top-p", type=float, default=1.0, show_default=True)(fn)
    return click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")(fn)


def _open_backend(
    backend: str,
    path: Path,
    engines: Path | None,
    threads: int = 0,
    int4_activations: str = "fp32",
    plugin: Path | None = None,
):
    """The backend over ARTIFACTS (a bundle or an artifacts directory), as a context manager."""
    from mvlm_compile.bundle import open_bundle_backend

    return open_bundle_backend(path, backend, engines, threads, int4_activations, plugin)


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option(
    "--golden", type=click.Path(path_type=Path), required=True, help="Golden directory (mvlm-compile golden)."
)
@_backend_options
@click.option("--recipe", default=None, help="Recipe whose tolerances apply (default: the artifacts' recipe).")
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="FP32 export for the divergence search (default: ARTIFACTS/reference when present).",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the JSON report here (and JUnit XML beside it, .xml).",
)
@click.option(
    "--task-items",
    type=click.IntRange(min=0),
    default=None,
    help="Task questions to answer when the golden directory has task.json (0: none). Default: 50.",
)
@_json_option
def verify(
    artifacts: Path,
    golden: Path,
    backend: str,
    engines: Path | None,
    threads: int,
    plugin: Path | None,
    recipe: str | None,
    reference: Path | None,
    report: Path | None,
    task_items: int | None,
    as_json: bool,
) -> None:
    """Compare every component and the greedy tokens with the golden tensors (exit 1 beyond tolerance);
    for a task model, also its answers to held-out questions."""
    from mvlm_compile.fileio import write_user_file
    from mvlm_compile.manifest import MANIFEST_NAME, REFERENCE_DIR
    from mvlm_compile.verify.verifier import VERIFY_TASK_ITEMS
    from mvlm_compile.verify.verifier import verify as run_verify

    _quiet_libraries()
    _check_report(report, artifacts, golden, junit=True)
    with _open_backend(backend, artifacts, engines, threads, plugin=plugin) as runner:  # INT4 activations stay fp32
        tolerances = _recipe_tolerances(recipe, runner.manifest, runner.artifacts)
        kept = runner.artifacts / REFERENCE_DIR
        reference = reference or (kept if (kept / MANIFEST_NAME).exists() else None)
        items = VERIFY_TASK_ITEMS if task_items is None else task_items
        result = run_verify(runner, golden, tolerances=tolerances, reference=reference, task_items=items)
    if report is not None:
        _write_report(report, result.to_json())
        junit = _junit_path(report)
        if junit is not None:
            write_user_file(junit, result.junit_xml(), "--report")
    if as_json:
        _echo_json(result.to_json())
    else:
        _echo_table(("component", "output", "max abs", "mean abs", "err/scale", "cosine", "result"), result.rows())
        for component, where in result.divergences.items():
            click.echo(
                f"{component}: first diverging node "
                + (
                    f"{where['node']} ({where['op_type']}), tensor {where['tensor']}"
                    if where
                    else "not found (outputs only)"
                )
            )
        click.echo("PASSED" if result.passed else "FAILED")
    if not result.passed:
        raise NumericalFailure(f"{artifacts}: outputs differ from the golden tensors in {golden} beyond tolerance")


def _recipe_tolerances(recipe: str | None, manifest, artifacts: Path) -> dict | None:
    """The tolerances of `--recipe`, else of the recipe the artifacts were exported with."""
    from mvlm_compile.manifest import MANIFEST_NAME
    from mvlm_compile.recipes import load_recipe, manifest_recipe

    chosen = load_recipe(recipe) if recipe else manifest_recipe(manifest, Path(artifacts) / MANIFEST_NAME)
    return chosen.tolerances if chosen else None


@cli.command(name="eval")
@click.argument("artifacts", type=click.Path(path_type=Path), nargs=-1, required=True)
@click.option(
    "--golden",
    type=click.Path(path_type=Path),
    required=True,
    help="Golden directory with task.json (`golden` of a task model, or a bundle's golden/).",
)
@_backend_options
@click.option("--items", type=click.IntRange(min=1), default=None, help="Evaluate the first N items (default: all).")
@click.option("--recipe", default=None, help="Recipe whose task tolerances apply (default: each artifacts' recipe).")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@_json_option
def evaluate(
    artifacts: tuple[Path, ...],
    golden: Path,
    backend: str,
    engines: Path | None,
    threads: int,
    plugin: Path | None,
    items: int | None,
    recipe: str | None,
    report: Path | None,
    as_json: bool,
) -> None:
    """Answer the held-out task questions with each ARTIFACTS: exact match, agreement with the FP32 reference
    (exit 1 when one fails its precision's task gate)."""
    from mvlm_compile.verify.task_eval import evaluate_task as run_task
    from mvlm_compile.verify.task_eval import load_task_golden, task_table

    if engines is not None and len(artifacts) > 1:
        raise click.UsageError("--engines applies to one ARTIFACTS only")
    _check_report(report, *artifacts, golden)
    load_task_golden(golden)  # a missing or damaged task file fails before any graph is loaded
    evals = []
    for path in artifacts:
        # INT4 activations fp32, as verify
        with _open_backend(backend, path, engines, threads, plugin=plugin) as runner:
            tolerances = _recipe_tolerances(recipe, runner.manifest, runner.artifacts)
            evals.append((str(path), run_task(runner, golden, tolerances, items, _progress(f"eval {path}"))))
    record = {
        "golden": str(golden),
        "backend": backend,
        "evaluations": [e.to_json() for _, e in evals],
        "passed": all(e.passed for _, e in evals),
    }
    if report is not None:
        _write_report(report, record)
    if as_json:
        _echo_json(record)
    else:
        click.echo(task_table(evals))
    failed = [name for name, e in evals if not e.passed]
    if failed:
        raise NumericalFailure(f"{', '.join(failed)}: answers below the task gate of the recipe's tolerances")


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), required=True)
@click.option("--prompt", required=True, help="The question about the image.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@_backend_options
@_int4_activations_option
@_sampling_options
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
def run(
    artifacts: Path,
    image: Path,
    prompt: str,
    max_new_tokens: int,
    backend: str,
    engines: Path | None,
    threads: int,
    plugin: Path | None,
    int4_activations: str,
    temperature: float,
    top_p: float,
    seed: int,
    stop: tuple[str, ...],
    stream: bool,
) -> None:
    """Answer a question about an image."""
    from mvlm_compile.model.preprocess import load_image
    from mvlm_compile.session import Session

    picture = load_image(image)  # before the model loads: a bad file fails fast
    # One question: one KV-cache slot, and nothing to keep for a turn after it.
    with Session(
        artifacts, backend, engines, threads, int4_activations, plugin=plugin, max_batch=1, prefix_cache_mib=0
    ) as session:
        options = _answer_options(max_new_tokens, temperature, top_p, seed, stop)
        if stream:
            for piece in session.generate(picture, prompt, stream=True, **options):
                click.echo(piece, nl=False)
            click.echo("")
        else:
            click.echo(session.generate(picture, prompt, **options).text)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--image",
    type=click.Path(path_type=Path),
    default=None,
    help="The image the conversation is about (it goes in the first user turn); without one, text only "
    "until /image FILE.",
)
@click.option("--system", default=None, help="A system prompt in place of the template's.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Per answer.")
@_backend_options
@_int4_activations_option
@_sampling_options
@_prefix_cache_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON line per turn on stdout (question, answer, token counts, finish reason, time to "
    "first token) instead of the answers' text.",
)
def chat(
    bundle: Path,
    image: Path | None,
    system: str | None,
    max_new_tokens: int,
    backend: str,
    engines: Path | None,
    threads: int,
    plugin: Path | None,
    int4_activations: str,
    temperature: float,
    top_p: float,
    seed: int,
    stop: tuple[str, ...],
    prefix_cache_mib: float | None,
    as_json: bool,
) -> None:
    """Hold a conversation at the terminal: each line a question about the image, its answer streamed.

    Commands: /image FILE (a new conversation about FILE), /reset (forget the turns, keep the image),
    /help, /exit (or Ctrl-D). Answers go to stdout and the rest to stderr, so that
    `chat BUNDLE --image x.png < questions.txt > answers.txt` works. Ctrl-C stops an answer (its
    text so far stays in the conversation); Ctrl-C at the prompt leaves (status 130). At a terminal
    a bad line is reported and the conversation goes on; with lines from a file or a pipe the first
    bad line exits with status 2."""
    from mvlm_compile.chat_repl import ChatRepl
    from mvlm_compile.model.preprocess import load_image
    from mvlm_compile.runtime.pipeline import Sampling
    from mvlm_compile.session import Session

    Sampling(temperature, top_p, seed)  # bad options and a bad image fail before the model loads
    picture = None if image is None else load_image(image)
    interactive = sys.stdin.isatty()
    options = _answer_options(max_new_tokens, temperature, top_p, seed, stop)
    # One conversation: one KV-cache slot; the prefix cache keeps its turns between questions.
    with (
        Session(
            bundle,
            backend,
            engines,
            threads,
            int4_activations,
            plugin=plugin,
            max_batch=1,
            prefix_cache_mib=prefix_cache_mib,
        ) as session,
        _sigterm_leaves("mvlm-compile chat"),
    ):
        repl = ChatRepl(
            session.conversation(picture, system),
            _line_reader(interactive),
            lambda text: click.echo(text, nl=False),
            lambda text: click.echo(text, err=True),
            interactive=interactive,
            options=options,
            as_json=as_json,
        )
        repl.banner(
            f"mvlm-compile chat: {session.model_id} ({backend}, a context of {session.limits.context} tokens)",
            None if image is None else str(image),
        )
        repl.run()


def _line_reader(terminal: bool):
    """stdin's lines (None at its end). At a terminal, after the prompt "> ": with line editing and
    history (readline) when stdout is the terminal too, else on stderr, which keeps stdout the answers'."""
    editing = terminal and sys.stdout.isatty()
    if isinstance(sys.stdin, io.TextIOWrapper):
        # Bytes that are not text in the locale's encoding reach the conversation, which refuses
        # that line alone (one line of error), instead of failing the read of every line.
        sys.stdin.reconfigure(errors="surrogateescape")
    if editing:
        try:
            import readline  # noqa: F401  (gives input() line editing and history)
        except ImportError:
            pass

    def read_line() -> str | None:
        if editing:
            try:
                return input("> ")
            except EOFError:
                return None
        if terminal:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    return read_line


@contextlib.contextmanager
def _sigterm_leaves(what: str):
    """SIGTERM ends the command (exit 130), where Ctrl-C (main's handler raises KeyboardInterrupt for
    both) only stops an answer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: object) -> None:
        raise Interrupted(f"{what} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@_backend_options
@_int4_activations_option
@click.option(
    "--api-key",
    envvar="MVLM_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); also read from $MVLM_API_KEY, "
    "which, like --api-key-file, keeps the key out of the process list.",
)
@click.option(
    "--api-key-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Read the API key from this file (its first line).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Without an API key, /v1/* answers only requests whose Host is localhost, 127.0.0.1, [::1], "
    "--host or one of these names (repeat the option).",
)
@click.option("--model-name", default=None, help="The model's id for clients (default: the bundle's recipe name).")
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Requests that may wait while every slot (--max-batch) is taken; more get 429.",
)
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=20 * 2**20, show_default=True)
@click.option("--max-image-bytes", type=click.IntRange(min=1), default=10 * 2**20, show_default=True)
@click.option("--allow-remote-images", is_flag=True, help="Fetch http(s) image URLs (default: only base64 data URLs).")
@click.option("--image-fetch-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's head; then its connection is closed.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds an admitted request's body has to arrive; then it gets 408 and frees its place.",
)
@click.option(
    "--image-cache-size",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Images whose embeddings are kept (a repeated image skips the vision encoder).",
)
@_batching_options
@click.option(
    "--drain-timeout",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="On SIGTERM or Ctrl-C: seconds requests in flight get to finish before they are cancelled.",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
def serve(artifacts: Path, **options: Any) -> None:
    """Serve the model over HTTP, OpenAI-compatible (/v1/chat/completions, /v1/models, /health, /metrics).

    Needs the [serve] extra. Stops on SIGTERM or Ctrl-C after draining, with exit status 0."""
    try:
        from mvlm_compile import serve as server
    except ImportError as e:
        raise MvlmError(f"serve: needs the [serve] extra ({e}): pip install 'mvlm-compile[serve]'") from None

    key_file = options.pop("api_key_file")
    if key_file is not None:
        if options["api_key"] is not None:
            raise MvlmError("--api-key-file: --api-key (or $MVLM_API_KEY) is given too; give the key once")
        options["api_key"] = _read_api_key(key_file)
    server.serve(server.ServeOptions(bundle=artifacts, **options))


def _read_api_key(path: Path) -> str:
    """The first line of a small regular file, without its line end."""
    try:
        if not path.is_file():
            raise MvlmError(f"--api-key-file {path}: not a regular file")
        with path.open("rb") as f:
            data = f.read(4097)
    except OSError as e:
        raise MvlmError(f"--api-key-file {path}: unreadable ({e.strerror or e})") from None
    if len(data) > 4096:
        raise MvlmError(f"--api-key-file {path}: larger than 4096 bytes; expected one line, the key")
    try:
        key = data.decode("utf-8").splitlines()[0].strip() if data.strip() else ""
    except UnicodeDecodeError:
        raise MvlmError(f"--api-key-file {path}: not UTF-8 text") from None
    if not key:
        raise MvlmError(f"--api-key-file {path}: empty; expected the key on its first line")
    return key


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@_backend_options
@_int4_activations_option
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="Also run PyTorch eager on this checkpoint (host) for ratios.",
)
@_vision_tower_option
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Prefill length (image tokens included).",
)
@click.option("--decode-steps", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option(
    "--repeats",
    type=click.IntRange(1, 1000),  # bounded: each repeat times every graph; the others are bounded by the context
    default=5,
    show_default=True,
)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the results as JSON here.")
@_json_option
def bench(
    artifacts: Path,
    backend: str,
    engines: Path | None,
    threads: int,
    plugin: Path | None,
    int4_activations: str,
    checkpoint: Path | None,
    vision_tower: Path | None,
    prompt_tokens: int,
    decode_steps: int,
    warmup: int,
    repeats: int,
    report: Path | None,
    as_json: bool,
) -> None:
    """Latency of vision, projector, prefill and decode tokens/s (median, p90), with PyTorch eager ratios."""
    from mvlm_compile.runtime.bench import bench_backend, bench_torch_eager, ratios
    from mvlm_compile.runtime.pipeline import Pipeline

    _quiet_libraries()
    interactive = sys.stderr.isatty()

    def progress(msg: str) -> None:
        if interactive:
            click.echo(f"\r[bench] {msg:<40}", nl=False, err=True)

    _check_report(report, artifacts)
    results: dict[str, Any] = {"backend": backend, "prompt_tokens": prompt_tokens, "threads": threads}
    if backend == "ort":
        results["int4_activations"] = int4_activations  # the precision the figures were measured at
    with _open_backend(backend, artifacts, engines, threads, int4_activations, plugin) as runner:
        results[backend] = bench_backend(Pipeline(runner), prompt_tokens, decode_steps, warmup, repeats, progress)
    if checkpoint is not None:
        results["torch_eager_fp32"] = bench_torch_eager(
            checkpoint, vision_tower, prompt_tokens, decode_steps, warmup, repeats, progress
        )
        results["speedup_vs_torch_eager"] = ratios(results[backend], results["torch_eager_fp32"])
    if interactive:
        click.echo("", err=True)
    if report is not None:
        _write_report(report, results)
    if as_json:
        _echo_json(results)
        return
    rows = []
    for name in [backend, "torch_eager_fp32"] if checkpoint else [backend]:
        r = results[name]
        rows.append(
            (
                name,
                *(f"{r[k]['median_ms']:.1f} / {r[k]['p90_ms']:.1f}" for k in ("vision", "projector", "prefill")),
                f"{r['decode']['tokens_per_s']:.2f}",
                f"{r['peak_rss_gib']:.2f}",
            )
        )
    _echo_table(
        (
            "backend",
            "vision ms (med/p90)",
            "projector ms",
            f"prefill {prompt_tokens} ms",
            "decode tok/s",
            "peak RSS GiB",
        ),
        rows,
    )
    if checkpoint is not None:
        click.echo(
            "speed-up vs PyTorch eager: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in results["speedup_vs_torch_eager"].items())
        )


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository directory to write.")
@_backend_options
@_int4_activations_option
@click.option(
    "--instances",
    type=int,
    default=1,
    show_default=True,
    help="Instances of the entry model (instance_group count); each loads the bundle and decodes its "
    "requests together (--max-batch).",
)
@click.option("--model-name", default="mobilevlm", show_default=True, help="The entry model's name in the repository.")
@click.option(
    "--max-tokens", type=int, default=128, show_default=True, help="Answer length when a request sets no max_tokens."
)
@click.option("--serve", is_flag=True, help="Then run it on this machine's CPU tritonserver (the [triton] extra).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="With --serve.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="With --serve.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True, help="With --serve.")
@click.option(
    "--python",
    "model_python",
    type=click.Path(path_type=Path),
    default=Path(".venv/triton-python/bin/python"),
    show_default=True,
    help="With --serve: the Python the models run in (mvlm-compile installed, numpy < 2; `make` makes it).",
)
@_batching_options
@_json_option
def triton(
    bundle: Path,
    out: Path,
    backend: str,
    engines: Path | None,
    threads: int,
    plugin: Path | None,
    int4_activations: str,
    instances: int,
    model_name: str,
    max_tokens: int,
    serve: bool,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    model_python: Path,
    max_batch: int | None,
    prefill_chunk: int,
    prefix_cache_mib: float | None,
    as_json: bool,
) -> None:
    """Write a Triton Inference Server model repository that serves BUNDLE (streamed answers)."""
    from mvlm_compile.triton.repository import make_repository

    if serve and backend == "trt":
        raise MvlmError("--serve: the local tritonserver is CPU-only; serve a trt repository with NVIDIA's Triton")
    repository = make_repository(
        bundle,
        out,
        backend,
        engines,
        instances,
        model_name,
        max_tokens,
        threads,
        int4_activations,
        _progress("triton"),
        plugin,
        max_batch,
        prefill_chunk,
        prefix_cache_mib,
    )
    if as_json:
        _echo_json(repository.to_json())
    else:
        click.echo(f"model repository: {out} (models: {', '.join(repository.models)})")
        click.echo(f"serve it with Triton (its Python must have mvlm-compile):\n  {repository.server_command()}")
    if serve:
        import tempfile

        from mvlm_compile.triton.server import Ports, local_server

        with tempfile.TemporaryDirectory(prefix="mvlm-triton-") as workdir:
            click.echo(f"[triton] starting tritonserver (log: {workdir}/tritonserver.log)", err=True)
            with local_server(out, Path(workdir), model_python, Ports(http_port, grpc_port, metrics_port)) as process:
                click.echo(
                    f"[triton] {model_name} ready: HTTP {http_port}, gRPC {grpc_port}, metrics {metrics_port} "
                    "(Ctrl-C stops)",
                    err=True,
                )
                process.wait()
            raise MvlmError(f"tritonserver exited with status {process.returncode}")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temporary outputs removed, exit 130


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="mvlm-compile")


if __name__ == "__main__":
    main()
