"""The shapes model's answers on the held-out eval split at every precision we deploy, through
ONNX Runtime (the runtime the engines use): exact match and agreement with the FP32 PyTorch
reference, for FP32 ONNX, FP16 vision/projector, all-FP16 graphs and INT4 RTN / AWQ decoders at
several group sizes (also with int8 activations, as run and bench use them); and every variant's
`verify` (components, greedy tokens, task gate) with the recipe's tolerances. The numbers behind
recipes/tiny-shapes.yaml's tolerances.

    python benchmarks/task_bench.py --workdir build/task-bench [--group-sizes 32 64 128] [--items N]

Calibration (AWQ): the recipe's, the first samples of the task's train split; evaluation: the
eval split recorded in golden/tiny-shapes/task.json (other seeds, held-out combinations and
phrasings). Also measured for comparison: the greedy-token agreement of the random-weight tiny
model's INT4 AWQ decoder with its FP32 golden tokens. Prints a table and writes
<workdir>/task_bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[task-bench] {message}", file=sys.stderr, flush=True)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def make_variants(checkpoint: Path, workdir: Path, group_sizes: list[int]) -> dict[str, Path]:
    """Artifacts directories, one per precision variant, built like `build` builds a bundle."""
    from mvlm_compile.export.exporter import export_artifacts
    from mvlm_compile.manifest import keep_reference, load_manifest
    from mvlm_compile.quantize import quantize_artifacts, resolve_settings
    from mvlm_compile.quantize.calibration import spec_for_recipe
    from mvlm_compile.recipes import load_recipe
    from mvlm_compile.surgery import optimize_artifacts

    variants: dict[str, Path] = {}
    for dtype in ("fp32", "fp16"):
        out = _fresh(workdir / f"export-{dtype}")
        log(f"export {dtype} + optimize")
        export_artifacts(checkpoint, out, dtype=dtype)
        keep_reference(out)
        optimize_artifacts(out)
        variants[f"{dtype} (all graphs)"] = out
    fp32, fp16 = variants["fp32 (all graphs)"], variants["fp16 (all graphs)"]
    manifest = load_manifest(fp16)
    calibration = spec_for_recipe(load_recipe(manifest.model["recipe"]))
    log("FP16 vision/projector, FP32 decoder")
    out = _fresh(workdir / "fp16-vision-projector")
    quantize_artifacts(fp32, resolve_settings(load_manifest(fp32), decoder="none"), out=out)
    variants["fp16 vision/projector, fp32 decoder"] = out
    for method in ("rtn", "awq"):
        for group in group_sizes:
            log(f"INT4 {method} group {group} (FP16 activations, FP16 vision/projector)")
            out = _fresh(workdir / f"int4-{method}-g{group}")
            settings = resolve_settings(manifest, method=method, group_size=group)
            quantize_artifacts(fp16, settings, calibration, out=out)
            variants[f"int4 {method} g{group}"] = out
    return variants


def evaluate(variants: dict[str, Path], golden: Path, items: int | None) -> dict:
    from mvlm_compile.recipes import load_recipe
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.verify.task_eval import evaluate_task
    from mvlm_compile.verify.verifier import verify

    results = {}
    for name, artifacts in variants.items():
        log(f"evaluating {name}")
        with OrtBackend(artifacts) as backend:
            tolerances = load_recipe(backend.manifest.model["recipe"]).tolerances
            started = time.perf_counter()
            task = evaluate_task(backend, golden, tolerances, items)
            seconds = time.perf_counter() - started
            checked = verify(backend, golden, tolerances=tolerances, task_items=0)
            int4 = backend.manifest.graphs["decoder"].get("dtype") == "int4"
        # The INT4 decoders again as run and bench use them: int8 activations (MatMulNBits level 4).
        task_int8 = None
        if int4:
            with OrtBackend(artifacts, int4_activations="int8") as backend:
                task_int8 = evaluate_task(backend, golden, tolerances, items)
        components = checked.checks
        results[name] = {
            "artifacts": str(artifacts),
            "task": task,
            "task_int8_activations": task_int8,
            "task_seconds": round(seconds, 1),
            "verify_passed": checked.passed and task.passed,
            "worst_rel_to_scale": max(c.metrics["rel_to_scale"] for c in components),
            "worst_cosine": min(c.metrics["cosine"] for c in components),
            "worst_component": max(components, key=lambda c: c.metrics["rel_to_scale"]).output,
            "greedy": {k: checked.greedy[k] for k in ("prefix", "matching", "total", "required_prefix", "passed")},
        }
    return results


def random_model_agreement(workdir: Path) -> dict:
    """Greedy agreement of the random-weight tiny model's INT4 AWQ decoder with its FP32 tokens."""
    from mvlm_compile.export.exporter import export_artifacts
    from mvlm_compile.model.golden import write_golden
    from mvlm_compile.model.synth import write_synthetic_checkpoint
    from mvlm_compile.quantize import quantize_artifacts
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.verify.verifier import greedy_check

    log("random tiny model: synth, golden, export fp16, INT4 AWQ")
    checkpoint = write_synthetic_checkpoint("tiny", _fresh(workdir / "random-tiny-checkpoint"), seed=0)
    golden, artifacts = _fresh(workdir / "random-tiny-golden"), _fresh(workdir / "random-tiny-fp16")
    write_golden(checkpoint, golden)
    export_artifacts(checkpoint, artifacts, dtype="fp16")
    out = _fresh(workdir / "random-tiny-int4-awq")
    quantize_artifacts(artifacts, out=out)
    with OrtBackend(out) as backend:
        greedy = greedy_check(backend, golden, {"int4"}, {"int4": {"greedy_prefix": 0}})
    return {k: greedy[k] for k in ("prefix", "matching", "total")}


