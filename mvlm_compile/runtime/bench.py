"""`bench`: latency of vision, projector, prefill and decode tokens/s through a backend, and the
same model in PyTorch eager in the same run (with a checkpoint) for a ratio.

Each measurement: warm-up runs, then repeats; median and p90. Peak memory is this process's
max RSS (CPU backends; on a Jetson CPU and GPU share it).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import numpy as np

from mvlm_compile.runtime.kv_cache import describe
from mvlm_compile.runtime.pipeline import Pipeline

Progress = Callable[[str], None]


def _timed(fn: Callable[[], object], warmup: int, repeats: int, progress: Progress, label: str) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        progress(f"{label}: {i + 1}/{repeats}")
    return {
        "median_ms": 1e3 * float(np.median(times)),
        "p90_ms": 1e3 * float(np.percentile(times, 90)),
        "repeats": repeats,
    }


def _decode(step: Callable[[int], None], warmup: int, steps: int, progress: Progress, label: str) -> dict[str, float]:
    """Time `steps` decode steps after `warmup` ones; `step(i)` runs step i (the cache grows)."""
    step_times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        step(i)
        if i >= warmup:
            step_times.append(time.perf_counter() - started)
            progress(f"{label}: {i + 1 - warmup}/{steps}")
    median = float(np.median(step_times))
    return {
        "tokens_per_s": 1.0 / median,
        "median_ms": 1e3 * median,
        "p90_ms": 1e3 * float(np.percentile(step_times, 90)),
        "steps": len(step_times),
    }


def bench_backend(
    pipeline: Pipeline, prompt_tokens: int, decode_steps: int, warmup: int, repeats: int, progress: Progress
) -> dict:
    """Vision, projector, prefill of `prompt_tokens` (image included) and `decode_steps` decode steps."""
    # The decode steps (warm-up ones too) grow one cache past the prompt: all must fit the backend.
    pipeline.backend.limits.check(prompt_tokens, warmup + decode_steps, "--prompt-tokens", "--warmup + --decode-steps")
    manifest = pipeline.backend.manifest.model
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, 336, 336)).astype(np.float32)
    features = pipeline.backend.run("vision", {"pixel_values": pixels})["image_features"]
    embeds = (rng.standard_normal((1, prompt_tokens, int(manifest["hidden_size"]))) * 0.1).astype(np.float32)
    results = {
        "vision": _timed(
            lambda: pipeline.backend.run("vision", {"pixel_values": pixels}), warmup, repeats, progress, "vision"
        ),
        "projector": _timed(
            lambda: pipeline.backend.run("projector", {"image_features": features}),
            warmup,
            repeats,
            progress,
            "projector",
        ),
        "prefill": _timed(lambda: pipeline.prefill(embeds), warmup, repeats, progress, "prefill"),
    }
    pipeline.prefill(embeds)
    results["decode"] = _decode(lambda _: pipeline.decode(1), warmup, decode_steps, progress, "decode")
    results["decode"]["past_at_first_step"] = prompt_tokens
    results["decoder_buffers"] = describe(pipeline.backend.decoder().plan)
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return results


def bench_torch_eager(
    checkpoint, vision_tower, prompt_tokens: int, decode_steps: int, warmup: int, repeats: int, progress: Progress
) -> dict:
    """The same measurements on the FP32 PyTorch reference (host only: imports torch)."""
    import torch

    from mvlm_compile.model.loader import load_checkpoint

    model = load_checkpoint(checkpoint, vision_tower).model
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 336, 336, generator=generator)
    embeds = torch.randn(1, prompt_tokens, cfg.hidden_size, generator=generator) * 0.1
    mask = torch.ones(1, prompt_tokens, dtype=torch.int64)
    positions = torch.arange(prompt_tokens)[None]
    with torch.no_grad():
        features = model.encode_images(pixels)
        results = {
            "vision": _timed(lambda: model.encode_images(pixels), warmup, repeats, progress, "torch vision"),
            "projector": _timed(lambda: model.project(features), warmup, repeats, progress, "torch projector"),
            "prefill": _timed(
                lambda: model.decode(embeds, mask, positions, []), warmup, repeats, progress, "torch prefill"
            ),
        }
        cache = [model.decode(embeds, mask, positions, [])[1]]
        token = model.embed_tokens(torch.tensor([[1]]))

        def step(i: int) -> None:
            total = prompt_tokens + i + 1
            cache[0] = model.decode(
                token, torch.ones(1, total, dtype=torch.int64), torch.tensor([[total - 1]]), cache[0]
            )[1]

        results["decode"] = _decode(step, warmup, decode_steps, progress, "torch decode")
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return results


def ratios(backend: dict, eager: dict) -> dict[str, float]:
    """How many times faster the backend is than PyTorch eager (>1: faster)."""
    out = {k: eager[k]["median_ms"] / backend[k]["median_ms"] for k in ("vision", "projector", "prefill")}
    out["decode_tokens_per_s"] = backend["decode"]["tokens_per_s"] / eager["decode"]["tokens_per_s"]
    return out
