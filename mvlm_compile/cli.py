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
from mvlm_compile.errors import EXIT_INPUT_ERROR, MvlmError

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
