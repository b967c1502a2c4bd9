"""INT4 decoder + FP16 vision/projector on a full-size synthetic checkpoint: time, peak memory,
size, ONNX Runtime CPU decode latency and accuracy against the FP32 golden tensors, RTN vs AWQ.

    python benchmarks/quantize_bench.py --preset mobilevlm-v2-1.7b --workdir /tmp/mvlm-bench

Reuses <workdir>/<preset>-checkpoint and <workdir>/<preset>-fp32-artifacts when present
(export_bench.py writes them; they are only read), otherwise makes them with `mvlm-compile
synth` / `export`; golden tensors go to <workdir>/<preset>-golden. Each quantization runs in
its own process, writing to <workdir>/<preset>-int4-<run>; peak memory is that process's max
RSS (os.wait4). Runs are "rtn", "awq", and with ":lm_head" also lm_head in INT4 (the
recipe keeps it). The latency step times one decode step (batch 1, past --past tokens) of the
FP32 and the INT4 decoder in one process with ort_session's options (MatMulNBits fusion,
accuracy level 0). Prints a table and writes JSON (--json, default <workdir>/quantize_bench-<preset>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from measure import mvlm_compile, run_measured


def child_quantize(artifacts: Path, out: Path, golden: Path, run: str, result: Path) -> None:
    from mvlm_compile.manifest import load_manifest
    from mvlm_compile.quantize import quantize_artifacts, resolve_settings
    from mvlm_compile.verify.accuracy import accuracy_table, evaluate_artifacts

    method, _, extra = run.partition(":")
    keep = ("embed_tokens",) if extra == "lm_head" else None
    settings = resolve_settings(load_manifest(artifacts), method=method, keep_fp16=keep)
    progress = lambda m: print(f"[{run}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    report = quantize_artifacts(artifacts, settings, out=out, progress=progress)
    accuracy = evaluate_artifacts(out, golden, reference=artifacts, progress=progress)
    print(report.table())
    print(accuracy_table(accuracy))
    result.write_text(json.dumps({**report.to_json(), "accuracy": accuracy}, indent=1) + "\n")


def child_latency(fp32: Path, int4: Path, past: int, steps: int, result: Path) -> None:
    import numpy as np

    from mvlm_compile import contract
    from mvlm_compile.manifest import load_manifest
    from mvlm_compile.runtime.ort_backend import ort_session

    model = load_manifest(fp32).model
    layers, heads, head_dim, hidden = (
        model["num_layers"],
        model["num_kv_heads"],
        model["head_dim"],
        model["hidden_size"],
    )
    rng = np.random.default_rng(0)
    feed = {
        contract.DECODER_EMBEDS: rng.standard_normal((1, 1, hidden)).astype(np.float32) * 0.02,
        contract.DECODER_POSITIONS: np.array([[past]], np.int64),
        contract.DECODER_LOGITS_INDEX: np.array([0], np.int64),
    }
    for name in contract.decoder_input_names(layers)[3:]:
        feed[name] = rng.standard_normal((past, 1, heads, head_dim)).astype(np.float32)
    timings = {}
    for label, artifacts in (("fp32", fp32), ("int4", int4)):
        session = ort_session(load_manifest(artifacts).graph_path(artifacts, "decoder"))
        for _ in range(3):
            session.run(None, feed)
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            session.run(None, feed)
            samples.append(time.perf_counter() - t0)
        timings[label] = {
            "median_ms": round(1000 * float(np.median(samples)), 2),
            "min_ms": round(1000 * min(samples), 2),
        }
        del session
    timings["int4_over_fp32"] = round(timings["int4"]["median_ms"] / timings["fp32"]["median_ms"], 3)
    timings.update({"past": past, "steps": steps, "threads": os.cpu_count()})
    print(json.dumps(timings))
    result.write_text(json.dumps(timings, indent=1) + "\n")


def _size_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file()) / 2**30, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="mobilevlm-v2-1.7b", choices=["tiny", "mobilevlm-v2-1.7b", "mobilevlm-v2-3b"]
    )
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument(
        "--artifacts", type=Path, default=None, help="FP32 artifacts (default <workdir>/<preset>-fp32-artifacts)"
    )
    parser.add_argument(
        "--golden", type=Path, default=None, help="golden directory (default <workdir>/<preset>-golden)"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="where quantized artifacts go (default workdir)")
    parser.add_argument("--runs", nargs="+", default=["rtn", "awq"], help="rtn, awq, rtn:lm_head, awq:lm_head")
    parser.add_argument("--past", type=int, default=250)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        kind, *args = opts.child
        if kind == "quantize":
            child_quantize(Path(args[0]), Path(args[1]), Path(args[2]), args[3], Path(args[4]))
        else:
            child_latency(Path(args[0]), Path(args[1]), int(args[2]), int(args[3]), Path(args[4]))
        return

    work = opts.workdir
    work.mkdir(parents=True, exist_ok=True)
    out_dir = opts.out_dir or work
    checkpoint = work / f"{opts.preset}-checkpoint"
    artifacts = opts.artifacts or work / f"{opts.preset}-fp32-artifacts"
    golden = opts.golden or work / f"{opts.preset}-golden"
    results: dict = {"preset": opts.preset, "cpus": os.cpu_count(), "runs": {}}
    if not (artifacts / "manifest.json").exists() or not (golden / "manifest.json").exists():
        if not (checkpoint / "config.json").exists():
            results["synth"] = run_measured(mvlm_compile("synth", "--preset", opts.preset, "--out", str(checkpoint)))
    if not (golden / "manifest.json").exists():
        results["golden"] = run_measured(mvlm_compile("golden", "--checkpoint", str(checkpoint), "--out", str(golden)))
    if not (artifacts / "manifest.json").exists():
        results["export"] = run_measured(
            mvlm_compile("export", "--checkpoint", str(checkpoint), "--out", str(artifacts), "--dtype", "fp32")
        )
    results["fp32_decoder_gib"] = _size_gib(artifacts / "decoder.onnx")

    me = str(Path(__file__).resolve())
    for run in opts.runs:
        out = out_dir / f"{opts.preset}-int4-{run.replace(':', '-')}"
        report_path = out_dir / f"quantize_bench-{opts.preset}-{run.replace(':', '-')}.report.json"
        measured = run_measured(
            [sys.executable, me, "--child", "quantize", str(artifacts), str(out), str(golden), run, str(report_path)]
        )
        report = json.loads(report_path.read_text())
        results["runs"][run] = {
            **measured,
            "out": str(out),
            "int4_decoder_gib": _size_gib(out / "decoder.onnx"),
            "report": report,
        }
    if not opts.no_latency and opts.runs:
        first = out_dir / f"{opts.preset}-int4-{opts.runs[-1].replace(':', '-')}"
        latency_path = out_dir / f"quantize_bench-{opts.preset}-latency.json"
        results["latency"] = run_measured(
            [
                sys.executable,
                me,
                "--child",
                "latency",
                str(artifacts),
                str(first),
                str(opts.past),
                str(opts.steps),
                str(latency_path),
            ]
        )
        results["latency"].update(json.loads(latency_path.read_text()))

    print(f"\nFP32 decoder {results['fp32_decoder_gib']} GiB")
    header = (
        f"{'run':<12} {'seconds':>8} {'peak GiB':>9} {'INT4 GiB':>9} {'x FP16':>7} {'TF top-1':>9} {'TF KL':>8} "
        f"{'ans top-1':>9} {'ans KL':>8} {'greedy':>7} {'vision err':>10}"
    )
    print(header)
    for run, r in results["runs"].items():
        acc = r["report"]["accuracy"]
        d = acc["decoder"]
        tf, an = d["teacher_forced"], d["answer_positions"]
        vision = acc["components"]["vision.image_features"]["rel_to_scale"]
        print(
            f"{run:<12} {r['seconds']:>8} {r['peak_rss_gib']:>9} {r['int4_decoder_gib']:>9} "
            f"{r['report']['sizes']['int4_vs_fp16']:>7} "
            f"{tf['top1_agreement']:>9.4f} {tf['kl_mean']:>8.4f} {an['top1_agreement']:>9.4f} {an['kl_mean']:>8.4f} "
            f"{d['greedy']['prefix_match']:>3}/{d['greedy']['total_match']:<3} {vision:>10.3g}"
        )
    if "latency" in results:
        lat = results["latency"]
        print(
            f"decode step, past {lat['past']}: FP32 {lat['fp32']['median_ms']} ms, "
            f"INT4 {lat['int4']['median_ms']} ms (x{lat['int4_over_fp32']})"
        )
    out = opts.json or work / f"quantize_bench-{opts.preset}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
