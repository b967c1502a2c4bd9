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
from mvlm_compile.runtime.kv_cache import Copy2D, DecoderLoop, DecoderPlan, choose_profile
from mvlm_compile.runtime.ort_backend import OrtBackend, OrtExecutor

ARTIFACTS = TINY_BUNDLE / "artifacts"


def _plan(**geometry) -> DecoderPlan:
    values = dict(
        layers=24,
        slots=1,
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


def test_1p7b_rows_are_4_kib_and_a_single_sequence_writes_in_place():
    plan = _plan()
    assert plan.slot_bytes == plan.row_bytes == 16 * 128 * 2 == 4096
    assert plan.cache_bytes == 2 * 24 * 2048 * 4096  # one cache of the context: 384 MiB, nothing else holds K/V
    base = 0x7F0000000000
    inputs, outputs = plan.bindings(base, 0, [1000], seq=1)
    key = base + plan.cache_tensor(23, 0)
    assert inputs["past.23.key"].address == key and inputs["past.23.key"].shape == (1000, 1, 16, 128)
    assert outputs["new.23.key"].address == key + 1000 * 4096 and outputs["new.23.key"].shape == (1, 1, 16, 128)
    assert outputs[contract.DECODER_LOGITS].shape == (1, 1, 32000)  # one row comes back, not the prompt's
    assert all(plan.new_rows_in_place(0, [past], 1) for past in range(2048))
    every = [*inputs.values(), *outputs.values()]
    assert all(b.address % 256 == 0 for b in every)
    # The embeddings, positions and logits of the largest prefill fit between the cache and the staging rows.
    assert plan.positions - plan.embeds >= 1536 * 2048 * 2 and plan.logits - plan.logits_index == 256


def test_eight_slots_hold_eight_sequences_at_the_full_context():
    plan = _plan(slots=8)
    assert plan.row_bytes == 8 * 4096 and plan.cache_bytes == 2 * 24 * 2048 * 8 * 4096  # 3 GiB
    assert plan.chunked_prefill  # a view may start at any slot: 4 KiB apart
    # Position p of slot s: p whole rows of 8 slots, then s slots in.
    assert plan.cell(3, 1, 100, 5) == plan.cache_tensor(3, 1) + (100 * 8 + 5) * 4096


def test_a_decode_step_of_rows_with_different_pasts_binds_one_view_and_stages_the_new_rows():
    plan = _plan(slots=8)
    base = 0x7F0000000000
    inputs, outputs = plan.bindings(base, 0, [1000, 700, 12], seq=1)
    past, new = inputs["past.4.value"], outputs["new.4.value"]
    # The longest past, all 8 slots wide (rows 0..2 read slots 0..2; the graph masks each row's own length).
    assert past.address == base + plan.cache_tensor(4, 1) and past.shape == (1000, 8, 16, 128)
    assert new.address == base + plan.staging(4, 1) and new.shape == (1, 3, 16, 128)
    assert inputs[contract.DECODER_EMBEDS].shape == (3, 1, 2048) and outputs[contract.DECODER_LOGITS].shape == (
        3,
        1,
        32000,
    )
    copies = [c for c in plan.scatter(base, 0, [1000, 700, 12], 1) if c.src == base + plan.staging(4, 1) + 4096]
    assert copies == [
        Copy2D(base + plan.cell(4, 1, 700, 1), 8 * 4096, base + plan.staging(4, 1) + 4096, 3 * 4096, 4096, 1)
    ]
    assert len(plan.scatter(base, 0, [1000, 700, 12], 1)) == 24 * 2 * 3  # a row per sequence per layer, not the cache
    # Rows in step (the same past) are adjacent at that position: written in place.
    _, in_step = plan.bindings(base, 0, [500, 500, 500], seq=1)
    assert in_step["new.4.value"].address == base + plan.cell(4, 1, 500, 0)


def test_a_prefill_at_another_slot_binds_its_empty_past_at_the_aligned_base_and_stages_its_rows():
    plan = _plan(slots=8)
    base = 0x7F0000000000
    inputs, outputs = plan.bindings(base, 5, [0], seq=300)
    past, new = inputs["past.5.value"], outputs["new.5.value"]
    assert past.shape == (0, 8, 16, 128) and past.address == base + plan.cache_tensor(5, 1)
    assert new.address == base + plan.staging(5, 1) and new.shape == (300, 1, 16, 128)
    assert plan.staging_bytes >= 1536 * 4096  # the largest prefill's rows
    # A later chunk reads slot 5's past through a view that starts at slot 5 with the cache's pitch.
    chunk, _ = plan.bindings(base, 5, [300], seq=64)
    assert chunk["past.5.value"].address == base + plan.cell(5, 1, 0, 5) and chunk["past.5.value"].shape[:2] == (300, 8)
    (copy,) = [c for c in plan.scatter(base, 5, [300], 64) if c.src == base + plan.staging(5, 1)]
    assert (copy.dst, copy.dst_pitch, copy.src_pitch, copy.height) == (
        base + plan.cell(5, 1, 300, 5),
        8 * 4096,
        4096,
        64,
    )


def test_rows_under_256_bytes_go_through_staging_and_are_prefilled_in_one_call():
    """The tiny model in FP16: 4 heads x 16 x 2 bytes = 128-byte rows; after an odd past the new
    row's address would be 128-byte aligned only, so it is written to an aligned staging row; and
    a past view starting at an odd slot would be unaligned, so prompts are not chunked."""
    plan = _plan(layers=2, kv_heads=4, head_dim=16, hidden=64, vocab=512, context=512, max_prompt=511)
    assert plan.slot_bytes == 128 and plan.chunked_prefill  # one slot: every view starts at the base
    base = 0x7F0000000000
    _, even = plan.bindings(base, 0, [10], seq=1)
    _, odd = plan.bindings(base, 0, [11], seq=1)
    assert even["new.1.value"].address == base + plan.cache_tensor(1, 1) + 10 * 128
    assert odd["new.1.value"].address == base + plan.staging(1, 1)
    assert all(b.address % 256 == 0 for b in odd.values())
    assert plan.total_bytes >= plan.staging(1, 1) + 128
    assert not _plan(slots=3, layers=2, kv_heads=4, head_dim=16, hidden=64, vocab=512, context=512).chunked_prefill


def test_profiles_follow_the_call():
    assert choose_profile(rows=1, seq=300, past=0) == PREFILL_PROFILE
    assert choose_profile(rows=1, seq=64, past=300) == PREFILL_PROFILE  # a chunk of a prompt
    assert choose_profile(rows=1, seq=1, past=300) == DECODE_PROFILE
    assert choose_profile(rows=8, seq=1, past=300) == DECODE_PROFILE
    with pytest.raises(InternalError, match="no profile takes it"):
        choose_profile(rows=2, seq=2, past=300)


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
            logits = loop.step(0, embeds)
            plain = _plain_step(session, model, embeds, cache, sum(c.shape[0] for c in cache[:1]))
            cache = [
                np.concatenate([c, plain[name]])
                for c, name in zip(cache, contract.decoder_output_names(int(model["num_layers"]))[1:])
            ]
            np.testing.assert_array_equal(logits, plain[contract.DECODER_LOGITS][:, -1].astype(np.float32))
            assert loop.lengths == [cache[0].shape[0]] == [9 + step]
            for got, expected in zip(loop.cache(0), cache):
                np.testing.assert_array_equal(got, expected)
            returned.append((logits, logits.copy()))
            embeds = (rng.standard_normal((1, 1, int(model["hidden_size"]))) * 0.5).astype(np.float16)
        assert all(np.array_equal(kept, copy) for kept, copy in returned)  # no output is a view of a reused buffer


def _run_plain(session, embeds: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> dict:
    feed = {
        contract.DECODER_EMBEDS: embeds,
        contract.DECODER_POSITIONS: positions,
        contract.DECODER_LOGITS_INDEX: np.array([embeds.shape[1] - 1], np.int64),
    }
    layers = len(past) // 2
    feed.update(zip(contract.decoder_input_names(layers)[3:], past))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def test_rows_with_different_pasts_share_a_step_as_the_contract_says():
    """Three prompts (5, 9 and 3 tokens) in slots 0-2 of a 4-slot cache, then 4 decode steps of the
    three together. Checked against the graph run the plain way with host arrays: each row's cache
    grown by concatenation, the batch's past stacked to the longest one and padded with large
    random values where a row has no token (the graph must mask them), positions per row. The
    loop's logits and each slot's cache equal the plain run's bit for bit; and each row's logits
    equal its sequence run alone (batch 1) up to FP16 rounding, with the same greedy token."""
    rng = np.random.default_rng(2)
    with OrtBackend(ARTIFACTS) as backend:
        model = backend.manifest.model
        layers, hidden = int(model["num_layers"]), int(model["hidden_size"])
        kv = (int(model["num_kv_heads"]), int(model["head_dim"]))
        session = backend._session("decoder")
        loop = backend.decoder(4)
        prompts = [(rng.standard_normal((1, n, hidden)) * 0.5).astype(np.float16) for n in (5, 9, 3)]
        steps = (rng.standard_normal((4, 3, 1, hidden)) * 0.5).astype(np.float16)

        def empty() -> list[np.ndarray]:
            return [np.zeros((0, 1, *kv), np.float16) for _ in range(2 * layers)]

        plain, alone = [empty() for _ in prompts], [empty() for _ in prompts]
        for slot, prompt in enumerate(prompts):
            logits = loop.step(slot, prompt)
            out = _run_plain(session, prompt, np.arange(prompt.shape[1])[None], plain[slot])
            np.testing.assert_array_equal(logits, out[contract.DECODER_LOGITS][:, -1].astype(np.float32))
            plain[slot] = [
                np.concatenate([c, out[n]]) for c, n in zip(plain[slot], contract.decoder_output_names(layers)[1:])
            ]
            alone[slot] = list(plain[slot])
        assert loop.lengths == [5, 9, 3, 0]

        for embeds in steps:
            logits = loop.step(0, embeds)
            lengths = [c[0].shape[0] for c in plain]
            longest = max(lengths)
            stacked = []
            for i in range(2 * layers):
                past = (rng.standard_normal((longest, 3, *kv)) * 1e3).astype(np.float16)
                for row, length in enumerate(lengths):
                    past[:length, row] = plain[row][i][:, 0]
                stacked.append(past)
            out = _run_plain(session, embeds, np.array(lengths)[:, None], stacked)
            np.testing.assert_array_equal(logits, out[contract.DECODER_LOGITS][:, -1].astype(np.float32))
            for row in range(3):
                new = [out[n][:, row : row + 1] for n in contract.decoder_output_names(layers)[1:]]
                plain[row] = [np.concatenate([c, r]) for c, r in zip(plain[row], new)]
                single = _run_plain(session, embeds[row : row + 1], np.array([[alone[row][0].shape[0]]]), alone[row])
                alone[row] = [
                    np.concatenate([c, single[n]])
                    for c, n in zip(alone[row], contract.decoder_output_names(layers)[1:])
                ]
                expected = single[contract.DECODER_LOGITS][0, -1].astype(np.float32)
                np.testing.assert_allclose(logits[row], expected, atol=2e-2 * np.abs(expected).max())
                assert logits[row].argmax() == expected.argmax()
        assert loop.lengths == [9, 13, 7, 0]
        for slot in range(3):
            for got, expected in zip(loop.cache(slot), plain[slot]):
                np.testing.assert_array_equal(got, expected)

        # A sequence moved to another slot keeps its rows; its old slot is free.
        before = loop.cache(2)
        loop.clear(0)
        loop.move(2, 0)
        assert loop.lengths == [7, 13, 0, 0]
        for got, expected in zip(loop.cache(0), before):
            np.testing.assert_array_equal(got, expected)


def test_a_prefill_restarts_the_sequence():
    rng = np.random.default_rng(1)
    embeds = (rng.standard_normal((1, 5, 64)) * 0.5).astype(np.float32)
    with OrtBackend(ARTIFACTS) as backend:
        loop = backend.decoder()
        first = loop.step(0, embeds)
        loop.step(0, embeds[:, :1])
        loop.clear(0)
        np.testing.assert_array_equal(loop.step(0, embeds), first)
        assert loop.lengths == [5]


def test_the_loop_refuses_calls_past_its_plan():
    with OrtBackend(ARTIFACTS) as backend:
        plan = DecoderPlan.from_manifest(backend.manifest, backend.limits)
        loop = DecoderLoop(OrtExecutor(backend._session("decoder")), plan)
        with pytest.raises(InternalError, match="exceeds the plan"):
            loop.step(0, np.zeros((1, plan.max_prompt + 1, 64), np.float32))


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
