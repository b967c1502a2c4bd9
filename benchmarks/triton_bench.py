"""perf_analyzer against the Triton repository of the embedded shapes model (INT4 decoder, ONNX Runtime)
on this machine's CPU tritonserver: latency and throughput of streamed answers at concurrency 1, 2, 4.

    python benchmarks/triton_bench.py --workdir build/bench/triton [--concurrency 1 2 4] [--instances 1] [--report FILE]

The bundle is built like `make demo` builds it; the repository is `mvlm-compile triton`'s; the server
is started as `mvlm-compile triton --serve` starts it (mvlm_compile.triton.server). Requests are the
200 held-out questions of the task's eval split, each about its own image, sent in turn (so the
session's image-embedding cache, 32 images, never holds the next one: every request runs the
vision encoder and projector), max_tokens 64, streamed over gRPC (--streaming: one response per
text piece). perf_analyzer is Triton's own (tritonclient 2.51's wheel ships it for Linux x86-64; later
wheels need glibc 2.38 or do not ship it; genai-perf 0.0.16 needs the `perf-analyzer` package, of
which PyPI serves this machine only a placeholder, 0.1.0), downloaded into the workdir with pip. Its
two missing libraries are linked to nvidia-pytriton's copies. Per request, from perf_analyzer's
profile export: time to first piece, time between pieces, total latency; per concurrency: requests/s
and pieces/s over the measurement. Prints a table and writes the JSON report.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

from mvlm_compile.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
PERF_ANALYZER_WHEEL = "tritonclient==2.51.0"  # the server's core version; its wheel carries bin/perf_analyzer
MODEL = "mobilevlm"
MAX_TOKENS = 64
REQUESTS_DATA = 200  # distinct questions and images, more than the image cache holds
QUANTITIES = ("time_to_first_piece_ms", "time_between_pieces_ms", "request_latency_ms")


def log(message: str) -> None:
    print(f"[triton-bench] {message}", file=sys.stderr, flush=True)


def perf_analyzer(workdir: Path) -> tuple[Path, dict[str, str]]:
    """(perf_analyzer, its environment): from tritonclient 2.51's wheel, libraries from nvidia-pytriton's."""
    from mvlm_compile.triton.server import find_server_files

    tools = workdir / "perf_analyzer"
    binary = tools / "perf_analyzer"
    libraries = tools / "lib"
    if not binary.exists():
        wheels = tools / "wheels"
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
        command += ["--platform", "manylinux1_x86_64", "-d", str(wheels), PERF_ANALYZER_WHEEL]
        subprocess.run(command, check=True)
        with zipfile.ZipFile(next(wheels.glob("tritonclient-*.whl"))) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith("/bin/perf_analyzer"))
            binary.write_bytes(wheel.read(member))
        binary.chmod(0o755)
        libraries.mkdir(exist_ok=True)
        bundled = find_server_files().libraries
        for wanted, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
            (libraries / wanted).unlink(missing_ok=True)
            (libraries / wanted).symlink_to(next(bundled.glob(pattern)))
    return binary, {"LD_LIBRARY_PATH": str(libraries)}


def requests_data(path: Path, count: int) -> list[dict]:
    """perf_analyzer's --input-data: held-out eval questions, each with its own image (PNG bytes)."""
    from mvlm_compile.tinytask.dataset import eval_items
    from mvlm_compile.tinytask.scenes import draw_scene

    data = []
    for item in eval_items(count):
        png = io.BytesIO()
        draw_scene(item.scene()).save(png, format="PNG")
        image = list(png.getvalue())
        data.append(
            {
                "text_input": [item.question],
                "image": {"content": image, "shape": [len(image)]},
                "max_tokens": [MAX_TOKENS],
                "stream": [True],
            }
        )
    path.write_text(json.dumps({"data": data}))
    return data


