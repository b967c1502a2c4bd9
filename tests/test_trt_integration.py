"""The TensorRT path on a GPU: build the committed tiny bundle's engines with TensorRT 10.3+ and the
PEG plugin, verify them against the golden tensors, run each decoder profile at its limits against
ONNX Runtime, and refuse a prompt the engine cannot take before TensorRT sees it.

Runs where TensorRT (10.3+), a CUDA GPU with a target profile for its SM (a Jetson Orin: SM 8.7)
and the PEG plugin library exist; skipped with the reason elsewhere (CI and the development
machines have none of them: there, tests/test_engines_rtx.py builds with TensorRT-RTX). Needs only
what a Jetson has: tensorrt, onnx, onnxruntime, numpy and polygraphy, never torch (the bundle is
committed: tests/data/tiny-bundle).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import GOLDEN_TINY, copy_tiny_bundle

from mvlm_compile import contract
from mvlm_compile.peg_op import PluginLibraryError, find_plugin_library
from mvlm_compile.recipes import load_targets
from mvlm_compile.trt_env import TENSORRT, import_tensorrt, query_gpu

trt, why_not = import_tensorrt()
gpu = query_gpu() if trt is not None else None


def _target() -> str | None:
    """The first TensorRT target profile for this GPU's SM (orin-agx-64gb on an Orin)."""
    return next((n for n, t in load_targets().items() if t.builder == TENSORRT.name and t.sm == gpu.sm), None)


def _skip_reason() -> str | None:
    if trt is None:
        return why_not
    if gpu is None:
        return "no CUDA GPU visible (libcuda found no device)"
    try:
        find_plugin_library()
    except PluginLibraryError as e:
        return f"PEG plugin library not built: {e}"
    if _target() is None:
        return f"no TensorRT target profile for this GPU's SM {gpu.sm}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

# The same INT4 graph in both runtimes: they differ by TensorRT's FP16 activations only.
SAME_GRAPH = {"rel_to_scale": 3e-2, "cosine": 0.999}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from mvlm_compile.bundle import build

    bundle = copy_tiny_bundle(tmp_path_factory.mktemp("trt") / "bundle")
    result = build(_target(), bundle)
    assert result.engines_dir is not None, result.deferred_reason
    return bundle, result.engines_dir, json.loads((result.engines_dir / "engines.json").read_text())


def test_engines_build_with_the_plugin_and_match_golden(engines):
    from mvlm_compile.recipes import load_recipe
    from mvlm_compile.runtime.trt_backend import TrtBackend
    from mvlm_compile.verify.verifier import verify

    bundle, engines_dir, record = engines
    assert record["builder"]["flavour"] == "tensorrt" and record["builder"]["version"] == trt.__version__
    assert record["builder"]["sm"] == gpu.sm and record["gpu"]["name"] == gpu.name
    assert record["plugin"]["mode"] == "plugin"  # the projector holds MvlmPEG
    assert record["engines"]["decoder"]["profile_indices"] == [0, 1]
    with TrtBackend(bundle / "artifacts", engines_dir) as backend:
        outcome = verify(backend, GOLDEN_TINY, tolerances=load_recipe("tiny").tolerances)
    assert outcome.passed, outcome.to_json()


