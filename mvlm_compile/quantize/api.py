"""quantize_artifacts: INT4 weight-only decoder + FP16 vision/projector, with an accuracy report.

Output: the quantized graphs replace the originals in the artifacts directory (or go to `out`,
leaving the source untouched). The FP32 decoder is not kept next to the INT4 one: the
artifacts directory is what is copied to the Jetson, and at 1.7B the FP32 decoder is 4.8 GiB
against 0.86 GiB for INT4 (measured, lm_head kept). To keep it (re-quantizing with other settings, FP32
verification), quantize into another directory with `out`. Quantizing an INT4 decoder again is
refused (AlreadyQuantizedError, exit 2); FP16 vision/projector graphs are left as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import atomic_output_dir
from mvlm_compile.manifest import load_manifest
from mvlm_compile.onnx_io import graph_io, load_model, save_model
from mvlm_compile.quantize import calibration as calib
from mvlm_compile.quantize.decoder import AlreadyQuantizedError, find_linears, int4_weights, quantize_decoder
from mvlm_compile.quantize.fp16 import convert_to_fp16

DEFAULT_METHOD = "awq"
DEFAULT_GROUP_SIZE = 128
DEFAULT_KEEP = ("lm_head",)
# Nothing kept in FP32 in vision/projector: measured error vs golden is far inside the FP16
# tolerance (1.7B vision 5.2e-4 of scale all-FP16, 4.4e-4 with LayerNormalization in FP32).
DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = ()
_FLOAT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}


@dataclass
class QuantizeReport:
    artifacts: str
    method: str
    group_size: int
    keep_fp16: list[str]
    settings: dict
    calibration: dict
    graphs: dict  # graph -> {file, dtype, action}
    sizes: dict
    seconds: dict
    linears: list[dict] = field(default_factory=list)
    accuracy: dict | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> dict:
        """The compact record for manifest.stages['quantize']['report']."""
        out: dict = {"sizes": self.sizes, "seconds": self.seconds}
        alphas = [r["alpha"] for r in self.linears if "alpha" in r]
        if alphas:
            out["awq_alpha_mean"] = round(float(np.mean(alphas)), 3)
            losses = [(r["loss_rtn"], r["loss_awq"]) for r in self.linears if "loss_awq" in r]
            out["calibration_output_error_rtn_vs_awq"] = [float(np.mean([a for a, _ in losses])), float(np.mean([b for _, b in losses]))]
        if self.accuracy:
            d = self.accuracy["decoder"]
            out["decoder"] = {
                "teacher_forced": d.get("teacher_forced"),
                "answer_positions": d.get("answer_positions"),
                "greedy_prefix_match": d["greedy"]["prefix_match"],
                "greedy_total_match": d["greedy"]["total_match"],
            }
            out["components"] = {
                k: {m: v[m] for m in ("max_abs", "mean_abs", "rel_to_scale", "cosine", "passed") if m in v}
                for k, v in self.accuracy["components"].items()
            }
        return out

    def table(self) -> str:
        lines = [f"quantize {self.artifacts}: decoder INT4 {self.method}, group {self.group_size}, kept {self.keep_fp16}"]
        if self.sizes:
            lines.append(
                f"decoder {self.sizes['decoder_before_bytes'] / 2**20:.1f} MiB -> {self.sizes['decoder_after_bytes'] / 2**20:.1f} MiB "
                f"(weights {self.sizes['int4_vs_fp16']:.3f}x of FP16)"
            )
        lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in self.seconds.items()))
        if self.accuracy:
            lines.append(f"{'component.output':<32} {'dtype':<5} {'max abs':>9} {'mean abs':>9} {'err/scale':>9} {'cosine':>10}  result")
            for name, m in self.accuracy["components"].items():
                result = {True: "ok", False: "FAIL"}.get(m.get("passed"), "-")
                lines.append(f"{name:<32} {m['dtype']:<5} {m['max_abs']:>9.3g} {m['mean_abs']:>9.3g} {m['rel_to_scale']:>9.3g} {m['cosine']:>10.6f}  {result}")
            d = self.accuracy["decoder"]
            for key in ("teacher_forced", "answer_positions", "prompt_positions"):
                if d.get(key):
                    m = d[key]
                    lines.append(f"decoder {key:<17} {m['positions']:>4} positions: top-1 {m['top1_agreement']:.4f}, KL mean {m['kl_mean']:.3g} max {m['kl_max']:.3g}, logits cosine {m['logits_cosine']:.6f}")
            g = d["greedy"]
            lines.append(f"decoder greedy: {g['prefix_match']}/{g['of']} prefix match, {g['total_match']}/{g['of']} total")
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


def _recipe_decoder_precision(manifest) -> dict:
    from mvlm_compile.recipes import load_recipe

    name = manifest.model.get("recipe")
    if not name:
        return {}
    try:
        return dict(load_recipe(name).precision.get("decoder", {}))
    except MvlmError:
        return {}


def quantize_artifacts(
    artifacts_dir: Path,
    decoder: str = "int4",
    method: str | None = None,
    group_size: int | None = None,
    keep_fp16: tuple[str, ...] | list[str] | None = None,
    calibration: calib.CalibrationSpec | None = None,
    golden: Path | None = None,
    out: Path | None = None,
    vision: str = "fp16",
    projector: str = "fp16",
    keep_fp32_ops: tuple[str, ...] = DEFAULT_KEEP_FP32_OPS,
    clip: bool = True,
    fold_down: str = "up_proj",
    fold_o: str = "mul",
    grid: int = 20,
    max_tokens: int = 512,
    progress: Callable[[str], None] = lambda msg: None,
) -> QuantizeReport:
    """Quantize an artifacts directory. method / group_size / keep_fp16 default to the recipe's
    precision.decoder (method awq, group 128, lm_head kept when there is no recipe)."""
    src = Path(artifacts_dir)
    manifest = load_manifest(src)
    precision = _recipe_decoder_precision(manifest)
    method = method or precision.get("method", DEFAULT_METHOD)
    group_size = int(group_size or precision.get("group_size", DEFAULT_GROUP_SIZE))
    keep = tuple(keep_fp16 if keep_fp16 is not None else precision.get("keep_fp16", DEFAULT_KEEP))
    if decoder not in ("int4", "none"):
        raise MvlmError(f"--decoder {decoder!r}: expected int4")
    for name, target in (("vision", vision), ("projector", projector)):
        if target not in ("fp16", "none"):
            raise MvlmError(f"--{name} {target!r}: expected fp16")
    if method not in ("awq", "rtn"):
        raise MvlmError(f"--method {method!r}: expected awq or rtn")
    if group_size < 16 or group_size & (group_size - 1):
        raise MvlmError(f"--group-size {group_size}: expected a power of two >= 16 (TensorRT/ORT blocked INT4)")

    decoder_path = manifest.graph_path(src, "decoder")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    graphs: dict[str, dict] = {}
    sizes: dict = {}
    report_linears: list[dict] = []
    calibration_record: dict = {}
    reference_logits = None
    # Staged beside where the files end up, so that the final os.replace stays on one filesystem.
    staging = Path(tempfile.mkdtemp(dir=Path(out).absolute().parent if out else src, prefix=".quantize.", suffix=".tmp"))
    try:
        new_files: dict[str, str] = {}  # graph -> file written in staging
        if decoder == "int4":
            graph = load_model(decoder_path, load_weights=False)
            if manifest.graphs["decoder"]["dtype"] == "int4" or int4_weights(graph.graph):
                stage = manifest.stages.get("quantize", {})
                raise AlreadyQuantizedError(
                    f"{decoder_path}: the decoder is already INT4 (quantize stage: method {stage.get('method')}, group "
                    f"{stage.get('group_size')}); quantizing twice is refused: re-export, or quantize the FP32 artifacts with --out"
                )
            sizes["decoder_before_bytes"] = _graph_bytes(decoder_path)
            sizes["decoder_before_fp16_equivalent_bytes"] = _fp16_equivalent_bytes(graph)
            linears = find_linears(graph.graph)
            spec = calibration or calib.CalibrationSpec()
            extra = []
            if golden is not None:
                from mvlm_compile.quantize.evaluate import teacher_forced_embeds

                table = np.load(src / manifest.files["embed_tokens"], mmap_mode="r", allow_pickle=False)
                extra = [teacher_forced_embeds(Path(golden), table)[0]]
            captures = None
            if method == "awq" or extra:
                t0 = time.perf_counter()
                tensors = sorted({lin.input for lin in linears}) if method == "awq" else []
                # RTN needs no calibration: only the FP32 reference logits of the evaluation sequence.
                result = calib.collect(src, manifest, tensors, spec if method == "awq" else calib.CalibrationSpec(max_samples=0), extra, progress)
                captures = result.captures if method == "awq" else None
                reference_logits = result.extra_logits[0] if extra else None
                if method == "awq":
                    calibration_record = {"description": spec.describe(), "tokens": result.tokens, "sequences": result.sequences}
                seconds["calibration"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            model = quantize_decoder(
                graph, decoder_path.parent, method, group_size, keep, captures, clip=clip, fold_down=fold_down, fold_o=fold_o,
                same_kv_heads=int(manifest.model["num_kv_heads"]) == int(manifest.model["num_heads"]), grid=grid, max_tokens=max_tokens,
                progress=progress,
            )
            del captures
            report_linears = [r.to_json() for r in model.records]
            progress("writing decoder.onnx (INT4)")
            sizes["decoder_after_fp16_equivalent_bytes"] = _fp16_equivalent_bytes(model.model)
            save_model(model.model, staging / "decoder.onnx")
            del model, graph
            sizes["decoder_after_bytes"] = _graph_bytes(staging / "decoder.onnx")
            sizes["int4_vs_fp16"] = round(sizes["decoder_after_fp16_equivalent_bytes"] / sizes["decoder_before_fp16_equivalent_bytes"], 4)
            new_files["decoder"] = "decoder.onnx"
            graphs["decoder"] = {"file": "decoder.onnx", "dtype": "int4", "action": f"INT4 {method}"}
            seconds["decoder"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for name, target in (("vision", vision), ("projector", projector)):
            record = manifest.graphs[name]
            if target == "none" or record["dtype"] == "fp16":
                graphs[name] = {"file": record["file"], "dtype": record["dtype"], "action": "unchanged"}
                continue
            progress(f"converting {name}.onnx to FP16")
            converted = convert_to_fp16(load_model(manifest.graph_path(src, name)), keep_fp32_ops)
            save_model(converted, staging / record["file"])
            del converted
            new_files[name] = record["file"]
            graphs[name] = {"file": record["file"], "dtype": "fp16", "action": f"FP16 (kept FP32: {list(keep_fp32_ops) or 'none'})"}
        seconds["fp16"] = round(time.perf_counter() - t0, 1)

        def finish(dest: Path) -> None:
            for name, file in new_files.items():
                for suffix in ("", ".data"):
                    staged = staging / (file + suffix)
                    if staged.exists():
                        os.replace(staged, dest / (file + suffix))
                    elif suffix:
                        (dest / (file + suffix)).unlink(missing_ok=True)
                manifest.record_graph(dest, name, file, graphs[name]["dtype"], *graph_io(dest / file))
            seconds["total"] = round(time.perf_counter() - started, 1)
            manifest.stages["quantize"] = {
                "decoder": decoder,
                "method": method,
                "group_size": group_size,
                "keep_fp16": list(keep),
                "settings": {"clip_search": clip, "fold_down": fold_down, "fold_o": fold_o, "grid": grid, "max_tokens": max_tokens, "scale": "amax / 7, codes in [-8, 7], symmetric, no zero point"},
                "calibration": calibration_record or "none (round-to-nearest)",
                "graphs": graphs,
                "source": str(src.absolute()),
                "seconds": seconds,
            }
            manifest.save(dest)

        if out is None:
            finish(src)
            dest = src
        else:
            with atomic_output_dir(Path(out)) as tmp:
                for name, record in manifest.graphs.items():
                    if name not in new_files:
                        for suffix in ("", ".data"):
                            if (src / (record["file"] + suffix)).exists():
                                shutil.copy2(src / (record["file"] + suffix), tmp / (record["file"] + suffix))
                for file in manifest.files.values():
                    shutil.copy2(src / file, tmp / file)
                finish(tmp)
            dest = Path(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    report = QuantizeReport(
        artifacts=str(dest), method=method, group_size=group_size, keep_fp16=list(keep),
        settings=manifest.stages["quantize"]["settings"], calibration=calibration_record, graphs=graphs, sizes=sizes,
        seconds=seconds, linears=report_linears,
    )
    if golden is not None:
        from mvlm_compile.quantize.evaluate import evaluate_artifacts

        t0 = time.perf_counter()
        report.accuracy = evaluate_artifacts(dest, Path(golden), reference_logits, progress)
        seconds["evaluation"] = round(time.perf_counter() - t0, 1)
        manifest = load_manifest(dest)
        manifest.stages["quantize"]["report"] = report.summary()
        manifest.save(dest)
    return report
