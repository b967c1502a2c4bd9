"""`mvlm-compile`: a thin click layer over the Python API.

Stage modules are imported inside the commands so that `--help` and the Jetson-side
commands never import torch or transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mvlm_compile import __version__
from mvlm_compile.errors import MvlmError

EXIT_STATUS_HELP = """Exit status: 0 success; 1 numerical failure (verify); 2 usage or input error;
3 engines not built here (bundle prepared for the target)."""


def _quiet_libraries() -> None:
    """Keep library chatter (transformers' config notices, Polygraphy's [I] lines) off the console."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def _print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


@click.group(epilog=EXIT_STATUS_HELP)
@click.version_option(__version__, prog_name="mvlm-compile")
def cli() -> None:
    """Compile MobileVLM V2 checkpoints to ONNX and TensorRT engines for Jetson Orin."""


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "mobilevlm-v2-1.7b", "mobilevlm-v2-3b"]), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint directory to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Default: fp32 for tiny, fp16 otherwise.")
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
    click.echo(f"wrote {preset} checkpoint (seed {seed}) to {out}" + (f", vision tower to {clip_out}" if clip_out else ""))


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="MobileVLM V2 checkpoint directory.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="CLIP ViT-L/14-336 checkpoint directory, when the checkpoint has no vision weights.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Golden directory to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a table.")
def golden(checkpoint: Path, vision_tower: Path | None, out: Path, as_json: bool) -> None:
    """Run the FP32 PyTorch reference on fixed inputs and write golden tensors (Polygraphy JSON)."""
    _quiet_libraries()
    from mvlm_compile.model.golden import write_golden

    manifest = write_golden(checkpoint, out, vision_tower=vision_tower)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    _print_golden_summary(out)
    click.echo(f"wrote golden tensors to {out} (checkpoint {manifest['checkpoint']['fingerprint_sha256'][:12]})")


def _print_golden_summary(golden_dir: Path) -> None:
    from mvlm_compile.contract import COMPONENTS
    from mvlm_compile.verify.golden_io import load_component

    rows = []
    for component in COMPONENTS:
        feed, outputs = load_component(golden_dir, component)
        first_in = next(iter(feed))
        first_out = next(iter(outputs))
        rows.append((component, first_in, str(list(feed[first_in].shape)), first_out, str(list(outputs[first_out].shape))))
    _print_table(rows, ("component", "first input", "shape", "first output", "shape"))


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="MobileVLM V2 checkpoint directory.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="CLIP ViT-L/14-336 checkpoint directory, when the checkpoint has no vision weights.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Artifacts directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--golden", type=click.Path(path_type=Path), default=None, help="Check the graphs in ONNX Runtime against this golden directory.")
def export(checkpoint: Path, vision_tower: Path | None, out: Path, dtype: str, golden: Path | None) -> None:
    """Export vision.onnx, projector.onnx and decoder.onnx (+ embedding table, tokenizer, manifest)."""
    _quiet_libraries()
    from mvlm_compile.export.exporter import export_artifacts

    manifest = export_artifacts(checkpoint, out, vision_tower=vision_tower, dtype=dtype, progress=lambda m: click.echo(f"[export] {m}", err=True))
    rows = [(name, g["file"], g["dtype"], ", ".join(i["name"] for i in g["inputs"][:3])) for name, g in manifest.graphs.items()]
    _print_table(rows, ("graph", "file", "dtype", "inputs"))
    click.echo(f"wrote {out} in {manifest.stages['export']['seconds']} s")
    if golden is not None:
        _check_against_golden(out, golden)


