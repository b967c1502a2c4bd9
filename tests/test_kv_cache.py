"""The preallocated KV cache (runtime/kv_cache.py): its layout and offsets by hand, and the decoder
loop in ONNX Runtime against the same graph run the plain way (a host cache grown by
concatenation, whole arrays in and out), so the buffer logic the TensorRT backend shares is run
for real here. Torch-free: the committed tiny bundle."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_BUNDLE

from mvlm_compile import contract
from mvlm_compile.engines_record import DECODE_PROFILE, PREFILL_PROFILE
from mvlm_compile.errors import ArtifactError, InternalError
from mvlm_compile.runtime.kv_cache import DecoderLoop, DecoderPlan, choose_profile
from mvlm_compile.runtime.ort_backend import OrtBackend, OrtExecutor

ARTIFACTS = TINY_BUNDLE / "artifacts"


def _plan(**geometry) -> DecoderPlan:
    values = dict(
        layers=24,
        batch=1,
        kv_heads=16,
        head_dim=128,
        hidden=2048,
        vocab=32000,
        context=2048,
        max_prompt=1536,
        embeds_dtype=np.dtype(np.float16),
        kv_dtype=np.dtype(np.float16),
        logits_dtype=np.dtype(np.float16),
    )
    values.update(geometry)
    return DecoderPlan(**values)


def test_1p7b_rows_are_4_kib_and_always_written_in_place():
    plan = _plan()
    assert plan.row_bytes == 16 * 128 * 2 == 4096
    assert plan.cache_bytes == 2 * 24 * 2048 * 4096  # one cache of the context: 384 MiB, nothing else holds K/V
    base = 0x7F0000000000
    inputs, outputs = plan.bindings(base, past=1000, seq=1)
    key = base + plan.cache_tensor(23, 0)
    assert inputs["past.23.key"].address == key and inputs["past.23.key"].shape == (1000, 1, 16, 128)
    assert outputs["new.23.key"].address == key + 1000 * 4096 and outputs["new.23.key"].shape == (1, 1, 16, 128)
    assert outputs[contract.DECODER_LOGITS].shape == (1, 1, 32000)  # one row comes back, not the prompt's
    assert all(plan.row_in_place(past) for past in range(2048))
    every = [*inputs.values(), *outputs.values()]
    assert all(b.address % 256 == 0 for b in every)
    # The embeddings, positions and logits of the largest prefill fit between the cache and the staging rows.
    assert plan.positions - plan.embeds >= 1536 * 2048 * 2 and plan.logits - plan.logits_index == 256


def test_a_prefill_binds_its_empty_past_at_the_aligned_cache_base():
    plan = _plan()
    inputs, outputs = plan.bindings(0x7F0000000000, past=0, seq=300)
    past, new = inputs["past.5.value"], outputs["new.5.value"]
    assert past.shape == (0, 1, 16, 128) and past.address != 0 and past.address % 256 == 0
    assert new.address == past.address and new.shape == (300, 1, 16, 128)  # the prompt's rows fill the start


def test_rows_under_256_bytes_go_through_the_staging_row_when_unaligned():
    """The tiny model in FP16: 4 heads x 16 x 2 bytes = 128-byte rows; after an odd past the new
    row's address would be 128-byte aligned only, so it is written to an aligned staging row."""
    plan = _plan(layers=2, kv_heads=4, head_dim=16, hidden=64, vocab=512, context=512, max_prompt=511)
    assert plan.row_bytes == 128
    base = 0x7F0000000000
    _, even = plan.bindings(base, past=10, seq=1)
    _, odd = plan.bindings(base, past=11, seq=1)
    assert even["new.1.value"].address == base + plan.cache_tensor(1, 1) + 10 * 128
    assert odd["new.1.value"].address == base + plan.staging(1, 1)
    assert all(b.address % 256 == 0 for b in odd.values())
    assert plan.total_bytes >= plan.staging(1, 1) + 128


def test_profiles_follow_the_call():
    assert choose_profile(past=0, seq=300) == PREFILL_PROFILE
    assert choose_profile(past=300, seq=1) == DECODE_PROFILE
    with pytest.raises(InternalError, match="no profile takes it"):
        choose_profile(past=300, seq=2)


