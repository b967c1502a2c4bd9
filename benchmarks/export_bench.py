"""Time and peak memory of `synth` and `export` on a full-size synthetic checkpoint.

    python benchmarks/export_bench.py --preset mobilevlm-v2-1.7b --dtype fp32 --workdir /tmp/mvlm-bench

Each step runs in its own process; peak memory is that process's max RSS (os.wait4).
Prints a table and writes JSON (--json, default <workdir>/export_bench.json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from measure import mvlm_compile, run_measured


def _size_gib(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="mobilevlm-v2-1.7b", choices=["tiny", "mobilevlm-v2-1.7b", "mobilevlm-v2-3b"]
    )
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="export precision")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()

    checkpoint = opts.workdir / f"{opts.preset}-checkpoint"
    artifacts = opts.workdir / f"{opts.preset}-{opts.dtype}-artifacts"
    results: dict = {"preset": opts.preset, "dtype": opts.dtype, "cpus": os.cpu_count()}
    if not (checkpoint / "config.json").exists():
        results["synth"] = run_measured(mvlm_compile("synth", "--preset", opts.preset, "--out", str(checkpoint)))
    results["export"] = run_measured(
        mvlm_compile("export", "--checkpoint", str(checkpoint), "--out", str(artifacts), "--dtype", opts.dtype)
    )
    results["checkpoint_gib"] = _size_gib(checkpoint)
    results["artifacts_gib"] = _size_gib(artifacts)

    print(f"\n{'step':<8} {'seconds':>8} {'peak RSS GiB':>13}")
    for step in ("synth", "export"):
        if step in results:
            print(f"{step:<8} {results[step]['seconds']:>8} {results[step]['peak_rss_gib']:>13}")
    print(f"checkpoint {results['checkpoint_gib']} GiB, artifacts {results['artifacts_gib']} GiB")
    out = opts.json or opts.workdir / f"export_bench-{opts.preset}-{opts.dtype}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
