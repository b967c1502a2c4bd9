"""Side by side with llama.cpp on the same weights: prefill and decode-step time at several past
lengths, our ONNX Runtime INT4 decoder against llama.cpp's Q4_0, in one interleaved run.

    pip install -e '.[host,bench]'      # builds llama.cpp from source (minutes); CPU only:
                                        # CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_NATIVE=ON" first
    python benchmarks/llama_cpp_bench.py --checkpoint CKPT --artifacts INT4_ARTIFACTS \\
        --workdir build/bench [--report FILE]

The decoder of the MobileVLM checkpoint (its MobileLLaMA weights, no vision) is written as an F16
GGUF with the gguf package (no tokenizer: llama.cpp is fed token ids, as ours is fed embeddings),
checked against the FP32 PyTorch reference (logits at every position of a teacher-forced
sequence), and quantized to Q4_0 by llama.cpp's own llama_model_quantize. Both GGUFs are kept in
--workdir and reused. Ours runs through the public runtime API (open_backend + Pipeline), as
`mvlm-compile bench` does: INT4 MatMulNBits with int8 activations, --threads threads. Per repeat
each side prefills every length and times --decode-steps steps after each depth; the order of the
two sides alternates between repeats. The report (JSON, with the table and the machine's load)
goes to --report, the plot of decode-step time against past length next to it (.png).
Nothing is downloaded: llama.cpp comes from the installed llama-cpp-python.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from mvlm_compile.bundle import resolve_artifacts
from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import write_bytes, write_json
from mvlm_compile.runtime.ort_backend import check_threads
from mvlm_compile.table import render_table

INSTALL_HINT = (
    "pip install -e '.[bench]' (llama-cpp-python builds llama.cpp from source, several minutes; "
    "for a CPU-only build set CMAKE_ARGS='-DGGML_CUDA=OFF -DGGML_NATIVE=ON')"
)
BENCH_DEPS = {"llama_cpp": "llama-cpp-python", "gguf": "gguf", "matplotlib": "matplotlib", "torch": "torch (host)"}
# The conversion check: F16 GGUF logits against the FP32 reference. llama.cpp rounds activations
# to FP16 before F16 matmuls, so agreement is close but not exact; a wrong Q/K permutation or a
# swapped tensor gives cosines far below these.
MIN_COSINE, MIN_TOP1 = 0.999, 0.95
EXIT_SKIPPED = 3  # the optional dependencies are missing: `make bench` goes on without this benchmark


def missing_deps() -> list[str]:
    return [pip for module, pip in BENCH_DEPS.items() if importlib.util.find_spec(module) is None]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling path (fileio's naming) that becomes `path` only if the block succeeds:
    for files written by libraries that take a path (GGUFWriter, llama_model_quantize)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# Conversion -------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def text_weights(checkpoint: Path) -> tuple[object, dict[str, object]]:
    """(MobileVLMConfig, the LLaMA decoder's tensors under their transformers names), read with our
    loader's checks; the vision tower and the projector are left on disk."""
    from mvlm_compile.model.config import load_mobilevlm_config
    from mvlm_compile.model.loader import find_weight_files

    cfg = load_mobilevlm_config(checkpoint)
    wanted = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    wanted |= {f"model.layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in _LAYER_NAMES}
    if cfg.raw.get("tie_word_embeddings"):
        wanted.discard("lm_head.weight")
    state: dict[str, object] = {}
    for f in find_weight_files(checkpoint):
        state.update(f.tensors(wanted))
    missing = sorted(wanted - state.keys())
    if missing:
        raise MvlmError(f"--checkpoint {checkpoint}: lacks decoder tensors {', '.join(missing[:4])}...")
    return cfg, state


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = name.split(".", 3)
    return f"blk.{index}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' LLaMA rotates halves of each head; llama.cpp's 'llama' architecture rotates
    adjacent pairs: the rows of q_proj/k_proj are reordered as convert_hf_to_gguf.py does."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_f16_gguf(cfg, state: dict, out: Path) -> None:
    """The decoder as an F16 GGUF of llama.cpp's 'llama' architecture (norms F32, as the converter
    writes them). No tokenizer ("none"): llama.cpp then makes vocab_size placeholder tokens."""
    import gguf

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(cfg.path.parent.name)
        writer.add_context_length(cfg.max_context)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_layers)
        writer.add_feed_forward_length(int(cfg.text["intermediate_size"]))
        writer.add_head_count(cfg.num_heads)
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.text.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(cfg.text.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_tokenizer_model("none")
        for name, tensor in state.items():
            array = tensor.float().numpy() if tensor.ndim == 1 else tensor.half().numpy()
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
                array = rope_permute(array, heads)
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def quantize_q4_0(f16: Path, out: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    with atomic_path(out) as tmp:
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise MvlmError(f"llama_model_quantize failed on {f16}")


def tensor_types(path: Path) -> dict[str, object]:
    """Tensor counts per GGUF type, the lm_head's and embedding's types, bits per linear weight."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    linear_bytes = linear_weights = 0
    special = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        counts[kind] = counts.get(kind, 0) + 1
        if t.name in ("output.weight", "token_embd.weight"):
            special[t.name] = kind
        elif t.name.startswith("blk.") and len(t.shape) == 2:
            linear_bytes += int(t.n_bytes)
            linear_weights += int(t.n_elements)
    return {
        "types": counts,
        "output.weight": special.get("output.weight"),
        "token_embd.weight": special.get("token_embd.weight"),
        "layer_linear_bits_per_weight": round(8 * linear_bytes / max(linear_weights, 1), 3),
        "file_gib": round(path.stat().st_size / 2**30, 3),
    }


# Runners --------------------------------------------------------------------------------------


class LlamaCpp:
    """A llama.cpp model and context through llama-cpp-python's C API: token ids in, logits out."""

    def __init__(self, gguf_path: Path, n_ctx: int, threads: int, all_logits_tokens: int = 0) -> None:
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(gguf_path).encode(), llama_cpp.llama_model_default_params()
        )
        if not self.model:
            raise MvlmError(f"{gguf_path}: llama.cpp cannot load it")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx  # one llama_decode per prefill; llama.cpp splits it into n_ubatch chunks itself
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise MvlmError(f"{gguf_path}: llama.cpp cannot make a context of {n_ctx} tokens")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.settings = {
            "n_ctx": n_ctx,
            "n_batch": params.n_batch,
            "n_ubatch": params.n_ubatch,
            "flash_attn_type": params.flash_attn_type,
            "type_k": params.type_k,
            "type_v": params.type_v,
            "threads": threads,
        }

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens: Sequence[int], start: int, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at positions start..; the logits of the last (or of every) position."""
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(tokens) - 1
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise MvlmError(f"llama_decode failed at position {start}")
        rows = range(len(tokens)) if all_logits else [len(tokens) - 1]
        return np.stack(
            [np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), (self.n_vocab,)).copy() for i in rows]
        )

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


class Ours:
    """Our runtime, only through its public API (Pipeline over open_backend), as `bench` drives it:
    the decoder loop owns its in-place cache, so a prefill starts a new sequence."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def reset(self) -> None:
        """Nothing to drop: the next prefill starts over in the same cache."""

    def decode(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """`tokens` at positions start.. (a prefill when start is 0, else one token); the last logits."""
        p = self.pipeline
        return p.prefill(p.embed(list(tokens))) if start == 0 else p.decode(int(tokens[0]))


# Accuracy -------------------------------------------------------------------------------------


def compare_logits(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """[positions, vocab] against the FP32 reference: top-1 agreement, cosine, KL(ref || x)."""
    ref = reference.astype(np.float64)
    x = logits.astype(np.float64)
    cosine = (ref * x).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(x, axis=-1))
    log_p = ref - ref.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = x - x.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {
        "top1_agreement": float((ref.argmax(-1) == x.argmax(-1)).mean()),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "kl_mean": float(kl.mean()),
        "max_abs_error_over_ref_range": float(np.abs(x - ref).max() / (ref.max() - ref.min())),
        "positions": int(len(ref)),
    }


def reference_model(cfg, state: dict, threads: int):
    """transformers' LlamaForCausalLM in FP32 with the checkpoint's decoder weights: the model our
    reference (mvlm_compile.model.reference) wraps."""
    import torch
    from transformers import LlamaForCausalLM

    from mvlm_compile.model.reference import llama_config

    torch.set_num_threads(threads)
    # Made on the meta device, so no random FP32 weights are allocated only to be replaced (5.6 GB at
    # 1.7B); the rotary table is a computed buffer, not a weight, so it is made again on the CPU.
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg))
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise MvlmError(f"{cfg.path}: decoder weights do not fit LlamaForCausalLM ({result})")
    if result.missing_keys:  # tie_word_embeddings: lm_head is the embedding table
        model.tie_weights()
    return model.eval()


def reference_logits(cfg, state: dict, tokens: Sequence[int], threads: int) -> np.ndarray:
    """FP32 logits at every position of `tokens`."""
    import torch

    model = reference_model(cfg, state, threads)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)[None])).logits[0].numpy()