def _plain_step(session, model: dict, embeds: np.ndarray, cache: list[np.ndarray], past: int) -> dict:
    """The same graph, run with whole host arrays: the cache concatenated by hand."""
    seq = embeds.shape[1]
    feed = {
        contract.DECODER_EMBEDS: embeds,
        contract.DECODER_POSITIONS: np.arange(past, past + seq, dtype=np.int64)[None],
        contract.DECODER_LOGITS_INDEX: np.array([seq - 1], np.int64),
    }
    feed.update(zip(contract.decoder_input_names(int(model["num_layers"]))[3:], cache))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def test_the_loop_matches_the_graph_run_with_a_concatenated_cache():
    """Prefill 9 tokens, then 6 steps (odd and even pasts: in place and staged rows): every step's
    logits and the cache after it equal the plain run's; outputs are fresh arrays."""
    rng = np.random.default_rng(0)
    with OrtBackend(ARTIFACTS) as backend:
        model = backend.manifest.model
        loop = backend.decoder()
        assert loop.plan.kv_dtype == np.float16 and loop.plan.row_bytes == 128
        session = backend._session("decoder")
        empty = np.zeros((0, 1, int(model["num_kv_heads"]), int(model["head_dim"])), np.float16)
        cache = [empty] * (2 * int(model["num_layers"]))
        embeds = (rng.standard_normal((1, 9, int(model["hidden_size"]))) * 0.5).astype(np.float16)
        loop.reset()
        returned = []
        for step in range(7):
            logits = loop.step(embeds)
            plain = _plain_step(session, model, embeds, cache, sum(c.shape[0] for c in cache[:1]))
            cache = [
                np.concatenate([c, plain[name]])
                for c, name in zip(cache, contract.decoder_output_names(int(model["num_layers"]))[1:])
            ]
            np.testing.assert_array_equal(logits, plain[contract.DECODER_LOGITS][:, -1].astype(np.float32))
            assert loop.past == cache[0].shape[0] == 9 + step
            for got, expected in zip(loop.cache(), cache):
                np.testing.assert_array_equal(got, expected)
            returned.append((logits, logits.copy()))
            embeds = (rng.standard_normal((1, 1, int(model["hidden_size"]))) * 0.5).astype(np.float16)
        assert all(np.array_equal(kept, copy) for kept, copy in returned)  # no output is a view of a reused buffer


def test_a_prefill_restarts_the_sequence():
    rng = np.random.default_rng(1)
    embeds = (rng.standard_normal((1, 5, 64)) * 0.5).astype(np.float32)
    with OrtBackend(ARTIFACTS) as backend:
        loop = backend.decoder()
        first = loop.step(embeds)
        loop.step(embeds[:, :1])
        loop.reset()
        np.testing.assert_array_equal(loop.step(embeds), first)
        assert loop.past == 5


def test_the_loop_refuses_calls_past_its_plan():
    with OrtBackend(ARTIFACTS) as backend:
        plan = DecoderPlan.from_manifest(backend.manifest, backend.limits)
        loop = DecoderLoop(OrtExecutor(backend._session("decoder")), plan)
        with pytest.raises(InternalError, match="exceeds the plan"):
            loop.step(np.zeros((1, plan.max_prompt + 1, 64), np.float32))


def test_artifacts_of_the_old_decoder_contract_are_refused_with_a_one_line_error():
    with OrtBackend(ARTIFACTS) as backend:
        backend.manifest.graphs["decoder"]["inputs"][3]["name"] = "past_key_values.0.key"
        with pytest.raises(ArtifactError, match="not this version's contract.*re-export"):
            backend.decoder()


def test_an_fp16_graph_gets_an_fp16_cache_and_embedding_table():
    """The tiny bundle's decoder is FP16 (INT4 weights): the table the runtime gathers from, the
    cache and the uploaded embeddings are FP16 too (half the bytes of FP32, no cast per step)."""
    from mvlm_compile.runtime.pipeline import Pipeline

    with OrtBackend(ARTIFACTS) as backend:
        pipeline = Pipeline(backend)
        plan = backend.decoder().plan
        assert pipeline.embed_table.dtype == plan.embeds_dtype == plan.kv_dtype == np.float16
