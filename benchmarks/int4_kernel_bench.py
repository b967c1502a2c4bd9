"""ONNX Runtime's INT4 kernel alone: every INT4 linear of one decode step (one token) of a recipe's
decoder, as com.microsoft MatMulNBits nodes, timed per block size.

    python benchmarks/int4_kernel_bench.py [--recipe mobilevlm-v2-1.7b] [--blocks 32 64 128 256]
        [--threads 2] [--repeats 30] [--level 4] [--report FILE]

The graph holds the step's 7 linears per layer (q, k, v, o, gate, up: K = hidden; down:
K = intermediate), all fed by the graph's two inputs, so a run reads every INT4 weight and its
scales once: what the decoder's MatMulNBits nodes cost in a decode step, without the attention,
the norms or the lm_head. The codes are random (the kernel's time does not depend on them),
symmetric (MatMulNBits' default zero point 8), FP32 scales, as our quantizer's FP32 graph has.
Level 4 is what run and bench use (int8 activations, in blocks of the weight block), 0 what
verify uses. Torch-free; the 1.7B's weights take ~0.6 GB per block size.

With --rows, what batching gains instead (matmulnbits_batch_gain, which another benchmark can
call in its own run): a stack of 2048x5632 INT4 linears (block 128) timed at each row count in turn.

    python benchmarks/int4_kernel_bench.py --rows 1 2 4 8 [--layers 8] [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import write_json
from mvlm_compile.recipes import load_recipe
from mvlm_compile.runtime.ort_backend import check_threads
from mvlm_compile.table import render_table

ZERO_POINT = 8  # MatMulNBits' default for 4 bits: codes 0..15 stand for -8..7


def matmulnbits(
    name: str, x: str, codes: np.ndarray, scales: np.ndarray, bits: int, block: int, level: int
) -> tuple[object, list[object]]:
    """(node, initializers) of y = x @ W^T, W [N, K] given as unsigned codes [N, K] (zero point
    2^(bits-1)) and scales [N, K / block]: MatMulNBits' packed layout, low nibble first."""
    from onnx import helper, numpy_helper

    n, k = codes.shape
    blocks = codes.reshape(n, k // block, block).astype(np.uint8)
    packed = blocks if bits == 8 else blocks[..., 0::2] | (blocks[..., 1::2] << 4)
    node = helper.make_node(
        "MatMulNBits",
        [x, f"{name}.B", f"{name}.scales"],
        [name],
        name=name,
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=level,
    )
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(packed), f"{name}.B"),
        numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{name}.scales"),
    ]
    return node, inits


def step_linears(recipe: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of every INT4 linear of one decoder step of `recipe`."""
    arch = load_recipe(recipe).architecture["decoder"]
    hidden, inter = int(arch["hidden_size"]), int(arch["intermediate_size"])
    per_layer = [("q", hidden, hidden), ("k", hidden, hidden), ("v", hidden, hidden), ("o", hidden, hidden)]
    per_layer += [("gate", hidden, inter), ("up", hidden, inter), ("down", inter, hidden)]
    return [(f"layers.{i}.{n}", k, n_out) for i in range(int(arch["num_hidden_layers"])) for n, k, n_out in per_layer]


def step_model(linears: Sequence[tuple[str, int, int]], block: int, level: int, seed: int = 0, rows: int | str = 1):
    """(ModelProto, bytes of codes + scales): the linears as MatMulNBits nodes, one input per K, of
    `rows` rows (a name: any number, chosen per run)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs, inputs = [], [], [], {}
    for name, k, n in linears:
        if k % block:
            raise MvlmError(f"--blocks {block}: does not divide the input dimension {k} of {name}")
        inputs.setdefault(k, f"x{k}")
        codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.01, (n, k // block)).astype(np.float32)
        node, node_inits = matmulnbits(name, inputs[k], codes, scales, 4, block, level)
        nodes.append(node)
        inits += node_inits
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, n]))
    graph = helper.make_graph(
        nodes,
        "int4_step",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [rows, k]) for k, x in inputs.items()],
        outputs,
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    nbytes = sum(int(np.prod(t.dims)) * (1 if t.data_type == TensorProto.UINT8 else 4) for t in inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), nbytes


def cpu_session(model, threads: int):
    """An ONNX Runtime CPU session on `threads` threads for an in-memory model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = check_threads(threads)  # at most 4 per core, as the CLI's --threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_runs(session, feed: dict[str, np.ndarray], repeats: int, warmup: int = 3) -> np.ndarray:
    """Seconds of each of `repeats` runs of `session` on `feed`, after `warmup` untimed ones."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return np.asarray(times)


def time_step(model, threads: int, repeats: int) -> np.ndarray:
    """Seconds of each of `repeats` runs of `model` on one token."""
    session = cpu_session(model, threads)
    rng = np.random.default_rng(1)
    feed = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    return time_runs(session, feed, repeats)


