"""Load on `mvlm-compile serve`: Locust (benchmarks/serve_locustfile.py) at 1, 2, 4 and 8 concurrent
users against a real server on the embedded tiny-shapes bundle.

    pip install -e '.[serve,bench]'
    python benchmarks/serve_bench.py --workdir build/bench [--report FILE] [--users 1 2 4 8] [--duration 20]

The bundle is built once into --workdir (`mvlm-compile build models/tiny-shapes`; exit 3, engines
deferred, is expected without TensorRT) and served with ONNX Runtime on this host's CPU, with
--image-cache-size 0 so that every request runs the vision encoder as a new image would. Each level
runs Locust headless for --duration seconds (users start together and keep one streamed request in
flight each); reported: TTFT (request sent -> first text) and answer time (-> [DONE]) p50/p99 from
Locust's statistics, generated tokens per second from the server's own counter
(mvlm_completion_tokens_total) over the level's wall time, requests/s and errors (failed requests:
an HTTP error, a stream without finish_reason or [DONE], or a wrong greedy answer; must be 0).
The report (JSON, with a table and the machine's load) goes to --report, the plot next to it.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mvlm_compile.fileio import write_json
from mvlm_compile.ports import free_ports
from mvlm_compile.table import render_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import mvlm_compile  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().parent / "serve_locustfile.py"
EXIT_SKIPPED = 3  # Locust is not installed: `make bench` goes on without this benchmark
REQUEST_ENTRY, TTFT_ENTRY, ANSWER_ENTRY = ("POST", "/v1/chat/completions"), ("TTFT", "chat"), ("ANSWER", "chat")


def build_bundle(workdir: Path) -> Path:
    bundle = workdir / "tiny-shapes-bundle"
    if not (bundle / "artifacts" / "manifest.json").exists():
        argv = mvlm_compile("build", str(ROOT / "models" / "tiny-shapes"), "--target", "orin-agx-64gb")
        done = subprocess.run([*argv, "--out", str(bundle)])
        if done.returncode not in (0, 3):
            raise SystemExit(f"building the tiny-shapes bundle failed with status {done.returncode}")
    return bundle


def start_server(
    bundle: Path, port: int, threads: int, log: Path, options: tuple[str, ...] = (), ready_within: int = 300
) -> subprocess.Popen:
    """`mvlm-compile serve BUNDLE` (every request a new image: no image cache) with `options`, once /health is 200."""
    argv = mvlm_compile("serve", str(bundle), "--port", str(port), "--image-cache-size", "0", "--max-queue", "32")
    argv += [*options, "--threads", str(threads), "--log-level", "warning"]
    server = subprocess.Popen(argv, stderr=log.open("w"))
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server was not ready within {ready_within} s; see {log}")


def completion_tokens(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("mvlm_completion_tokens_total "):
            return float(line.split()[1])
    raise SystemExit("the server's /metrics has no mvlm_completion_tokens_total")


def run_level(url: str, users: int, duration: int, scratch: Path, expected: str | None) -> dict:
    """One Locust level; `expected`: the greedy answer to the first question (None: not checked)."""
    prefix = scratch / f"users{users}"
    argv = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"),
        *("-u", str(users), "-r", str(users), "-t", f"{duration}s", "--stop-timeout", "30"),
        *("-H", url, "--csv", str(prefix), "--loglevel", "WARNING", "--exit-code-on-error", "0"),
    ]
    tokens_before, started = completion_tokens(url), time.perf_counter()
    with open(f"{prefix}.log", "w") as log:
        env = {**os.environ, **({} if expected is None else {"SERVE_BENCH_EXPECTED": expected})}
        subprocess.run(argv, check=True, env=env, stdout=log, stderr=log)
    seconds = time.perf_counter() - started
    tokens = completion_tokens(url) - tokens_before
    with open(f"{prefix}_stats.csv", newline="") as f:
        stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    with open(f"{prefix}_failures.csv", newline="") as f:
        failures = [f"{row['Occurrences']}x {row['Error']}" for row in csv.DictReader(f)]
    request, ttft, answer = stats[REQUEST_ENTRY], stats.get(TTFT_ENTRY), stats.get(ANSWER_ENTRY)
    count = int(request["Request Count"])
    return {
        "users": users,
        "seconds": round(seconds, 1),
        "requests": count,
        "errors": int(request["Failure Count"]),
        "failures": failures,
        "requests_per_s": round(count / seconds, 2),
        "completion_tokens": int(tokens),
        "tokens_per_s": round(tokens / seconds, 1),
        "ttft_ms": {"p50": float(ttft["50%"]), "p99": float(ttft["99%"])} if ttft else None,
        "answer_ms": {"p50": float(answer["50%"]), "p99": float(answer["99%"])} if answer else None,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    levels = report["levels"]
    users = [level["users"] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("p50", "o-"), ("p99", "s--")):
        left.plot(users, [level["ttft_ms"][key] for level in levels], style, label=f"TTFT {key}")
    left.set(xlabel="concurrent users", ylabel="ms", title="time to first token", xticks=users)
    left.legend()
    right.plot(users, [level["tokens_per_s"] for level in levels], "o-")
    right.set(xlabel="concurrent users", ylabel="generated tokens / s", title="throughput", xticks=users)
    fig.suptitle(f"mvlm-compile serve, tiny-shapes, ONNX Runtime on {report['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "serve_bench-tiny-shapes.json")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--duration", type=int, default=20, help="Seconds per level.")
    parser.add_argument("--threads", type=int, default=0, help="The server's ONNX Runtime threads (0: one per core).")
    args = parser.parse_args()
    if importlib.util.find_spec("locust") is None:
        print("serve_bench: skipped, Locust is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return EXIT_SKIPPED

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import shapes_reference_answer  # the FP32 reference's answer, as the tests take it

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(args.workdir)
    port = free_ports()[0]
    url = f"http://127.0.0.1:{port}"
    server = start_server(bundle, port, args.threads, args.workdir / "serve_bench-server.log")
    levels = []
    try:
        with tempfile.TemporaryDirectory(prefix="serve_bench.") as scratch:
            for users in args.users:
                levels.append(run_level(url, users, args.duration, Path(scratch), shapes_reference_answer()[0]))
                print(f"[serve_bench] {users} users: {json.dumps(levels[-1])}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(60)
    report = {
        "server": {
            "command": "mvlm-compile serve BUNDLE --image-cache-size 0 --max-queue 32 --threads " + str(args.threads),
            "bundle": "models/tiny-shapes built for orin-agx-64gb (INT4 AWQ decoder, FP16 vision), backend ort",
            "request": "streamed, greedy, max_tokens 64, one 336x336 PNG as a data URL, 3 questions in turn",
            "exit_status": server.returncode,
        },
        "tool": "locust "
        + subprocess.run([sys.executable, "-m", "locust", "--version"], capture_output=True, text=True).stdout.split()[
            1
        ],
        "duration_s": args.duration,
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "levels": levels,
    }
    header = ("users", "requests", "errors", "req/s", "TTFT p50 ms", "TTFT p99 ms", "answer p50 ms", "tokens/s")
    rows = [
        (
            level["users"],
            level["requests"],
            level["errors"],
            level["requests_per_s"],
            level["ttft_ms"]["p50"] if level["ttft_ms"] else "-",
            level["ttft_ms"]["p99"] if level["ttft_ms"] else "-",
            level["answer_ms"]["p50"] if level["answer_ms"] else "-",
            level["tokens_per_s"],
        )
        for level in levels
    ]
    report["table"] = render_table(header, rows)
    print(report["table"])
    write_json(args.report, report)
    if importlib.util.find_spec("matplotlib") is None:
        print("serve_bench: no plot, matplotlib is not installed: pip install -e '.[bench]'", file=sys.stderr)
    else:
        plot(report, args.report.with_suffix(".png"))
    errors = sum(level["errors"] for level in levels)
    if errors or server.returncode != 0:
        print(f"serve_bench: {errors} failed requests; server exit status {server.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