def teacher_forced(decode: Callable[[Sequence[int], int], np.ndarray], tokens: Sequence[int]) -> np.ndarray:
    """Logits at every position, one decode step per token (the path a generated token takes)."""
    return np.concatenate([decode([t], i) for i, t in enumerate(tokens)])


# Timing ---------------------------------------------------------------------------------------


def stats(samples: Sequence[float]) -> dict[str, float]:
    ms = 1e3 * np.asarray(samples)
    return {
        "median_ms": round(float(np.median(ms)), 3),
        "p10_ms": round(float(np.percentile(ms, 10)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "min_ms": round(float(ms.min()), 3),
        "max_ms": round(float(ms.max()), 3),
        "n": len(ms),
    }


def one_pass(
    runner, tokens: np.ndarray, prefills: Sequence[int], depths: Sequence[int], steps: int, into: dict
) -> None:
    """Prefill every length (timed where asked), then time `steps` decode steps after each depth."""
    for n in sorted(set(prefills) | set(depths)):
        runner.reset()
        started = time.perf_counter()
        runner.decode(tokens[:n], 0)
        if n in prefills:
            into["prefill"].setdefault(n, []).append(time.perf_counter() - started)
        if n in depths:
            for k in range(steps):
                started = time.perf_counter()
                runner.decode(tokens[n + k : n + k + 1], n + k)
                into["decode"].setdefault(n, []).append(time.perf_counter() - started)


def growth_us_per_token(depths: Sequence[int], medians_ms: Sequence[float]) -> float:
    """Least-squares slope of the median decode step against past length."""
    return float(np.polyfit(np.asarray(depths, float), np.asarray(medians_ms, float), 1)[0] * 1e3)


def render(report: dict) -> str:
    def timing(t: dict, digits: int) -> str:
        return (
            f"{t['median_ms']:.{digits}f} ({t['p10_ms']:.{digits}f}-{t['p90_ms']:.{digits}f}) {t['min_ms']:.{digits}f}"
        )

    rows = []
    for kind, label, digits in (("prefill", "prefill {}", 0), ("decode", "decode step, past {}", 1)):
        for n, entry in report[kind].items():
            rows.append(
                [
                    label.format(n),
                    timing(entry["ours"], digits),
                    f"{entry['ours_tokens_per_s']:.1f}",
                    timing(entry["llama_cpp"], digits),
                    f"{entry['llama_cpp_tokens_per_s']:.1f}",
                    f"{entry['speedup']:.2f}",
                ]
            )
    growth = report["decode_growth_us_per_past_token"]
    if growth["ours"] is not None:
        rows.append(["decode growth, us/past token", f"{growth['ours']:.1f}", "", f"{growth['llama_cpp']:.1f}", "", ""])
    header = ["", "ours ms: median (p10-p90) min", "tok/s", "llama.cpp ms: median (p10-p90) min", "tok/s", "speedup"]
    machine = report["machine"]
    return (
        render_table(header, rows)
        + f"\n{report['settings']['repeats']} repeats, {report['settings']['threads']} threads, "
        f"load average {machine['loadavg_before'][0]:.2f} before / {machine['loadavg_after'][0]:.2f} after"
    )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    depths = [int(n) for n in report["decode"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    w = report["weights"]["ours"]
    ours_label = f"ours (ONNX Runtime, {w['decoder']} {w['method']} g{w['group_size']}, int8 activations)"
    for side, label in (("ours", ours_label), ("llama_cpp", "llama.cpp Q4_0")):
        med = np.array([report["decode"][str(n)][side]["median_ms"] for n in depths])
        lo = med - np.array([report["decode"][str(n)][side]["p10_ms"] for n in depths])
        hi = np.array([report["decode"][str(n)][side]["p90_ms"] for n in depths]) - med
        line = ax.errorbar(depths, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        # The minimum too: on a busy machine it is the run least disturbed by other processes.
        mins = [report["decode"][str(n)][side]["min_ms"] for n in depths]
        ax.plot(depths, mins, linestyle=":", marker=".", color=line[0].get_color(), label=f"{label}, min")
    ax.set_xlabel("past length (tokens)")
    ax.set_ylabel("decode step (ms, median, p10-p90)")
    ax.set_ylim(bottom=0)
    load = report["machine"]["loadavg_before"][0], report["machine"]["loadavg_after"][0]
    ax.set_title(
        f"{report['model']}: decode step, {report['settings']['threads']} threads, "
        f"load {load[0]:.1f}-{load[1]:.1f} on {report['machine']['cpus']} CPUs",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def ours_config(artifacts: Path) -> dict:
    """What our decoder is, from its manifest: export precision, INT4 method/group, kept layers."""
    from mvlm_compile.manifest import load_manifest

    manifest = load_manifest(artifacts)
    quantize, export = manifest.stages.get("quantize", {}), manifest.stages.get("export", {})
    return {
        "decoder": manifest.graphs["decoder"].get("dtype"),
        "graph_dtype": export.get("dtype"),
        "method": quantize.get("method"),
        "group_size": quantize.get("group_size"),
        "kept_unquantized": quantize.get("keep_fp16"),
        "matmulnbits_activations": "int8 (accuracy level 4)",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="MobileVLM V2 checkpoint (published layout)")
    parser.add_argument("--artifacts", type=Path, required=True, help="our INT4 artifacts directory or bundle")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"), help="GGUF files are kept here")
    parser.add_argument("--report", type=Path, default=None, help="default <workdir>/llama_cpp_bench.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, nargs="+", default=[256, 1536])
    parser.add_argument("--depths", type=int, nargs="+", default=[64, 256, 512, 1536])
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decode steps after each depth, per repeat")
    parser.add_argument("--check-tokens", type=int, default=128, help="teacher-forced positions of the accuracy check")
    opts = parser.parse_args(argv)
    try:
        return run(opts)
    except MvlmError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2


def run(opts: argparse.Namespace) -> int:
    # The inputs first: a wrong path is an error (2) even where the benchmark would be skipped (3).
    if opts.threads < 1 or opts.repeats < 1 or opts.decode_steps < 1 or opts.check_tokens < 2:
        raise MvlmError("--threads, --repeats and --decode-steps must be at least 1, --check-tokens at least 2")
    check_threads(opts.threads)  # llama.cpp's and torch's threads too: at most 4 per core, as the CLI's
    if min(opts.prefill + opts.depths) < 1:
        raise MvlmError("--prefill and --depths: lengths must be at least 1")
    if not (opts.checkpoint / "config.json").is_file():
        raise MvlmError(f"--checkpoint {opts.checkpoint}: not a checkpoint (no config.json)")
    artifacts = resolve_artifacts(opts.artifacts)[1]
    missing = missing_deps()
    if missing:
        print(f"llama_cpp_bench: skipped, {', '.join(missing)} not installed: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_SKIPPED
    from mvlm_compile.runtime.backend import open_backend
    from mvlm_compile.runtime.pipeline import Pipeline

    progress = lambda m: print(f"[llama_cpp_bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    import llama_cpp

    # llama.cpp logs every load and quantization to stderr unless a callback takes it: keep errors (GGML level 4).
    log_callback = llama_cpp.llama_log_callback(lambda level, text, _: level == 4 and sys.stderr.write(text.decode()))
    llama_cpp.llama_log_set(log_callback, ctypes.c_void_p(0))

    cfg, state = text_weights(opts.checkpoint)
    longest = max(max(opts.prefill), max(opts.depths) + opts.decode_steps, opts.check_tokens)
    if longest > cfg.max_context:
        raise MvlmError(f"--prefill/--depths/--decode-steps: {longest} tokens exceed the context {cfg.max_context}")
    opts.workdir.mkdir(parents=True, exist_ok=True)
    stem = opts.checkpoint.resolve().name
    f16, q4 = opts.workdir / f"{stem}-f16.gguf", opts.workdir / f"{stem}-q4_0.gguf"
    if not f16.exists():
        progress(f"writing {f16}")
        write_f16_gguf(cfg, state, f16)
    if not q4.exists():
        progress(f"quantizing {q4} (Q4_0)")
        quantize_q4_0(f16, q4, opts.threads)

    rng = np.random.default_rng(0)
    # Ids 0-2 are <unk>, <s>, </s>; any other id is an ordinary row of both models' embedding tables.
    check = rng.integers(3, cfg.vocab_size, opts.check_tokens)
    progress(f"accuracy check over {opts.check_tokens} positions: FP32 reference")
    reference = reference_logits(cfg, state, check, opts.threads)
    del state
    accuracy = {}
    peer = LlamaCpp(f16, opts.check_tokens, opts.threads)
    accuracy["llama_cpp_f16"] = compare_logits(peer.decode(check, 0, all_logits=True), reference)
    peer.close()
    ok = (
        accuracy["llama_cpp_f16"]["cosine_min"] >= MIN_COSINE
        and accuracy["llama_cpp_f16"]["top1_agreement"] >= MIN_TOP1
    )
    progress(f"F16 GGUF vs FP32 reference: {accuracy['llama_cpp_f16']}")
    if not ok:
        raise MvlmError(
            f"{f16}: its logits differ from the FP32 reference (cosine >= {MIN_COSINE}, top-1 >= {MIN_TOP1} "
            f"expected): {accuracy['llama_cpp_f16']}; the conversion is wrong, no benchmark"
        )

    timings = {"ours": {"prefill": {}, "decode": {}}, "llama_cpp": {"prefill": {}, "decode": {}}}
    tokens = rng.integers(3, cfg.vocab_size, longest)
    peer = LlamaCpp(q4, longest, opts.threads)
    with open_backend("ort", artifacts, threads=opts.threads, int4_activations="int8") as backend:
        ours = Ours(Pipeline(backend))
        accuracy["llama_cpp_q4_0"] = compare_logits(teacher_forced(peer.decode, check), reference)
        accuracy["ours_int4"] = compare_logits(teacher_forced(ours.decode, check), reference)
        progress(f"Q4_0 vs FP32: {accuracy['llama_cpp_q4_0']}; ours INT4 vs FP32: {accuracy['ours_int4']}")
        sides = {"ours": ours, "llama_cpp": peer}
        progress("warm-up: the longest prefill and two decode steps on each side")
        for runner in sides.values():
            one_pass(runner, tokens, [max(opts.prefill)], [min(opts.depths)], 2, {"prefill": {}, "decode": {}})
        load_before = os.getloadavg()
        started = time.time()
        for r in range(opts.repeats):
            order = ["ours", "llama_cpp"] if r % 2 == 0 else ["llama_cpp", "ours"]
            for name in order:
                progress(f"repeat {r + 1}/{opts.repeats}: {name}")
                one_pass(sides[name], tokens, opts.prefill, opts.depths, opts.decode_steps, timings[name])
                # ONNX Runtime's and OpenMP's worker threads spin a little after their work: let
                # them park before the other side starts, so neither pays for the other.
                time.sleep(0.5)
        load_after = os.getloadavg()
    peer.close()

    report = {
        "model": f"{stem} decoder",
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1),
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        },
        "settings": {
            "threads": opts.threads,
            "repeats": opts.repeats,
            "decode_steps_per_depth_per_repeat": opts.decode_steps,
            "interleaving": "per repeat, each side runs every prefill and depth; the first side alternates",
            "llama_cpp_context": peer.settings,
        },
        "weights": {
            "ours": ours_config(artifacts),
            "llama_cpp_q4_0": {**tensor_types(q4), "scheme": "Q4_0: 32-weight blocks, one FP16 scale, symmetric"},
            "llama_cpp_f16": str(f16),
        },
        "accuracy_vs_fp32_reference": accuracy,
        "prefill": {},
        "decode": {},
    }
    for n in opts.prefill:
        o, p = stats(timings["ours"]["prefill"][n]), stats(timings["llama_cpp"]["prefill"][n])
        report["prefill"][str(n)] = {
            "ours": o,
            "llama_cpp": p,
            "ours_tokens_per_s": round(1e3 * n / o["median_ms"], 1),
            "llama_cpp_tokens_per_s": round(1e3 * n / p["median_ms"], 1),
            "speedup": round(p["median_ms"] / o["median_ms"], 3),
        }
    for n in opts.depths:
        o, p = stats(timings["ours"]["decode"][n]), stats(timings["llama_cpp"]["decode"][n])
        report["decode"][str(n)] = {
            "ours": o,
            "llama_cpp": p,
            "ours_tokens_per_s": round(1e3 / o["median_ms"], 2),
            "llama_cpp_tokens_per_s": round(1e3 / p["median_ms"], 2),
            "speedup": round(p["median_ms"] / o["median_ms"], 3),
        }
    depths = sorted(set(opts.depths))
    report["decode_growth_us_per_past_token"] = {
        side: round(growth_us_per_token(depths, [report["decode"][str(n)][side]["median_ms"] for n in depths]), 1)
        if len(depths) > 1
        else None  # a slope needs two depths
        for side in ("ours", "llama_cpp")
    }
    table = render(report)
    report["table"] = table.splitlines()
    path = opts.report or opts.workdir / "llama_cpp_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    plot(report, path.with_suffix(".png"))
    print(table)
    print(f"report: {path}\nplot: {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
