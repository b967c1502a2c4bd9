"""lm_head precision study: accuracy and decode-time cost of the output projection in FP32, FP16,
and ONNX Runtime MatMulNBits INT8 / INT4 (blocks of 32 and 128), on a checkpoint's real lm_head.

    python benchmarks/lm_head_study.py --checkpoint CKPT [--positions 320] [--report FILE]

Accuracy: the final (normed) hidden states of the FP32 reference at --positions teacher-forced
positions of a random token sequence go through each variant; its logits are compared with the
FP32 logits (top-1 = greedy-token agreement, KL, cosine). Only the lm_head changes, so the numbers
are the lm_head's own error. MatMulNBits runs at accuracy level 0 (float activations) and 4 (int8
activations: what run and bench use). Speed: one token (the decode step's lm_head), --threads
threads, median of --repeats runs; the decode step changes by the difference to FP32.
Quantization is symmetric per block of input channels, as our INT4 quantizer does (amax/7, codes
-8..7; INT8 amax/127). Needs the host extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from int4_kernel_bench import cpu_session, matmulnbits, time_runs
from llama_cpp_bench import compare_logits, reference_model, text_weights

from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import write_json
from mvlm_compile.runtime.ort_backend import check_threads
from mvlm_compile.table import render_table


def hidden_states(checkpoint: Path, positions: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(final normed hidden states [positions, hidden], lm_head weight [vocab, hidden]) in FP32."""
    import torch

    cfg, state = text_weights(checkpoint)
    model = reference_model(cfg, state, threads)
    del state
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, positions)
    with torch.no_grad():
        hidden = model.model(input_ids=torch.from_numpy(tokens[None])).last_hidden_state[0].numpy()
    return hidden, model.lm_head.weight.detach().numpy().copy()


def nbits_model(weight: np.ndarray, bits: int, block: int, level: int):
    """lm_head as one com.microsoft MatMulNBits node: y[.., vocab] = x[.., hidden] @ W^T."""
    from onnx import TensorProto, helper

    vocab, hidden = weight.shape
    blocks = weight.reshape(vocab, hidden // block, block)
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(blocks).max(-1, keepdims=True), 1e-12) / qmax
    # Unsigned codes around MatMulNBits' default zero point 2^(bits-1): symmetric, as ours.
    codes = (np.clip(np.round(blocks / scale), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    node, inits = matmulnbits("y", "x", codes.reshape(vocab, hidden), scale[..., 0], bits, block, level)
    graph = helper.make_graph(
        [node],
        "lm_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", vocab])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), codes.size * bits // 8 + scale.size * 4


def matmul_model(weight: np.ndarray, dtype: str):
    """lm_head as a plain MatMul with W^T in `dtype` (fp16: input and output cast around it)."""
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden = weight.shape
    np_type = np.float16 if dtype == "fp16" else np.float32
    w = numpy_helper.from_array(np.ascontiguousarray(weight.T.astype(np_type)), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    if dtype == "fp16":
        nodes = [
            helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
            helper.make_node("MatMul", ["x16", "W"], ["y16"]),
            helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
        ]
    graph = helper.make_graph(
        nodes,
        "lm_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", vocab])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), weight.size * (
        2 if dtype == "fp16" else 4
    )


def measure(model, hidden: np.ndarray, reference: np.ndarray, threads: int, repeats: int) -> dict:
    session = cpu_session(model, threads)
    logits = session.run(None, {"x": hidden})[0]
    ms = 1e3 * time_runs(session, {"x": hidden[:1]}, repeats, warmup=10)
    return {
        **compare_logits(logits, reference),
        "decode_ms_median": round(float(np.median(ms)), 3),
        "decode_ms_p10": round(float(np.percentile(ms, 10)), 3),
        "decode_ms_p90": round(float(np.percentile(ms, 90)), 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--positions", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--report", type=Path, default=Path("build/bench/lm_head_study.json"))
    opts = parser.parse_args(argv)
    if opts.positions < 1 or opts.threads < 1 or opts.repeats < 1:
        print("error: --positions, --threads and --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        check_threads(opts.threads)  # torch's threads too: at most 4 per core, as the CLI's --threads
        hidden, weight = hidden_states(opts.checkpoint, opts.positions, opts.threads)
    except MvlmError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    reference = hidden.astype(np.float64) @ weight.T.astype(np.float64)
    variants = {"fp32": matmul_model(weight, "fp32"), "fp16": matmul_model(weight, "fp16")}
    for bits in (8, 4):
        for block in (b for b in (32, 128) if weight.shape[1] % b == 0):
            for level in (0, 4):
                variants[f"int{bits} g{block} act{'int8' if level else 'fp32'}"] = nbits_model(
                    weight, bits, block, level
                )
    results = {}
    for name, (model, nbytes) in variants.items():
        print(f"[lm_head_study] {name}", file=sys.stderr, flush=True)
        results[name] = {
            **measure(model, hidden, reference, opts.threads, opts.repeats),
            "mib": round(nbytes / 2**20, 1),
        }
    base = results["fp32"]["decode_ms_median"]
    rows = [
        [
            name,
            r["mib"],
            f"{r['top1_agreement']:.4f}",
            f"{r['kl_mean']:.2e}",
            f"{r['cosine_min']:.6f}",
            f"{r['decode_ms_median']:.2f} ({r['decode_ms_p10']:.2f}-{r['decode_ms_p90']:.2f})",
            f"{r['decode_ms_median'] - base:+.2f}",
        ]
        for name, r in results.items()
    ]
    header = ["lm_head", "MiB", "top-1 vs fp32", "KL", "min cosine", "ms/token (p10-p90)", "vs fp32 ms"]
    table = render_table(header, rows)
    opts.report.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        opts.report,
        {
            "checkpoint": str(opts.checkpoint),
            "positions": opts.positions,
            "threads": opts.threads,
            "variants": results,
            "table": table.splitlines(),
        },
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
