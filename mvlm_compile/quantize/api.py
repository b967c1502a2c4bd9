"""quantize_artifacts: INT4 weight-only decoder and FP16 vision/projector, in named steps.

Output: the quantized graphs replace the originals in the artifacts directory (or go to `out`,
leaving the source untouched). The FP32 decoder is not kept next to the INT4 one: the
artifacts directory is what is copied to the Jetson, and at 1.7B the FP32 decoder is 4.8 GiB
against 0.86 GiB for INT4 (measured, lm_head kept). To keep it (re-quantizing with other
settings, FP32 verification), quantize into another directory with `out`. Quantizing an INT4
decoder again is refused (AlreadyQuantizedError, exit 2); FP16 vision/projector graphs are left
as they are. Accuracy is measured afterwards, by mvlm_compile.verify.accuracy.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mvlm_compile.fileio import atomic_output_dir, deferred_signals, directory_lock, make_temp_dir
from mvlm_compile.manifest import Manifest, load_manifest, replace_graph
from mvlm_compile.onnx_io import graph_io, load_model, save_model
from mvlm_compile.quantize import calibration as calib
from mvlm_compile.quantize.decoder import AlreadyQuantizedError, find_linears, int4_weights, quantize_decoder
from mvlm_compile.quantize.fp16 import convert_to_fp16
from mvlm_compile.quantize.settings import QuantizeSettings
from mvlm_compile.recipes import manifest_recipe

Progress = Callable[[str], None]
_FLOAT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}


@dataclass
class QuantizeReport:
    artifacts: str
    settings: QuantizeSettings
    calibration: dict
    graphs: dict  # graph -> {file, dtype, action}
    sizes: dict
    seconds: dict
    linears: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**self.__dict__, "settings": self.settings.to_json()}

    def summary(self) -> dict:
        """The compact record for manifest.stages['quantize']['report']."""
        out: dict = {"sizes": self.sizes, "seconds": self.seconds}
        alphas = [r["alpha"] for r in self.linears if "alpha" in r]
        if alphas:
            out["awq_alpha_mean"] = round(float(np.mean(alphas)), 3)
            losses = [(r["loss_rtn"], r["loss_awq"]) for r in self.linears if "loss_awq" in r]
            out["calibration_output_error_rtn_vs_awq"] = [
                float(np.mean([a for a, _ in losses])),
                float(np.mean([b for _, b in losses])),
            ]
        return out

    def table(self) -> str:
        s = self.settings
        lines = [
            f"quantize {self.artifacts}: decoder {s.decoder} {s.method}, group {s.group_size}, kept {list(s.keep_fp16)}"
            f", lm_head {s.lm_head}"
        ]
        if self.sizes:
            lines.append(
                f"decoder {self.sizes['decoder_before_bytes'] / 2**20:.1f} MiB -> "
                f"{self.sizes['decoder_after_bytes'] / 2**20:.1f} MiB "
                f"(weights {self.sizes['int4_vs_fp16']:.3f}x of FP16)"
            )
        lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())


def _fp16_equivalent_bytes(model: onnx.ModelProto) -> int:
    """Weight bytes if every float initializer were FP16 (INT4 at half a byte)."""
    total = 0.0
    for t in model.graph.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type in _FLOAT_BYTES:
            total += 2 * count
        elif t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            total += 0.5 * count
        else:
            total += count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(total)


def _recipe_of(manifest: Manifest):
    """The recipe the artifacts were exported with (an error if it cannot be read), or None."""
    return manifest_recipe(manifest)


def resolve_settings(manifest: Manifest, **overrides: Any) -> QuantizeSettings:
    """Settings from the recipe the artifacts were exported with (an error if it cannot be
    read: never a silent fallback to defaults), then `overrides`."""
    return QuantizeSettings.resolve(_recipe_of(manifest), **overrides)


@dataclass
class _Staged:
    """What the steps wrote into the staging directory, and what the report says of it."""

    files: dict[str, str] = field(default_factory=dict)  # graph -> file in staging
    graphs: dict[str, dict] = field(default_factory=dict)  # graph -> {file, dtype, action}
    sizes: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    linears: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)


def _refuse_quantized_decoder(manifest: Manifest, path: Path, graph: onnx.ModelProto) -> None:
    if manifest.graphs["decoder"]["dtype"] == "int4" or int4_weights(graph.graph):
        stage = manifest.stages.get("quantize", {})
        raise AlreadyQuantizedError(
            f"{path}: the decoder is already INT4 (quantize stage: method {stage.get('method')}, group "
            f"{stage.get('group_size')}); quantizing twice is refused: re-export, "
            "or quantize the FP32 artifacts with --out"
        )


def _calibrate(
    src: Path,
    manifest: Manifest,
    graph: onnx.ModelProto,
    spec: calib.CalibrationSpec,
    staged: _Staged,
    progress: Progress,
):
    """AWQ's calibration activations: the decoder's Linear inputs on the calibration sequences."""
    t0 = time.perf_counter()
    tensors = sorted({lin.input for lin in find_linears(graph.graph)})
    result = calib.collect(src, manifest, tensors, spec, progress)
    staged.calibration = {"description": spec.describe(), "tokens": result.tokens, "sequences": result.sequences}
    staged.seconds["calibration"] = round(time.perf_counter() - t0, 1)
    return result.captures


def _quantize_decoder_step(
    src: Path,
    manifest: Manifest,
    settings: QuantizeSettings,
    spec: calib.CalibrationSpec,
    staging: Path,
    staged: _Staged,
    progress: Progress,
) -> None:
    path = manifest.graph_path(src, "decoder")
    graph = load_model(path, load_weights=False)
    _refuse_quantized_decoder(manifest, path, graph)
    staged.sizes["decoder_before_bytes"] = _graph_bytes(path)
    staged.sizes["decoder_before_fp16_equivalent_bytes"] = _fp16_equivalent_bytes(graph)
    captures = _calibrate(src, manifest, graph, spec, staged, progress) if settings.method == "awq" else None
    t0 = time.perf_counter()
    same_kv_heads = int(manifest.model["num_kv_heads"]) == int(manifest.model["num_heads"])
    result = quantize_decoder(graph, path.parent, settings, captures, same_kv_heads=same_kv_heads, progress=progress)
    del captures
    staged.linears = [r.to_json() for r in result.records]
    progress("writing decoder.onnx (INT4)")
    staged.sizes["decoder_after_fp16_equivalent_bytes"] = _fp16_equivalent_bytes(result.model)
    save_model(result.model, staging / "decoder.onnx")
    del result, graph
    staged.sizes["decoder_after_bytes"] = _graph_bytes(staging / "decoder.onnx")
    staged.sizes["int4_vs_fp16"] = round(
        staged.sizes["decoder_after_fp16_equivalent_bytes"] / staged.sizes["decoder_before_fp16_equivalent_bytes"], 4
    )
    staged.files["decoder"] = "decoder.onnx"
    staged.graphs["decoder"] = {"file": "decoder.onnx", "dtype": "int4", "action": f"INT4 {settings.method}"}
    staged.seconds["decoder"] = round(time.perf_counter() - t0, 1)


def _fp16_step(
    src: Path, manifest: Manifest, settings: QuantizeSettings, staging: Path, staged: _Staged, progress: Progress
) -> None:
    t0 = time.perf_counter()
    for name, target in (("vision", settings.vision), ("projector", settings.projector)):
        record = manifest.graphs[name]
        if target == "none" or record["dtype"] == "fp16":
            staged.graphs[name] = {"file": record["file"], "dtype": record["dtype"], "action": "unchanged"}
            continue
        progress(f"converting {name}.onnx to FP16")
        converted = convert_to_fp16(load_model(manifest.graph_path(src, name)), settings.keep_fp32_ops)
        save_model(converted, staging / record["file"])
        del converted
        staged.files[name] = record["file"]
        staged.graphs[name] = {
            "file": record["file"],
            "dtype": "fp16",
            "action": f"FP16 (kept FP32: {list(settings.keep_fp32_ops) or 'none'})",
        }
    staged.seconds["fp16"] = round(time.perf_counter() - t0, 1)


def _commit(
    src: Path,
    dest: Path,
    manifest: Manifest,
    settings: QuantizeSettings,
    staging: Path,
    staged: _Staged,
    report: QuantizeReport,
    stage_record: dict,
) -> None:
    """Move the staged graphs into `dest` and record the stage in its manifest (saved last).
    SIGINT/SIGTERM wait until the manifest matches the disk again."""
    with deferred_signals():
        for name, file in staged.files.items():
            replace_graph(dest, file, staging)
            manifest.record_graph(dest, name, file, staged.graphs[name]["dtype"], *graph_io(dest / file))
        manifest.stages["quantize"] = {
            "decoder": settings.decoder,
            "method": settings.method,
            "group_size": settings.group_size,
            "keep_fp16": list(settings.keep_fp16),
            "lm_head": settings.lm_head,
            "settings": {**settings.to_json(), "scale": "amax / 7, codes in [-8, 7], symmetric, no zero point"},
            "calibration": staged.calibration or "none (round-to-nearest)",
            "graphs": staged.graphs,
            "source": str(src.absolute()),
            "seconds": staged.seconds,
            "report": report.summary(),
            **stage_record,
        }
        if stage_record:
            manifest.stages["quantize"]["outputs_sha256"] = {
                name: graph["sha256"] for name, graph in manifest.graphs.items()
            }
        manifest.save(dest)


def _copy_unchanged(src: Path, dest: Path, manifest: Manifest, staged: _Staged) -> None:
    """With `out`: the graphs and files no step rewrote, copied beside the new ones."""
    for name, record in manifest.graphs.items():
        if name not in staged.files:
            for suffix in ("", ".data"):
                if (src / (record["file"] + suffix)).exists():
                    shutil.copy2(src / (record["file"] + suffix), dest / (record["file"] + suffix))
    for file in manifest.files.values():
        shutil.copy2(src / file, dest / file)


def quantize_artifacts(
    artifacts_dir: Path,
    settings: QuantizeSettings | None = None,
    calibration: calib.CalibrationSpec | None = None,
    out: Path | None = None,
    progress: Progress = lambda msg: None,
    stage_record: dict | None = None,
) -> QuantizeReport:
    """Quantize an artifacts directory in place, or into `out`. `settings` default to the
    artifacts' recipe (resolve_settings). `stage_record` (the orchestrator's) is written into the
    stage record, with the graphs' hashes as outputs_sha256."""
    src = Path(artifacts_dir)
    # In place: the only writer of the artifacts. With `out`: one of its readers.
    with directory_lock(src, exclusive=out is None):
        manifest = load_manifest(src)
        settings = settings or resolve_settings(manifest)
        spec = calibration or calib.spec_for_recipe(_recipe_of(manifest))
        return _quantize_locked(src, manifest, settings, spec, out, progress, stage_record or {})