def _check_against_golden(artifacts: Path, golden: Path) -> None:
    from mvlm_compile.errors import EXIT_NUMERICAL_FAILURE
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.verify.components import check_components

    checks = check_components(OrtBackend(artifacts), golden)
    rows = [
        (c.component, c.output, f"{c.metrics['max_abs']:.3g}", f"{c.metrics['rel_to_scale']:.3g}", f"{c.metrics['cosine']:.7f}", "ok" if c.passed else "FAIL")
        for c in checks
    ]
    _print_table(rows, ("component", "output", "max abs", "err/scale", "cosine", "result"))
    if not all(c.passed for c in checks):
        click.echo("error: outputs differ from the golden tensors beyond tolerance", err=True)
        sys.exit(EXIT_NUMERICAL_FAILURE)


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--allow-missing",
    "allow_missing",
    multiple=True,
    metavar="PASS",
    help="Report PASS as skipped when its pattern is not in the graph, instead of failing (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def optimize(artifacts: Path, allow_missing: tuple[str, ...], as_json: bool) -> None:
    """Rewrite the graphs in place: PEG plugin node, LDPv2 pool-first, constant folding and clean-ups."""
    _quiet_libraries()
    from mvlm_compile.manifest import keep_reference
    from mvlm_compile.surgery import optimize_artifacts, optimize_command_rows

    keep_reference(artifacts)
    report = optimize_artifacts(artifacts, allow_missing=allow_missing, progress=lambda m: click.echo(f"[optimize] {m}", err=True))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    header, rows = optimize_command_rows(report)
    _print_table(rows, header)
    click.echo(f"optimized {artifacts}" if report.changed else f"{artifacts}: already optimized, nothing changed")


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--decoder", type=click.Choice(["int4"]), default="int4", show_default=True, help="Decoder weight precision.")
@click.option("--method", type=click.Choice(["awq", "rtn"]), default=None, help="INT4 method. Default: the recipe's (awq).")
@click.option("--group-size", type=int, default=None, help="INT4 scale group along the input dimension. Default: the recipe's (128; tiny 32).")
@click.option("--keep", multiple=True, help="A Linear kept unquantized, e.g. lm_head (repeatable). Default: the recipe's keep_fp16.")
@click.option("--calib-images", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None, help="Directory of calibration images instead of the built-in ones (AWQ).")
@click.option("--golden", type=click.Path(path_type=Path), default=None, help="Report accuracy against this golden directory.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the quantized artifacts here; default: in place (the FP32 decoder is not kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def quantize(artifacts: Path, decoder: str, method: str | None, group_size: int | None, keep: tuple[str, ...], calib_images: Path | None, golden: Path | None, out: Path | None, as_json: bool) -> None:
    """INT4 weight-only decoder (AWQ or RTN) and FP16 vision/projector; with --golden, an accuracy report."""
    _quiet_libraries()
    from mvlm_compile.errors import EXIT_NUMERICAL_FAILURE
    from mvlm_compile.quantize import quantize_artifacts
    from mvlm_compile.quantize.calibration import CalibrationSpec

    report = quantize_artifacts(
        artifacts, decoder=decoder, method=method, group_size=group_size, keep_fp16=keep or None,
        calibration=CalibrationSpec(images=calib_images) if calib_images else None, golden=golden, out=out,
        progress=lambda m: click.echo(f"[quantize] {m}", err=True),
    )
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.table())
    if report.accuracy and not all(c.get("passed", True) for c in report.accuracy["components"].values()):
        click.echo("error: FP16 vision/projector outputs differ from the golden tensors beyond tolerance", err=True)
        sys.exit(EXIT_NUMERICAL_FAILURE)


