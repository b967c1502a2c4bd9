"""Time and peak memory of `synth` and `export` on a full-size synthetic checkpoint.

    python benchmarks/export_bench.py --preset mobilevlm-v2-1.7b --dtype fp32 --workdir /tmp/mvlm-bench

Each step runs in its own process; peak memory is that process's max RSS (os.wait4).
Prints a table and writes JSON (--json, default <workdir>/export_bench.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_measured(args: list[str]) -> dict:
    """Run `mvlm-compile ARGS` in a child process: wall seconds and peak RSS in GiB."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "mvlm_compile.cli", *args])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"mvlm-compile {' '.join(args)} failed with status {code}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def _size_gib(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mobilevlm-v2-1.7b", choices=["tiny", "mobilevlm-v2-1.7b", "mobilevlm-v2-3b"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="export precision")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()

    checkpoint = opts.workdir / f"{opts.preset}-checkpoint"
    artifacts = opts.workdir / f"{opts.preset}-{opts.dtype}-artifacts"
    results: dict = {"preset": opts.preset, "dtype": opts.dtype, "cpus": os.cpu_count()}
    if not (checkpoint / "config.json").exists():
        results["synth"] = run_measured(["synth", "--preset", opts.preset, "--out", str(checkpoint)])
    results["export"] = run_measured(
        ["export", "--checkpoint", str(checkpoint), "--out", str(artifacts), "--dtype", opts.dtype]
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
