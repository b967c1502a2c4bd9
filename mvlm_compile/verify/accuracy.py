"""Accuracy of (quantized) artifacts against the FP32 golden tensors, in ONNX Runtime (CPU).

Run after quantizing (`mvlm-compile quantize --golden`, benchmarks/quantize_bench.py).

Per component: max/mean abs error, error relative to scale and cosine (verify.metrics.compare).
Decoder, on a teacher-forced sequence (the golden prompt with its image embeddings followed by
the 32 golden greedy tokens, one prefill): top-1 agreement and KL(reference || quantized) of
the next-token distributions at every position, and on the 32 answer positions alone;
greedy decoding of 32 tokens against the golden tokens (prefix match and total matches).
The reference logits of the teacher-forced sequence are those of the unquantized decoder in
`reference` (the export kept in artifacts/reference/, or the source of `quantize --out`; equal
to the golden prefill logits to ~1e-6 on the prompt positions); without it only the prompt
positions, whose golden logits exist, are scored for KL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mvlm_compile import contract
from mvlm_compile.runtime.ort_backend import OrtBackend
from mvlm_compile.runtime.pipeline import Pipeline, prefill_feed
from mvlm_compile.table import render_table
from mvlm_compile.verify.components import GRAPH_OF_COMPONENT, check_components
from mvlm_compile.verify.golden_io import check_generation_fits, load_component, load_generation
from mvlm_compile.verify.metrics import compare, greedy_agreement

GREEDY_TOKENS = 32


def teacher_forced_embeds(golden: Path, embed_table: np.ndarray) -> tuple[np.ndarray, int, list[int]]:
    """(inputs_embeds [1, prompt + 32, hidden], prompt length, golden generated ids)."""
    feed, _ = load_component(golden, "decoder_prefill")
    generated = list(load_generation(golden)["generated_ids"])
    prompt = np.asarray(feed[contract.DECODER_EMBEDS], np.float32)
    answer = np.asarray(embed_table[np.asarray(generated, np.int64)], np.float32)[None]
    return np.concatenate([prompt, answer], axis=1), prompt.shape[1], generated


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_metrics(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and KL(reference || got) over positions of [positions, vocab] logits."""
    log_p, log_q = _log_softmax(reference), _log_softmax(got)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return {
        "positions": int(reference.shape[0]),
        "top1_agreement": float(np.mean(reference.argmax(-1) == got.argmax(-1))),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "logits_cosine": compare(got, reference)["cosine"],
    }


def teacher_forced_logits(backend: OrtBackend, embeds: np.ndarray) -> np.ndarray:
    """[positions, vocab] float32 logits of one prefill of `embeds`."""
    dtype = backend.input_dtype("decoder", contract.DECODER_EMBEDS)
    kv_dtype = backend.input_dtype("decoder", contract.past_names(0)[0])
    feed = prefill_feed(backend.manifest.model, embeds.astype(dtype), kv_dtype)
    return np.asarray(backend.run("decoder", feed)[contract.DECODER_LOGITS][0], np.float32)


def _component_metrics(backend: OrtBackend, golden: Path) -> dict:
    checks = check_components(backend, golden)
    result = {}
    for check in checks:
        if check.output.startswith("new."):
            continue
        dtype = backend.manifest.graphs[GRAPH_OF_COMPONENT[check.component]]["dtype"]
        result[f"{check.component}.{check.output}"] = {"dtype": dtype, **check.metrics, "passed": check.passed}
    for component in ("decoder_prefill", "decoder_decode"):  # the KV cache outputs, summarised by the worst one
        caches = [c for c in checks if c.component == component and c.output.startswith("new.")]
        worst = max(caches, key=lambda c: c.metrics["rel_to_scale"])
        result[f"{component}.new.*"] = {
            "dtype": backend.manifest.graphs["decoder"]["dtype"],
            **worst.metrics,
            "cosine": min(c.metrics["cosine"] for c in caches),
            "worst_output": worst.output,
            "passed": all(c.passed for c in caches),
        }
    return result


def evaluate_artifacts(artifacts: Path, golden: Path, reference: Path | None = None, progress=lambda m: None) -> dict:
    """The accuracy record of an artifacts directory (any precision) against a golden directory;
    `reference`: an artifacts directory with the unquantized decoder, for teacher-forced KL."""
    with OrtBackend(Path(artifacts)) as backend:
        check_generation_fits(golden, load_generation(golden), backend.manifest.model, backend.limits)
        progress("evaluating vision, projector and the decoder's prefill and decode step")
        result: dict = {"components": _component_metrics(backend, golden), "decoder": {}}
        pipeline = Pipeline(backend)
        embeds, prompt_len, generated = teacher_forced_embeds(golden, pipeline.embed_table)
        progress("evaluating the teacher-forced sequence")
        logits = teacher_forced_logits(backend, embeds)
        _, golden_prefill = load_component(golden, "decoder_prefill")
        golden_logits = np.asarray(golden_prefill[contract.DECODER_LOGITS][0], np.float32)
        decoder = result["decoder"]
        decoder["prompt_positions"] = next_token_metrics(golden_logits, logits[:prompt_len])
        answer = slice(prompt_len - 1, prompt_len - 1 + len(generated))  # positions that predict the golden tokens
        decoder["answer_top1_vs_golden_tokens"] = float(np.mean(logits[answer].argmax(-1) == np.asarray(generated)))
        if reference is not None:
            progress("evaluating the teacher-forced sequence on the reference decoder")
            with OrtBackend(Path(reference)) as reference_backend:
                reference_logits = teacher_forced_logits(reference_backend, embeds)
            decoder["teacher_forced"] = next_token_metrics(reference_logits, logits)
            decoder["answer_positions"] = next_token_metrics(reference_logits[answer], logits[answer])
        progress("evaluating greedy decoding")
        tokens = pipeline.greedy(embeds[:, :prompt_len], len(generated))
    agreement = greedy_agreement(tokens, generated)
    decoder["greedy"] = {
        "tokens": tokens,
        "prefix_match": agreement["prefix"],
        "total_match": agreement["matching"],
        "of": agreement["total"],
    }
    return result


def accuracy_table(accuracy: dict) -> str:
    """The human form of evaluate_artifacts' record."""
    rows = [
        (
            name,
            m["dtype"],
            f"{m['max_abs']:.3g}",
            f"{m['mean_abs']:.3g}",
            f"{m['rel_to_scale']:.3g}",
            f"{m['cosine']:.6f}",
            {True: "ok", False: "FAIL"}.get(m.get("passed"), "-"),
        )
        for name, m in accuracy["components"].items()
    ]
    lines = [render_table(("component.output", "dtype", "max abs", "mean abs", "err/scale", "cosine", "result"), rows)]
    d = accuracy["decoder"]
    for key in ("teacher_forced", "answer_positions", "prompt_positions"):
        if d.get(key):
            m = d[key]
            lines.append(
                f"decoder {key:<17} {m['positions']:>4} positions: top-1 {m['top1_agreement']:.4f}, "
                f"KL mean {m['kl_mean']:.3g} max {m['kl_max']:.3g}, logits cosine {m['logits_cosine']:.6f}"
            )
    g = d["greedy"]
    lines.append(f"decoder greedy: {g['prefix_match']}/{g['of']} prefix match, {g['total_match']}/{g['of']} total")
    return "\n".join(lines)