@cli.command()
@click.option("--target", required=True, help="Target profile (recipes/targets/targets.yaml), e.g. orin-agx-64gb, orin-nano-8gb, x86-sm89.")
@click.argument("bundle_dir", required=False, type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Start from a checkpoint (host: needs the host extra).")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="CLIP ViT-L/14-336 directory, when the checkpoint has no vision weights.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle directory to write (with --checkpoint).")
@click.option("--recipe", default=None, help="Recipe name or YAML path (default: the one matching the model).")
@click.option("--context", type=int, default=None, help="Context length (default: target, then recipe).")
@click.option("--batch", type=int, default=None, help="Decoder batch (default: target, then recipe).")
@click.option("--force", is_flag=True, help="Rerun every stage even when its inputs are unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(target, bundle_dir, checkpoint, vision_tower, out, recipe, context, batch, force, as_json) -> None:
    """Export -> optimize -> quantize -> TensorRT engines, into a bundle.

    From a checkpoint: `build --target T --checkpoint DIR --out BUNDLE`. From a bundle made
    elsewhere (on the Orin): `build --target T BUNDLE`. Without TensorRT or a GPU of the
    target's SM, the bundle is prepared and the command for the target is printed (exit 3).
    """
    from mvlm_compile.build.pipeline import build as run_build
    from mvlm_compile.errors import EXIT_ENGINES_DEFERRED

    if (checkpoint is None) == (bundle_dir is None):
        raise click.UsageError("give either BUNDLE_DIR or --checkpoint DIR --out BUNDLE")
    if checkpoint is not None and out is None:
        raise click.UsageError("--checkpoint needs --out BUNDLE")
    _quiet_libraries()
    result = run_build(
        target, out or bundle_dir, checkpoint=checkpoint, vision_tower=vision_tower, recipe_name=recipe,
        context=context, batch=batch, force=force, progress=lambda m: click.echo(f"[build] {m}", err=True),
    )
    summary = {
        "bundle": str(result.bundle),
        "stages": result.stages,
        "settings": result.settings.__dict__,
        "memory_plan": result.plan.to_json(),
        "engines_dir": str(result.engines_dir) if result.engines_dir else None,
        "deferred_reason": result.deferred_reason,
        "target_command": result.target_command,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_table([(k, v) for k, v in result.stages.items()], ("stage", "result"))
        click.echo(result.plan.table())
    if result.engines_dir is None:
        click.echo(f"engines not built here: {result.deferred_reason}", err=True)
        click.echo(f"bundle ready: {result.bundle}; copy it to the target and run:\n  {result.target_command}", err=True)
        sys.exit(EXIT_ENGINES_DEFERRED)
    click.echo(f"engines in {result.engines_dir}")


def _backend_options(fn):
    fn = click.option("--engines", type=click.Path(path_type=Path), default=None, help="Engines directory (trt; default: the bundle's engines-<target>/).")(fn)
    fn = click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True, help="ONNX Runtime (CPU) or TensorRT engines.")(fn)
    return fn


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--golden", type=click.Path(path_type=Path), required=True, help="Golden directory (mvlm-compile golden).")
@_backend_options
@click.option("--recipe", default=None, help="Recipe whose tolerances apply (default: the artifacts' recipe).")
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="FP32 export for the divergence search (default: ARTIFACTS/reference when present).")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the JSON report here (and JUnit XML beside it, .xml).")
def verify(artifacts, golden, backend, engines, recipe, reference, report) -> None:
    """Compare every component and the greedy tokens with the golden tensors (exit 1 beyond tolerance)."""
    from mvlm_compile.errors import EXIT_NUMERICAL_FAILURE
    from mvlm_compile.fileio import write_json
    from mvlm_compile.recipes import load_recipe
    from mvlm_compile.runtime.backend import open_backend
    from mvlm_compile.manifest import REFERENCE_DIR
    from mvlm_compile.verify.verifier import verify as run_verify

    _quiet_libraries()
    runner = open_backend(backend, artifacts, engines)
    recipe_name = recipe or runner.manifest.model.get("recipe")
    tolerances = load_recipe(recipe_name).tolerances if recipe_name else None
    reference = reference or (runner.artifacts / REFERENCE_DIR if (runner.artifacts / REFERENCE_DIR / "manifest.json").exists() else None)
    result = run_verify(runner, golden, tolerances=tolerances, reference=reference)
    _print_table(result.rows(), ("component", "output", "max abs", "mean abs", "err/scale", "cosine", "result"))
    for component, where in result.divergences.items():
        click.echo(f"{component}: first diverging node " + (f"{where['node']} ({where['op_type']}), tensor {where['tensor']}" if where else "not found (outputs only)"))
    if report is not None:
        write_json(report, result.to_json())
        result.write_junit(report.with_suffix(".xml"))
    click.echo("PASSED" if result.passed else "FAILED")
    if not result.passed:
        sys.exit(EXIT_NUMERICAL_FAILURE)


@cli.command()
@click.option("--artifacts", type=click.Path(path_type=Path), required=True, help="Artifacts or bundle directory.")
@click.option("--image", type=click.Path(path_type=Path), required=True)
@click.option("--prompt", required=True, help="The question about the image.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@_backend_options
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable); EOS always stops.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
def run(artifacts, image, prompt, max_new_tokens, backend, engines, temperature, top_p, seed, stop, stream) -> None:
    """Answer a question about an image."""
    from mvlm_compile.model.preprocess import load_image, preprocess_image
    from mvlm_compile.runtime.backend import open_backend
    from mvlm_compile.runtime.pipeline import Chat, Pipeline, Sampling

    pixel_values = preprocess_image(load_image(image))
    chat = Chat(Pipeline(open_backend(backend, artifacts, engines)))
    on_text = (lambda piece: click.echo(piece, nl=False)) if stream else None
    text = chat.generate(pixel_values, prompt, max_new_tokens, Sampling(temperature, top_p, seed), stop or ("</s>",), on_text)
    click.echo("" if stream else text)


@cli.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@_backend_options
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Also run PyTorch eager on this checkpoint (host) for ratios.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--prompt-tokens", type=int, default=256, show_default=True, help="Prefill length (image tokens included).")
@click.option("--decode-steps", type=int, default=32, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results as JSON here.")
def bench(artifacts, backend, engines, checkpoint, vision_tower, prompt_tokens, decode_steps, warmup, repeats, json_path) -> None:
    """Latency of vision, projector, prefill and decode tokens/s (median, p90), with PyTorch eager ratios."""
    from mvlm_compile.fileio import write_json
    from mvlm_compile.runtime.backend import open_backend
    from mvlm_compile.runtime.bench import bench_backend, bench_torch_eager, ratios
    from mvlm_compile.runtime.pipeline import Pipeline

    _quiet_libraries()
    interactive = sys.stderr.isatty()

    def progress(msg: str) -> None:
        if interactive:
            click.echo(f"\r[bench] {msg:<40}", nl=False, err=True)

    results = {"backend": backend, "prompt_tokens": prompt_tokens}
    results[backend] = bench_backend(Pipeline(open_backend(backend, artifacts, engines)), prompt_tokens, decode_steps, warmup, repeats, progress)
    if checkpoint is not None:
        results["torch_eager_fp32"] = bench_torch_eager(checkpoint, vision_tower, prompt_tokens, decode_steps, warmup, repeats, progress)
        results["speedup_vs_torch_eager"] = ratios(results[backend], results["torch_eager_fp32"])
    if interactive:
        click.echo("", err=True)
    rows = []
    for name in [backend, "torch_eager_fp32"] if checkpoint else [backend]:
        r = results[name]
        rows.append((name, *(f"{r[k]['median_ms']:.1f} / {r[k]['p90_ms']:.1f}" for k in ("vision", "projector", "prefill")), f"{r['decode']['tokens_per_s']:.2f}", f"{r['peak_rss_gib']:.2f}"))
    _print_table(rows, ("backend", "vision ms (med/p90)", "projector ms", f"prefill {prompt_tokens} ms", "decode tok/s", "peak RSS GiB"))
    if checkpoint is not None:
        click.echo("speed-up vs PyTorch eager: " + ", ".join(f"{k} {v:.2f}x" for k, v in results["speedup_vs_torch_eager"].items()))
    if json_path is not None:
        write_json(json_path, results)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MvlmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