def summarise(export: dict, concurrency: int) -> dict:
    """Figures of one concurrency level from perf_analyzer's profile export (timestamps in ns)."""
    (experiment,) = [e for e in export["experiments"] if e["experiment"]["value"] == concurrency]
    requests = [r for r in experiment["requests"] if r["response_timestamps"]]
    first, between, total, pieces = [], [], [], 0
    for r in requests:
        # The final response is empty (no text_output): pieces are the others.
        times = [t for t, out in zip(r["response_timestamps"], r["response_outputs"]) if out.get("text_output")]
        pieces += len(times)
        first.append((times[0] - r["timestamp"]) / 1e6)
        total.append((r["response_timestamps"][-1] - r["timestamp"]) / 1e6)
        between += [(b - a) / 1e6 for a, b in zip(times, times[1:])]
    start = min(r["timestamp"] for r in requests)
    end = max(r["response_timestamps"][-1] for r in requests)
    seconds = (end - start) / 1e9

    def quantiles(values: list[float]) -> dict:
        cuts = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
        return {"median": round(statistics.median(values), 2), "p90": round(cuts[89], 2), "p99": round(cuts[98], 2)}

    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "requests_per_s": round(len(requests) / seconds, 3),
        "pieces_per_s": round(pieces / seconds, 2),
        "pieces_per_request": round(pieces / len(requests), 1),
        "time_to_first_piece_ms": quantiles(first),
        "time_between_pieces_ms": quantiles(between),
        "request_latency_ms": quantiles(total),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "bench" / "triton")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--instances", type=int, default=1, help="the entry model's instance_group count")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement window")
    parser.add_argument("--python", type=Path, default=REPO / ".venv" / "triton-python" / "bin" / "python")
    parser.add_argument(
        "--report", type=Path, default=REPO / "benchmarks" / "results" / "triton_bench-tiny-shapes.json"
    )
    args = parser.parse_args()

    from mvlm_compile.table import render_table
    from mvlm_compile.triton.repository import make_repository
    from mvlm_compile.triton.server import Ports, local_server

    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = workdir / "bundle"
    log("building the shapes bundle (engines deferred: exit status 3 expected)")
    mvlm = [str(Path(sys.executable).parent / "mvlm-compile")]
    build = [*mvlm, "build", str(REPO / "models" / "tiny-shapes"), "--target", "orin-agx-64gb", "--out", str(bundle)]
    done = subprocess.run(build)
    if done.returncode not in (0, 3):
        return done.returncode
    binary, env = perf_analyzer(workdir)
    repository = make_repository(bundle, workdir / "repo", instances=args.instances)
    data = requests_data(workdir / "requests.json", REQUESTS_DATA)
    http, grpc, metrics = free_ports(3)
    results = []
    load_before = os.getloadavg()[0]  # other work on the machine skews the figures: recorded with them
    with local_server(repository.path, workdir, args.python, Ports(http, grpc, metrics)):
        for concurrency in args.concurrency:
            log(f"perf_analyzer at concurrency {concurrency}")
            export = workdir / f"profile-{concurrency}.json"
            export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite it
            command = [
                str(binary),
                *("-m", MODEL, "-i", "grpc", "-u", f"127.0.0.1:{grpc}", "--streaming"),
                *("--input-data", str(workdir / "requests.json")),
                *("--concurrency-range", f"{concurrency}:{concurrency}"),
                *("--measurement-mode", "count_windows", "--measurement-request-count", str(args.requests)),
                *("--stability-percentage", "50", "--max-trials", "5"),
                *("--profile-export-file", str(export), "-f", str(workdir / f"perf-{concurrency}.csv")),
            ]
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            results.append(summarise(json.loads(export.read_text()), concurrency))
    report = {
        "model": "tiny-shapes (INT4 AWQ decoder, FP16 vision/projector), ONNX Runtime on CPU, int8 activations",
        "server": "tritonserver 2.51 (nvidia-pytriton 0.7.0, CPU), Python backend, decoupled",
        "client": f"perf_analyzer 2.51 (gRPC, --streaming), {len(data)} held-out questions, each its image, in turn",
        "instances": args.instances,
        "max_tokens": MAX_TOKENS,
        "host": {
            "cpus": len(os.sched_getaffinity(0)),
            "machine": platform.machine(),
            "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "results": results,
    }
    report_path = args.report or workdir / "triton_bench-tiny-shapes.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(workdir / "repo", ignore_errors=True)
    rows = [
        (
            r["concurrency"],
            f"{r['requests_per_s']:.2f}",
            f"{r['pieces_per_s']:.1f}",
            *(f"{r[k]['median']:.1f} / {r[k]['p90']:.1f}" for k in QUANTITIES),
        )
        for r in results
    ]
    print(render_table(("concurrency", "requests/s", "pieces/s", *(f"{k} (med/p90)" for k in QUANTITIES)), rows))
    log(f"report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
