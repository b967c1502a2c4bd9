"""The main job end to end on a full-size synthetic checkpoint: `build` (golden, export, optimize,
quantize; engines deferred without TensorRT) then `verify` of the bundle, with time and peak memory.

    python benchmarks/build_bench.py --preset mobilevlm-v2-1.7b --target orin-agx-64gb --workdir build/bench

Each command runs in its own process (peak memory: its max RSS, os.wait4). Per-stage seconds come
from the bundle's records. Prints a table and writes JSON (--json, default <workdir>/build_bench-<preset>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from measure import mvlm_compile, run_measured

EXIT_ENGINES_DEFERRED = 3


def _size_gib(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="mobilevlm-v2-1.7b", choices=["tiny", "mobilevlm-v2-1.7b", "mobilevlm-v2-3b"]
    )
    parser.add_argument("--target", default="orin-agx-64gb")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()

    checkpoint = opts.workdir / f"{opts.preset}-checkpoint"
    bundle = opts.workdir / f"{opts.preset}-bundle"
    results: dict = {"preset": opts.preset, "target": opts.target, "cpus": os.cpu_count()}
    if not (checkpoint / "config.json").exists():
        results["synth"] = run_measured(mvlm_compile("synth", "--preset", opts.preset, "--out", str(checkpoint)))
    shutil.rmtree(bundle, ignore_errors=True)  # a cold build: every stage runs
    build = mvlm_compile("build", str(checkpoint), "--target", opts.target, "--out", str(bundle))
    results["build"] = run_measured(build, ok=(0, EXIT_ENGINES_DEFERRED))
    golden = bundle / "golden"
    results["verify"] = run_measured(
        mvlm_compile(
            "verify", str(bundle), "--golden", str(golden), "--report", str(opts.workdir / "build_bench-verify.json")
        ),
        ok=(0, 1),
    )
    manifest = json.loads((bundle / "artifacts" / "manifest.json").read_text())
    results["stage_seconds"] = {name: stage.get("seconds") for name, stage in manifest["stages"].items()}
    results["bundle_gib"] = _size_gib(bundle)
    results["artifacts_gib"] = _size_gib(bundle / "artifacts") - _size_gib(bundle / "artifacts" / "reference")

    print(f"\n{'step':<8} {'seconds':>8} {'peak RSS GiB':>13} {'status':>7}")
    for step in ("synth", "build", "verify"):
        if step in results:
            r = results[step]
            print(f"{step:<8} {r['seconds']:>8} {r['peak_rss_gib']:>13} {r['status']:>7}")
    print(f"stages (s): {results['stage_seconds']}")
    print(f"bundle {results['bundle_gib']} GiB (artifacts without reference/ {results['artifacts_gib']:.2f} GiB)")
    out = opts.json or opts.workdir / f"build_bench-{opts.preset}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