def _decoder_feed(model: dict, seq: int, past: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of the decoder's contract: `seq` tokens after `past` rows, logits at every position."""
    embeds = (rng.standard_normal((1, seq, int(model["hidden_size"]))) * 0.5).astype(np.float16)
    shape = (past, 1, int(model["num_kv_heads"]), int(model["head_dim"]))
    feed = {
        contract.DECODER_EMBEDS: embeds,
        contract.DECODER_POSITIONS: np.arange(past, past + seq, dtype=np.int64)[None],
        contract.DECODER_LOGITS_INDEX: np.arange(seq, dtype=np.int64),
    }
    for name in contract.decoder_input_names(int(model["num_layers"]))[3:]:
        feed[name] = (rng.standard_normal(shape) * 0.5).astype(np.float16)
    return feed


def _close(got: np.ndarray, expected: np.ndarray, what) -> None:
    from mvlm_compile.verify.metrics import compare

    assert got.shape == expected.shape, what
    metrics = compare(got.astype(np.float32), expected.astype(np.float32))
    assert metrics["rel_to_scale"] <= SAME_GRAPH["rel_to_scale"], (what, metrics)
    assert metrics["cosine"] >= SAME_GRAPH["cosine"], (what, metrics)


def test_each_decoder_profile_at_its_limits_matches_onnx_runtime(engines):
    """Prefill (past = 0) at 1 token and at the longest prompt; decode at past 1 and past = context - 1."""
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.runtime.trt_backend import TrtBackend

    bundle, engines_dir, _ = engines
    rng = np.random.default_rng(0)
    with TrtBackend(bundle / "artifacts", engines_dir) as trt_backend, OrtBackend(bundle / "artifacts") as ort:
        limits, model = trt_backend.limits, trt_backend.manifest.model
        cases = [(1, 0), (limits.max_prompt, 0), (1, 1), (1, limits.context - 1)]
        for seq, past in cases:
            feed = _decoder_feed(model, seq, past, rng)
            got, expected = trt_backend.run("decoder", feed), ort.run("decoder", feed)
            for name in contract.decoder_output_names(int(model["num_layers"])):
                _close(got[name], expected[name], (seq, past, name))


def test_the_device_loop_matches_the_onnx_runtime_loop(engines):
    """The decoder loop on device buffers (in-place rows, staged rows: the tiny model's rows are 128
    bytes) against the same loop in ONNX Runtime: logits of a prefill and 40 steps, and the cache."""
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.runtime.trt_backend import TrtBackend

    bundle, engines_dir, _ = engines
    rng = np.random.default_rng(2)
    with TrtBackend(bundle / "artifacts", engines_dir) as trt_backend, OrtBackend(bundle / "artifacts") as ort:
        hidden = int(trt_backend.manifest.model["hidden_size"])
        loops = trt_backend.decoder(), ort.decoder()
        embeds = (rng.standard_normal((1, 37, hidden)) * 0.5).astype(np.float16)
        kept = []
        for step in range(41):
            got, expected = (loop.step(0, embeds) for loop in loops)
            _close(got, expected, ("step", step))
            kept.append((got, got.copy()))
            embeds = (rng.standard_normal((1, 1, hidden)) * 0.5).astype(np.float16)
        for got, expected in zip(loops[0].cache(0), loops[1].cache(0)):
            _close(got, expected, "cache")
        assert all(np.array_equal(a, b) for a, b in kept)  # no returned logits is a view of a reused buffer


def test_the_batched_device_loop_matches_the_onnx_runtime_loop(engines):
    """One device cache of the engine's max-batch slots: three prompts of different lengths in
    slots 0-2, 20 decode steps of the three together (pasts differ: staged rows moved to each
    sequence's offset with cudaMemcpy2DAsync), then the middle one leaves and the last moves into
    its slot, as the scheduler does: logits and caches against the same loop in ONNX Runtime."""
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.runtime.trt_backend import TrtBackend

    bundle, engines_dir, _ = engines
    rng = np.random.default_rng(3)
    with TrtBackend(bundle / "artifacts", engines_dir) as trt_backend, OrtBackend(bundle / "artifacts") as ort:
        hidden, slots = int(trt_backend.manifest.model["hidden_size"]), trt_backend.limits.max_batch
        assert slots >= 3
        loops = trt_backend.decoder(slots), ort.decoder(slots)
        for slot, length in enumerate((37, 5, 60)):
            embeds = (rng.standard_normal((1, length, hidden)) * 0.5).astype(np.float16)
            got, expected = (loop.step(slot, embeds) for loop in loops)
            _close(got, expected, ("prefill", slot))
        rows = 3
        for step in range(20):
            if step == 10:  # the middle sequence leaves
                for loop in loops:
                    loop.clear(1)
                    loop.move(2, 1)
                rows = 2
            embeds = (rng.standard_normal((rows, 1, hidden)) * 0.5).astype(np.float16)
            got, expected = (loop.step(0, embeds) for loop in loops)
            _close(got, expected, ("step", step))
        assert loops[0].lengths == loops[1].lengths == [57, 80] + [0] * (slots - 2)
        for slot in range(2):
            for got, expected in zip(loops[0].cache(slot), loops[1].cache(slot)):
                _close(got, expected, ("cache", slot))


def test_a_prefix_kept_in_device_memory_is_restored_into_the_slot(engines):
    """The prefix cache's pool in device memory (runtime/prefix_cache.py): a prompt's rows stored
    out of the slot, the slot overwritten by another prompt, the first restored (cudaMemcpy2DAsync
    both ways) and continued: cache and logits against the same sequence of calls in ONNX Runtime."""
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.runtime.prefix_cache import PrefixCache
    from mvlm_compile.runtime.trt_backend import TrtBackend

    bundle, engines_dir, _ = engines
    rng = np.random.default_rng(4)
    with TrtBackend(bundle / "artifacts", engines_dir) as trt_backend, OrtBackend(bundle / "artifacts") as ort:
        hidden = int(trt_backend.manifest.model["hidden_size"])
        first, other, rest = ((rng.standard_normal((1, n, hidden)) * 0.5).astype(np.float16) for n in (37, 40, 6))
        keys = list(range(37))
        loops, logits = (trt_backend.decoder(), ort.decoder()), []
        for loop in loops:
            cache = PrefixCache(loop, 2**20)
            loop.step(0, first)
            cache.store(0, keys)
            loop.clear(0)
            loop.step(0, other)  # the slot's rows are now another prompt's
            loop.clear(0)
            assert cache.restore(0, keys + [-1] * 6) == 37 == loop.lengths[0]
            logits.append(loop.step(0, rest))
        _close(logits[0], logits[1], "after the restored prefix")
        for got, expected in zip(loops[0].cache(0), loops[1].cache(0)):
            _close(got, expected, "cache")


def test_outputs_do_not_alias_the_next_call(engines):
    from mvlm_compile.runtime.trt_backend import TrtBackend

    bundle, engines_dir, _ = engines
    rng = np.random.default_rng(1)
    with TrtBackend(bundle / "artifacts", engines_dir) as backend:
        model = backend.manifest.model
        first = backend.run("decoder", _decoder_feed(model, 8, 0, rng))
        kept = {k: v.copy() for k, v in first.items()}
        backend.run("decoder", _decoder_feed(model, 8, 0, rng))
        assert all(np.array_equal(first[k], kept[k]) for k in first)


def test_a_prompt_the_engine_cannot_take_is_a_usage_error(engines, tmp_path):
    """Longer than the prefill profile but within the model's context: exit 2 naming the limit."""
    from mvlm_compile.cli import cli
    from mvlm_compile.runtime.pipeline import Chat, Pipeline
    from mvlm_compile.runtime.trt_backend import TrtBackend

    bundle, engines_dir, _ = engines
    with TrtBackend(bundle / "artifacts", engines_dir) as backend:
        limits, chat = backend.limits, Chat(Pipeline(backend))
        image_tokens = int(backend.manifest.model["image_tokens"])
        words = next(
            n for n in range(1, 2000) if len(chat.prompt_ids("word " * n)) - 1 + image_tokens > limits.max_prompt
        )
        prompt_tokens = len(chat.prompt_ids("word " * words)) - 1 + image_tokens
    assert prompt_tokens + 4 <= limits.context <= int(backend.manifest.model["max_context"])
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(bundle),
            "--backend",
            "trt",
            "--engines",
            str(engines_dir),
            "--image",
            str(GOLDEN_TINY / "image.png"),
        ]
        + ["--prompt", "word " * words, "--max-new-tokens", "4"],
    )
    assert result.exit_code == 2, result.output
    assert f"exceed the longest prompt of {limits.max_prompt}" in result.output


def test_a_second_build_skips_the_engines(engines):
    from mvlm_compile.bundle import build

    bundle, _, _ = engines
    again = build(_target(), bundle)
    assert set(again.stages.values()) == {"skipped (unchanged)"}