def _quantize_locked(
    src: Path,
    manifest: Manifest,
    settings: QuantizeSettings,
    spec: calib.CalibrationSpec,
    out: Path | None,
    progress: Progress,
    stage_record: dict,
) -> QuantizeReport:
    started = time.perf_counter()
    staged = _Staged()
    for name in manifest.graphs:
        manifest.check_graph(src, name)  # never quantize (or copy) a graph the manifest does not describe
    # Staged beside where the files end up, so that the final os.replace stays on one filesystem.
    staging = make_temp_dir(Path(out).absolute().parent if out else src, prefix=".quantize.", suffix=".tmp")
    try:
        if settings.decoder == "int4":
            _quantize_decoder_step(src, manifest, settings, spec, staging, staged, progress)
        _fp16_step(src, manifest, settings, staging, staged, progress)
        staged.seconds["total"] = round(time.perf_counter() - started, 1)
        report = QuantizeReport(
            str(out or src), settings, staged.calibration, staged.graphs, staged.sizes, staged.seconds, staged.linears
        )
        if out is None:
            _commit(src, src, manifest, settings, staging, staged, report, stage_record)
        else:
            with atomic_output_dir(Path(out), "artifacts", inputs=[src]) as tmp:
                _copy_unchanged(src, tmp, manifest, staged)
                _commit(src, tmp, manifest, settings, staging, staged, report, stage_record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