def table(results: dict) -> str:
    from mvlm_compile.table import render_table

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    rows = []
    for name, r in results.items():
        s = r["task"].summary()
        s8 = r["task_int8_activations"].summary() if r["task_int8_activations"] else {}
        rows.append(
            (
                name,
                pct(s["exact_match"]),
                pct(s8.get("exact_match")),
                pct(s["held_out_combination"]),
                pct(s["held_out_phrasing"]),
                pct(s["seen"]),
                pct(s["identical_to_reference"]),
                pct(s8.get("identical_to_reference")),
                pct(s["token_agreement"]),
                f"{r['worst_rel_to_scale']:.3g}",
                f"{r['worst_cosine']:.5f}",
                f"{r['greedy']['prefix']}/{r['greedy']['total']}",
                "ok" if r["verify_passed"] else "FAIL",
            )
        )
    header = (
        "variant",
        "exact %",
        "exact %, int8 act",
        "held-out combos %",
        "held-out wording %",
        "seen %",
        "identical to FP32 ref %",
        "identical %, int8 act",
        "token agreement %",
        "worst err/scale",
        "worst cosine",
        "golden prefix",
        "verify",
    )
    return render_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "models" / "tiny-shapes")
    parser.add_argument("--golden", type=Path, default=REPO / "golden" / "tiny-shapes")
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "task-bench")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--items", type=int, default=None, help="first N eval items (default: all)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    variants = make_variants(args.checkpoint, args.workdir, args.group_sizes)
    results = evaluate(variants, args.golden, args.items)
    random = random_model_agreement(args.workdir)
    print(table(results))
    print(
        "random-weight tiny model, INT4 AWQ g32 vs its FP32 golden: "
        f"greedy prefix {random['prefix']}/{random['total']}, {random['matching']}/{random['total']} tokens match"
    )
    record = {
        "checkpoint": str(args.checkpoint),
        "golden": str(args.golden),
        "calibration": "the recipe's: the first samples of the task's train split (never the eval split)",
        "variants": {
            name: {
                **{k: v for k, v in r.items() if k not in ("task", "task_int8_activations")},
                "task": r["task"].summary(),
                "gate": r["task"].gate(),
                "task_int8_activations": r["task_int8_activations"] and r["task_int8_activations"].summary(),
            }
            for name, r in results.items()
        },
        "random_tiny_int4_awq_greedy": random,
    }
    (args.workdir / "task_bench.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {args.workdir / 'task_bench.json'}")


if __name__ == "__main__":
    main()
