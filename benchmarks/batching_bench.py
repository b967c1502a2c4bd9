"""In-flight batching on a bundle (the full-size synthetic 1.7B in `make bench`), ONNX Runtime on this CPU,
in one run:

  1. the Python API (mvlm_compile.Session, --max-batch 8): 1, 2, 4 and 8 concurrent streams, each with
     an image of its own and 64 new tokens. Per level: time to first token (TTFT, submit -> first
     text), each stream's tokens/s after its first token, the worst gap between two tokens of a
     stream (while others join: their prompts are prefilled in chunks between decode steps), and the
     aggregate decode rate while the streams decode together: the decode rows the scheduler ran
     between the last stream's first token and the first stream's end, over that window (no prompt
     is prefilled then). The gain is that rate over the one-stream rate; floors 1.6x at 4, 2x at 8;
  2. the same through `mvlm-compile serve` under Locust (benchmarks/serve_bench.py's levels; needs
     the [bench] extra, else skipped): TTFT p50/p99 and tokens/s from the server's counter;
  3. ONNX Runtime's INT4 MatMulNBits alone at 1-8 rows (int4_kernel_bench.matmulnbits_batch_gain,
     a stack of 2048x5632 layers from memory): the gain the kernel allows on this CPU;
  4. the bytes one decode step moves on an Orin at batch 1, 4 and 8 (decode_traffic.batched_decode_traffic).

    python benchmarks/batching_bench.py BUNDLE [--report FILE] [--streams 1 2 4 8] [--max-tokens 64]

Writes the report (JSON) and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_traffic import batched_decode_traffic  # noqa: E402
from int4_kernel_bench import matmulnbits_batch_gain  # noqa: E402

from mvlm_compile.fileio import write_json  # noqa: E402
from mvlm_compile.table import render_table  # noqa: E402

QUESTION = "Describe the image in detail."
FLOORS = {4: 1.6, 8: 2.0}  # aggregate decode rate over one stream's, on this 2-core machine


def images(count: int) -> list:
    """A distinct image per stream (the shapes task's scenes)."""
    from mvlm_compile.tinytask.scenes import draw_scene, sample_scene

    return [draw_scene(sample_scene((7000 + i,))) for i in range(count)]


def api_level(session, streams: int, max_tokens: int, pictures: list) -> dict:
    """`streams` requests submitted together from threads of their own; timings per stream and step."""
    steps: list[tuple[float, int]] = []  # (end time, decode rows)
    listener = lambda info: steps.append((time.perf_counter(), info.decode_rows))  # noqa: E731
    session.add_step_listener(listener)
    record: list[dict] = [{} for _ in range(streams)]

    def one(i: int) -> None:
        submitted = time.perf_counter()
        times = []
        stream = session.generate(pictures[i], QUESTION, max_tokens=max_tokens, stop=(), stream=True)
        for _ in stream:
            times.append(time.perf_counter())
        record[i] = {"submitted": submitted, "times": times, "tokens": stream.generation.completion_tokens}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    session._scheduler.listeners.remove(listener)

    together_from = max(r["times"][0] for r in record)
    together_to = min(r["times"][-1] for r in record)
    rows = sum(n for at, n in steps if together_from < at <= together_to)
    window = together_to - together_from
    per_stream = [(r["tokens"] - 1) / (r["times"][-1] - r["times"][0]) for r in record if r["tokens"] > 1]
    gaps = [max(b - a for a, b in zip(r["times"], r["times"][1:])) for r in record if len(r["times"]) > 1]
    decode_steps = [b[0] - a[0] for a, b in zip(steps, steps[1:]) if a[1] == b[1] == streams]
    return {
        "streams": streams,
        "tokens": [r["tokens"] for r in record],
        "ttft_s": {
            "p50": round(statistics.median(r["times"][0] - r["submitted"] for r in record), 2),
            "max": round(max(r["times"][0] - r["submitted"] for r in record), 2),
        },
        "per_stream_tok_s": round(statistics.median(per_stream), 2),
        "aggregate_decode_tok_s": round(rows / window, 2) if window > 0 and rows else None,
        "decode_window_s": round(window, 1),
        "worst_inter_token_gap_s": round(max(gaps), 2),
        "decode_step_s_p50": round(statistics.median(decode_steps), 3) if decode_steps else None,
    }


def api_levels(bundle: Path, levels: list[int], max_tokens: int, chunk: int, threads: int) -> list[dict]:
    from mvlm_compile import Session

    pictures = images(max(levels))
    with Session(bundle, threads=threads, max_batch=max(levels), prefill_chunk=chunk, image_cache_size=0) as session:
        session.generate(pictures[0], QUESTION, max_tokens=2, stop=())  # first runs: allocations
        results = []
        for streams in levels:
            result = api_level(session, streams, max_tokens, pictures)
            print(f"[batching_bench] API, {streams} stream(s): {json.dumps(result)}", file=sys.stderr, flush=True)
            results.append(result)
    one = results[0]["aggregate_decode_tok_s"]
    for r in results:
        r["gain_over_one_stream"] = (
            round(r["aggregate_decode_tok_s"] / one, 2) if one and r["aggregate_decode_tok_s"] else None
        )
        floor = FLOORS.get(r["streams"])
        r["floor"] = floor
        r["meets_floor"] = (
            None if floor is None or r["gain_over_one_stream"] is None else r["gain_over_one_stream"] >= floor
        )
    return results


def logit_agreement(bundle: Path, rows: int = 4, steps: int = 16, threads: int = 0) -> dict:
    """Batched decode steps against the same steps one sequence at a time: `rows` sequences (an image
    each, prompts of different lengths) greedy-decoded together for `steps` steps; then each sequence
    alone, fed the same tokens: every step's logits compared (the largest |difference| over the
    logits' scale, the lowest cosine, how often the greedy token is the same)."""
    import numpy as np

    from mvlm_compile import Session

    pictures = images(rows)
    with Session(bundle, threads=threads, max_batch=rows) as session:
        pipeline = session._chat.pipeline
        prompts = []
        for i in range(rows):
            ids = session._chat.prepare(QUESTION + " Say more." * i, 1, ()).prompt_ids
            pixels = session._image_key(pictures[i])[1]
            prompts.append(pipeline.splice(ids, pipeline.image_embeds(pixels)))
        session.close()  # its scheduler is done with the cache: the loops below drive the decoder
        batched = pipeline.backend.decoder(rows)
        fed = [[int(batched.step(i, p)[0].argmax())] for i, p in enumerate(prompts)]
        together = []
        for _ in range(steps):
            logits = batched.step(0, pipeline.embed([f[-1] for f in fed])[0][:, None])
            together.append(logits)
            for f, row in zip(fed, logits):
                f.append(int(row.argmax()))
        alone = pipeline.backend.decoder(1)
        worst_rel, worst_cos, same, total = 0.0, 1.0, 0, 0
        for i in range(rows):
            alone.reset()
            alone.step(0, prompts[i])
            for step in range(steps):
                reference = alone.step(0, pipeline.embed([fed[i][step]]))[0]
                got = together[step][i]
                worst_rel = max(worst_rel, float(np.abs(got - reference).max() / np.abs(reference).max()))
                cosine = float(got @ reference / (np.linalg.norm(got) * np.linalg.norm(reference)))
                worst_cos = min(worst_cos, cosine)
                same += int(got.argmax() == reference.argmax())
                total += 1
    return {
        "rows": rows,
        "steps": steps,
        "max_rel_to_scale": round(worst_rel, 6),
        "min_cosine": round(worst_cos, 8),
        "argmax_same": f"{same}/{total}",
    }


def serve_levels(bundle: Path, levels: list[int], duration: int, chunk: int, threads: int) -> dict:
    """benchmarks/serve_bench.py's Locust levels against `serve BUNDLE --max-batch max(levels)`."""
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        return {"skipped": "Locust is not installed (pip install -e '.[bench]')"}
    from serve_bench import run_level, start_server

    from mvlm_compile.ports import free_ports

    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    options = ("--max-batch", str(max(levels)), "--prefill-chunk", str(chunk))
    with tempfile.TemporaryDirectory(prefix="batching-bench-") as scratch:
        server = start_server(bundle, port, threads, Path(scratch) / "serve.log", options, ready_within=600)
        try:
            results = []
            for users in levels:
                result = run_level(url, users, duration, Path(scratch), None)  # random weights: no known answer
                print(f"[batching_bench] serve, {users} user(s): {json.dumps(result)}", file=sys.stderr, flush=True)
                results.append(result)
        finally:
            server.terminate()
            server.wait(timeout=120)
    return {"duration_s": duration, "levels": results}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    api = report["api"]
    streams = [r["streams"] for r in api]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(streams, [r["aggregate_decode_tok_s"] for r in api], "o-", label="aggregate decode (API)")
    left.plot(streams, [r["per_stream_tok_s"] for r in api], "s--", label="per stream (API)")
    serve = report["serve"].get("levels")
    if serve:
        left.plot([r["users"] for r in serve], [r["tokens_per_s"] for r in serve], "^:", label="serve (Locust)")
    left.set(xlabel="concurrent streams", ylabel="tokens/s", xticks=streams, title="Decode rate")
    left.legend()
    kernel = report["kernel"]["per_rows"]
    right.plot([k["rows"] for k in kernel], [k["gain"] for k in kernel], "o-", label="MatMulNBits alone")
    right.plot(streams, [r["gain_over_one_stream"] for r in api], "s-", label="scheduler (API)")
    right.set(xlabel="rows / streams", ylabel="gain over 1", xticks=streams, title="Batching gain on this CPU")
    right.legend()
    fig.suptitle(f"In-flight batching, {report['model']} (ONNX Runtime, {report['host']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "batching_bench-1.7b.json")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--serve-duration", type=int, default=90, help="Seconds per Locust level.")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--kernel-layers", type=int, default=104, help="MatMulNBits stack (104: about 0.6 GB).")
    args = parser.parse_args()
    args.report.parent.mkdir(parents=True, exist_ok=True)

    from mvlm_compile.bundle import resolve_artifacts

    manifest = json.loads((resolve_artifacts(args.bundle)[1] / "manifest.json").read_text())
    report = {
        "model": manifest["model"].get("recipe"),
        "host": {"cores": len(os.sched_getaffinity(0)), "cpu": platform.processor(), "load": os.getloadavg()},
        "settings": {"max_tokens": args.max_tokens, "prefill_chunk": args.prefill_chunk, "question": QUESTION},
    }
    report["kernel"] = matmulnbits_batch_gain(rows=(1, 2, 4, 8), layers=args.kernel_layers, repeats=10)
    report["api"] = api_levels(args.bundle, args.streams, args.max_tokens, args.prefill_chunk, args.threads)
    report["logit_agreement"] = logit_agreement(args.bundle, threads=args.threads)
    report["serve"] = serve_levels(args.bundle, args.streams, args.serve_duration, args.prefill_chunk, args.threads)
    report["orin_traffic"] = batched_decode_traffic()
    report["host"]["load_after"] = os.getloadavg()
    write_json(args.report, report)
    rows = [
        (
            r["streams"],
            r["ttft_s"]["p50"],
            r["per_stream_tok_s"],
            r["aggregate_decode_tok_s"],
            r["gain_over_one_stream"],
            next((round(k["gain"], 2) for k in report["kernel"]["per_rows"] if k["rows"] == r["streams"]), ""),
            r["worst_inter_token_gap_s"],
        )
        for r in report["api"]
    ]
    header = (
        "streams",
        "TTFT p50 s",
        "tok/s per stream",
        "aggregate decode tok/s",
        "gain",
        "kernel gain",
        "worst gap s",
    )
    print(render_table(header, rows))
    try:
        plot(report, args.report.with_suffix(".png"))
    except ImportError:
        print("[batching_bench] no matplotlib: no plot", file=sys.stderr)
    failed = [r["streams"] for r in report["api"] if r["meets_floor"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
