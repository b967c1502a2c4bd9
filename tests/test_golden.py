"""Golden tensors: reproducible, in Polygraphy's format, consistent, and the committed set current."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import GOLDEN_TINY

from mvlm_compile import contract
from mvlm_compile.model.golden import write_golden
from mvlm_compile.model.loader import load_checkpoint
from mvlm_compile.verify.golden_io import load_component


def _tensor_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name != "manifest.json")


def test_golden_twice_gives_identical_tensors(tiny_checkpoint, tiny_golden, tmp_path):
    second = tmp_path / "again"
    write_golden(tiny_checkpoint, second)
    assert _tensor_files(second) == _tensor_files(tiny_golden)
    for name in _tensor_files(second):
        assert (second / name).read_bytes() == (tiny_golden / name).read_bytes(), name


def test_polygraphy_format_and_contract_names(tiny_golden):
    feed, outputs = load_component(tiny_golden, "vision")
    assert list(feed) == [contract.VISION_INPUT] and feed[contract.VISION_INPUT].shape == (1, 3, 336, 336)
    assert outputs[contract.VISION_OUTPUT].shape == (1, 576, 64)
    feed, outputs = load_component(tiny_golden, "projector")
    assert outputs[contract.PROJECTOR_OUTPUT].shape == (1, 144, 64)
    feed, outputs = load_component(tiny_golden, "decoder_prefill")
    assert list(feed) == contract.decoder_input_names(2)
    assert list(outputs) == contract.decoder_output_names(2)
    seq = feed[contract.DECODER_EMBEDS].shape[1]
    assert feed["past.0.key"].shape == (0, 1, 4, 16)  # the cache layout: sequence outermost
    assert outputs["new.1.value"].shape == (seq, 1, 4, 16)  # the rows of the prompt's tokens
    assert feed[contract.DECODER_POSITIONS].dtype == np.int64 and feed[contract.DECODER_LOGITS_INDEX].dtype == np.int64
    # Golden prefill logits cover every position (verification checks them all; the runtime asks for the last).
    assert np.array_equal(feed[contract.DECODER_LOGITS_INDEX], np.arange(seq))
    assert outputs[contract.DECODER_LOGITS].shape == (1, seq, 512)
    decode, decode_out = load_component(tiny_golden, "decoder_decode")
    assert decode["past.1.value"].shape == (seq, 1, 4, 16) and decode_out["new.1.value"].shape == (1, 1, 4, 16)
    np.testing.assert_array_equal(
        decode["past.1.value"], outputs["new.1.value"]
    )  # the decode's past is the prefill's rows


def test_decode_step_agrees_with_a_full_forward_without_cache(tiny_checkpoint, tiny_golden):
    """The KV-cache decode step, checked against a plain forward over prompt + token (no cache)."""
    model = load_checkpoint(tiny_checkpoint).model
    prefill, _ = load_component(tiny_golden, "decoder_prefill")
    decode, decode_out = load_component(tiny_golden, "decoder_decode")
    embeds = np.concatenate([prefill[contract.DECODER_EMBEDS], decode[contract.DECODER_EMBEDS]], axis=1)
    with torch.no_grad():
        logits = model.language_model(inputs_embeds=torch.from_numpy(embeds), use_cache=False).logits
    expected = logits[:, -1:].numpy()
    got = decode_out[contract.DECODER_LOGITS]
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    # The decode step's new K/V row is the full forward's last row (keys: layer 1's, after RoPE).
    with torch.no_grad():
        out = model.language_model(inputs_embeds=torch.from_numpy(embeds), use_cache=True)
    full_key = out.cache.layers[1].keys[:, :, -1:].permute(2, 0, 1, 3).numpy()
    np.testing.assert_allclose(decode_out["new.1.key"], full_key, atol=1e-4 * np.abs(full_key).max())


def test_generation_starts_with_the_prefill_argmax(tiny_golden):
    generation = json.loads((tiny_golden / "generation.json").read_text())
    _, prefill_out = load_component(tiny_golden, "decoder_prefill")
    assert len(generation["generated_ids"]) == 32
    assert generation["generated_ids"][0] == int(prefill_out[contract.DECODER_LOGITS][0, -1].argmax())
    assert generation["input_ids"].count(-200) == 1


def test_committed_tiny_golden_is_current(tiny_golden):
    """golden/tiny must be what today's code computes for `synth --preset tiny --seed 0`."""
    committed = json.loads((GOLDEN_TINY / "manifest.json").read_text())
    fresh = json.loads((tiny_golden / "manifest.json").read_text())
    assert committed["checkpoint"]["fingerprint_sha256"] == fresh["checkpoint"]["fingerprint_sha256"]
    assert committed["checkpoint"]["synthetic"] == {"preset": "tiny", "seed": 0}
    for component in contract.COMPONENTS:
        _, expected = load_component(GOLDEN_TINY, component)
        _, got = load_component(tiny_golden, component)
        for name, value in expected.items():
            scale = max(float(np.abs(value).max()), 1.0) if value.size else 1.0
            np.testing.assert_allclose(got[name], value, atol=1e-5 * scale, err_msg=f"{component}/{name}")
    assert json.loads((GOLDEN_TINY / "generation.json").read_text()) == json.loads(
        (tiny_golden / "generation.json").read_text()
    )