def matmulnbits_batch_gain(
    rows: Sequence[int] = (1, 2, 4, 8),
    layers: int = 8,
    k: int = 2048,
    n: int = 5632,
    block: int = 128,
    level: int = 4,
    threads: int = 2,
    repeats: int = 20,
) -> dict[str, Any]:
    """What batching gains in ONNX Runtime's INT4 kernel alone on this CPU: `layers` MatMulNBits
    of K x N (default the 1.7B's MLP, 2048 x 5632; INT4, blocks of `block`, accuracy level 4 =
    int8 activations as run and bench use) all fed by one input of `rows` rows.

    The row counts take turns (1, 2, 4, 8, 1, 2, ...) for `repeats` rounds after one untimed run
    each, in one session, so a load on the host that comes and goes weighs on all of them alike.
    Returns {"per_rows": [{"rows", "median_ms", "p10_ms", "p90_ms", "gain"}, ...], and the
    settings, the weights' MiB and ONNX Runtime's version}; gain = rows x t(1 row) / t(rows),
    medians: how many more tokens per second a batch of `rows` decodes through these linears
    (the weights are read once per call whatever the rows). Timing 1 row is always included.

    Size the stack for the question: 8 layers are 49 MB, which a large last-level cache holds (a
    server Xeon's hundreds of MiB of L3), so 1 row is then cheap and the gain small; a decode step's
    ~0.6 GB (the 1.7B's INT4 linears: layers=104) comes from DRAM, as on the Orin."""
    import onnxruntime

    if layers < 1 or repeats < 1 or not rows or min(rows) < 1:
        raise MvlmError("rows, layers and repeats must be at least 1")
    counts = sorted(set(rows) | {1})
    model, nbytes = step_model([(f"layers.{i}", k, n) for i in range(layers)], block, level, rows="rows")
    session = cpu_session(model, threads)
    del model
    rng = np.random.default_rng(1)
    (x,) = session.get_inputs()
    feeds = {r: {x.name: rng.standard_normal((r, k)).astype(np.float32)} for r in counts}
    for r in counts:
        session.run(None, feeds[r])
    seconds: dict[int, list[float]] = {r: [] for r in counts}
    for _ in range(repeats):
        for r in counts:
            started = time.perf_counter()
            session.run(None, feeds[r])
            seconds[r].append(time.perf_counter() - started)
    ms = {r: 1e3 * np.asarray(t) for r, t in seconds.items()}
    medians = {r: float(np.median(t)) for r, t in ms.items()}
    # Unrounded: at small sizes a call takes microseconds, and the gain is computed from these.
    per_rows = [
        {
            "rows": r,
            "median_ms": medians[r],
            "p10_ms": float(np.percentile(ms[r], 10)),
            "p90_ms": float(np.percentile(ms[r], 90)),
            "gain": r * medians[1] / medians[r],
        }
        for r in counts
    ]
    return {
        "k": k,
        "n": n,
        "layers": layers,
        "block": block,
        "accuracy_level": level,
        "threads": threads,
        "repeats": repeats,
        "weight_mib": round(nbytes / 2**20, 1),
        "onnxruntime": onnxruntime.__version__,
        "per_rows": per_rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="mobilevlm-v2-1.7b")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--level", type=int, choices=[0, 4], default=4, help="MatMulNBits accuracy level")
    parser.add_argument("--report", type=Path, default=Path("build/bench/int4_kernel_bench.json"))
    parser.add_argument(
        "--rows", type=int, nargs="+", help="instead: the batch gain of --layers 2048x5632 linears (block 128)"
    )
    parser.add_argument("--layers", type=int, default=8, help="with --rows")
    opts = parser.parse_args(argv)
    if opts.threads < 1 or opts.repeats < 1 or any(b < 16 or b & (b - 1) for b in opts.blocks):
        print("error: --threads and --repeats must be at least 1, --blocks powers of two >= 16", file=sys.stderr)
        return 2
    try:
        check_threads(opts.threads)
        if opts.rows:
            gain = matmulnbits_batch_gain(
                opts.rows, opts.layers, level=opts.level, threads=opts.threads, repeats=opts.repeats
            )
            rows = [
                [r["rows"], f"{r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f})", f"{r['gain']:.2f}x"]
                for r in gain["per_rows"]
            ]
            table = render_table(["rows", "ms per call (p10-p90)", "gain (rows x t1 / tN)"], rows)
            write_json(opts.report, {**gain, "table": table.splitlines()})
            print(table)
            return 0
        linears = step_linears(opts.recipe)
        results = {}
        for block in opts.blocks:
            print(f"[int4_kernel_bench] blocks of {block}: {len(linears)} linears", file=sys.stderr, flush=True)
            model, nbytes = step_model(linears, block, opts.level)
            ms = 1e3 * time_step(model, opts.threads, opts.repeats)
            del model
            median = float(np.median(ms))
            results[str(block)] = {
                "median_ms": round(median, 3),
                "p10_ms": round(float(np.percentile(ms, 10)), 3),
                "p90_ms": round(float(np.percentile(ms, 90)), 3),
                "weight_mib": round(nbytes / 2**20, 1),
                "gb_per_s": round(nbytes / median / 1e6, 1),
            }
    except MvlmError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    rows = [
        [b, r["weight_mib"], f"{r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f})", r["gb_per_s"]]
        for b, r in results.items()
    ]
    table = render_table(["block", "MiB (codes + scales)", "ms per step (p10-p90)", "GB/s"], rows)
    import onnxruntime

    write_json(
        opts.report,
        {
            "recipe": opts.recipe,
            "linears": len(linears),
            "threads": opts.threads,
            "repeats": opts.repeats,
            "accuracy_level": opts.level,
            "onnxruntime": onnxruntime.__version__,
            "blocks": results,
            "table": table.splitlines(),
        },
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
