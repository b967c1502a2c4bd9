"""Prefix reuse in conversations on a bundle (the full-size synthetic 1.7B in `make bench`), ONNX
Runtime on this CPU, in one run.

The same 3-turn conversation about an image is held twice per repeat, each time about a new image:
once by a Session that keeps finished turns' K/V (the default prefix cache) and once by one that
keeps none (--prefix-cache-mib 0). Per turn: the time to first token (TTFT: from `ask` to the first
text piece, the turn's whole prompt tokenized, reused or prefilled), the prompt's tokens and those
reused. The image's embeddings are cached by both sessions (a second turn runs no vision encoder
either way), so the difference is the prefill the reuse saves. Then one more request from the
reusing session, a first turn about the same image as the conversation before it: what a shared
system prompt and image save across requests. Floor: the second turn's TTFT with reuse is at most
0.25x the TTFT without it.

    python benchmarks/conversation_bench.py BUNDLE [--report FILE] [--repeats 3] [--max-tokens 32]

Writes the report (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mvlm_compile.fileio import write_json  # noqa: E402
from mvlm_compile.table import render_table  # noqa: E402

QUESTIONS = [
    "Describe the image in detail.",
    "What colour is the shape on the left, and what is next to it?",
    "How many shapes are there in all? Answer with one number.",
]
FLOOR = 0.25  # the second turn's TTFT with reuse over without


def picture(i: int):
    from mvlm_compile.tinytask.scenes import draw_scene, sample_scene

    return draw_scene(sample_scene((8000 + i,)))


def ask(chat, question: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    stream = chat.ask(question, stream=True, max_tokens=max_tokens)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    generation = stream.generation
    return {
        "ttft_s": round((first or time.perf_counter()) - started, 4),
        "prompt_tokens": generation.prompt_tokens,
        "cached_tokens": generation.cached_tokens,
        "completion_tokens": generation.completion_tokens,
        "text": generation.text,
    }


def conversations(session, repeats: int, max_tokens: int, offset: int) -> list[list[dict]]:
    """`repeats` conversations, each about an image of its own."""
    runs = []
    for r in range(repeats):
        chat = session.conversation(image=picture(offset + r))
        runs.append([ask(chat, q, max_tokens) for q in QUESTIONS])
        print(
            f"[conversation_bench] conversation {r + 1}/{repeats}: {[t['ttft_s'] for t in runs[-1]]}", file=sys.stderr
        )
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "conversation_bench-1.7b.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--int4-activations", choices=["int8", "fp32"], default="int8")
    args = parser.parse_args()
    args.report.parent.mkdir(parents=True, exist_ok=True)

    from mvlm_compile import Session
    from mvlm_compile.bundle import resolve_artifacts

    manifest = json.loads((resolve_artifacts(args.bundle)[1] / "manifest.json").read_text())
    report: dict = {
        "model": manifest["model"].get("recipe"),
        "host": {"cores": len(os.sched_getaffinity(0)), "cpu": platform.processor(), "load": os.getloadavg()},
        "settings": {
            "questions": QUESTIONS,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "int4_activations": args.int4_activations,
        },
    }
    modes = {}
    for mode, mib in (("with reuse", None), ("without reuse", 0)):
        with Session(
            args.bundle, threads=args.threads, int4_activations=args.int4_activations, max_batch=1, prefix_cache_mib=mib
        ) as session:
            session.generate(picture(999), "Hi", max_tokens=1)  # warm-up: the sessions' first runs
            modes[mode] = conversations(session, args.repeats, args.max_tokens, offset=0)
            if mib is None:
                info = session.prefix_cache_info()
                report["prefix_cache"] = {
                    "pages": info.pages,
                    "page_tokens": info.page_tokens,
                    "page_bytes": info.page_bytes,
                    "pages_used": info.pages_used,
                }
                # Another request's first turn about the last conversation's image.
                other = session.conversation(image=picture(args.repeats - 1))
                report["same_image_new_request"] = ask(other, "What is at the top of the image?", args.max_tokens)
    report["runs"] = modes
    turns = []
    for t in range(len(QUESTIONS)):
        row = {"turn": t + 1}
        for mode, runs in modes.items():
            row[mode] = {
                "ttft_s_median": round(statistics.median(run[t]["ttft_s"] for run in runs), 3),
                "prompt_tokens": [run[t]["prompt_tokens"] for run in runs],
                "cached_tokens": [run[t]["cached_tokens"] for run in runs],
            }
        row["ratio"] = round(row["with reuse"]["ttft_s_median"] / row["without reuse"]["ttft_s_median"], 3)
        row["answers_equal"] = sum(
            a[t]["text"] == b[t]["text"] for a, b in zip(modes["with reuse"], modes["without reuse"])
        )
        turns.append(row)
    report["turns"] = turns
    report["floor"] = {"turn": 2, "max_ratio": FLOOR, "ratio": turns[1]["ratio"], "met": turns[1]["ratio"] <= FLOOR}
    report["host"]["load_after"] = os.getloadavg()
    write_json(args.report, report)

    header = ("turn", "prompt tokens", "reused", "TTFT with reuse s", "TTFT without s", "ratio", "same answers")
    rows = [
        (
            r["turn"],
            statistics.median(r["without reuse"]["prompt_tokens"]),
            statistics.median(r["with reuse"]["cached_tokens"]),
            r["with reuse"]["ttft_s_median"],
            r["without reuse"]["ttft_s_median"],
            r["ratio"],
            f"{r['answers_equal']}/{args.repeats}",
        )
        for r in turns
    ]
    print(render_table(header, rows))
    same = report["same_image_new_request"]
    print(
        f"another request about the same image: {same['cached_tokens']} of {same['prompt_tokens']} prompt tokens "
        f"reused, TTFT {same['ttft_s']} s"
    )
    print(f"floor (turn 2 ratio <= {FLOOR}): {'met' if report['floor']['met'] else 'MISSED'}")
    return 0 if report["floor"]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
