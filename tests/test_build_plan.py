"""Target, profile and memory planning, checked against hand counts of the architecture."""

from __future__ import annotations

import dataclasses

import pytest

from mvlm_compile import contract
from mvlm_compile.engine.plan import (
    GIB,
    MAX_DEFAULT_BATCH,
    BuildSettings,
    Geometry,
    check_fits,
    fit_batch,
    optimization_profiles,
    plan_memory,
)
from mvlm_compile.errors import MvlmError
from mvlm_compile.recipes import load_recipe, load_targets

# Model geometry as an artifacts manifest records it (../shared/model-facts.md).
MODEL_CONTEXT = 2048
MODELS = {
    "mobilevlm-v2-1.7b": dict(
        hidden_size=2048,
        mm_hidden_size=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        vocab_size=32000,
    ),
    "mobilevlm-v2-7b": dict(
        hidden_size=4096,
        mm_hidden_size=1024,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        vocab_size=32000,
    ),
}


def _plan(model: str, target: str, **settings):
    recipe, t = load_recipe(model), load_targets()[target]
    geometry = Geometry.from_recipe_and_manifest(recipe, MODELS[model])
    s = BuildSettings.resolve(recipe, t, MODEL_CONTEXT, **settings)
    return recipe, t, geometry, s, plan_memory(geometry, recipe, t, s)


def test_1p7b_weights_and_kv_cache_by_hand():
    _, _, _, settings, plan = _plan("mobilevlm-v2-1.7b", "orin-agx-64gb")
    items = dict(plan.rows)
    # 24 layers x (4 x 2048^2 attention + 3 x 2048 x 5632 MLP) = 1,233,125,376 weights,
    # 4 bits each plus an FP16 scale per 128.
    linear = 24 * (4 * 2048 * 2048 + 3 * 2048 * 5632)
    assert items["decoder linear weights (int4, group 128)"] == pytest.approx(linear / 2 + linear / 128 * 2)
    # ViT-L/14 up to layer 23: 23 x (4 x 1024^2 + 2 x 1024 x 4096) + embeddings, FP16.
    vision = 23 * (4 * 1024**2 + 2 * 1024 * 4096) + 577 * 1024 + 3 * 14 * 14 * 1024
    assert items["vision weights (fp16)"] == pytest.approx(vision * 2)
    # K and V, 24 layers, 16 heads x 128, 2048 positions, FP16: the one cache the runtime preallocates
    # (its steps write their rows into it; nothing holds a past and a present copy).
    assert settings.context == 2048
    kv_key = next(k for k in items if k.startswith("KV cache"))
    assert items[kv_key] == pytest.approx(settings.batch * (2 * 24 * 16 * 128 * 2048) * 2)
    # The run time's default prefix cache: one more sequence at the context.
    prefix_key = next(k for k in items if k.startswith("prefix cache"))
    assert items[prefix_key] == pytest.approx((2 * 24 * 16 * 128 * 2048) * 2)
    # The runtime's own buffers: the longest prompt's FP16 embeddings and int64 positions, one FP16 logits row.
    runtime_key = next(k for k in items if k.startswith("runtime buffers"))
    assert items[runtime_key] == pytest.approx(settings.max_prompt * (2048 * 2 + 8) + 32000 * 2)
    assert plan.fits


def test_7b_is_refused_on_orin_nano_with_the_numbers():
    recipe, target, _, _, plan = _plan("mobilevlm-v2-7b", "orin-nano-8gb")
    assert not plan.fits
    with pytest.raises(
        MvlmError, match=r"--target orin-nano-8gb: mobilevlm-v2-7b needs \d+\.\d\d GiB .* budget is 4\.50 GiB"
    ) as err:
        check_fits(plan, target, recipe)
    assert "decoder linear weights (int4, group 128)" in str(err.value)
    # A shorter context does not save it: the INT4 weights alone are 3.1 GiB.
    *_, short = _plan("mobilevlm-v2-7b", "orin-nano-8gb", context=256)
    assert not short.fits


def test_every_model_fits_the_agx_targets():
    for model in MODELS:
        for target in ("orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb"):
            assert _plan(model, target)[-1].fits, (model, target)


def test_decoder_profiles_prefill_and_decode():
    _, _, geometry, settings, _ = _plan("mobilevlm-v2-1.7b", "orin-nx-16gb")
    prefill, decode = optimization_profiles(geometry, settings)["decoder"]
    past = contract.past_names(23)[1]
    # A prompt is prefilled in chunks: after no past (opt) up to context - 1; the sequence axis first.
    assert prefill[past] == [[0, 1, 16, 128], [0, 1, 16, 128], [settings.context - 1, 1, 16, 128]]
    assert prefill[contract.DECODER_EMBEDS][2] == [1, settings.max_prompt, 2048]
    # The runtime asks for one position's logits; verification for every prompt position.
    assert prefill[contract.DECODER_LOGITS_INDEX] == [[1], [1], [settings.max_prompt]]
    assert decode[contract.DECODER_EMBEDS] == [[1, 1, 2048]] * 3
    assert decode[past][0] == [1, 1, 16, 128]  # a decode step always follows a past
    assert decode[past][2] == [settings.context - 1, 1, 16, 128]
    assert decode[contract.DECODER_LOGITS_INDEX] == [[1]] * 3
    assert settings.max_prompt < settings.context


def test_a_batch_profile_decodes_up_to_max_batch_sequences_over_as_many_slots():
    _, _, geometry, settings, _ = _plan("mobilevlm-v2-1.7b", "orin-nx-16gb", batch=8)
    prefill, decode = optimization_profiles(geometry, settings)["decoder"]
    past = contract.past_names(0)[0]
    assert decode[contract.DECODER_EMBEDS] == [[1, 1, 2048], [8, 1, 2048], [8, 1, 2048]]
    assert decode[contract.DECODER_POSITIONS] == [[1, 1], [8, 1], [8, 1]]
    assert [shape[1] for shape in decode[past]] == [1, 8, 8]  # the cache's slots
    assert prefill[contract.DECODER_EMBEDS][2][0] == 1  # one prompt at a time
    assert [shape[1] for shape in prefill[past]] == [1, 8, 8]  # a chunk reads its slot's past


@pytest.mark.parametrize("target", ["orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb", "orin-nano-8gb"])
def test_the_default_max_batch_is_the_most_slots_the_memory_plan_holds(target):
    """Each slot is a sequence's cache at the full context: 2 x 24 layers x 16 x 128 x 2 bytes per
    token (1.7B). The default is the largest batch up to 8 whose plan fits the target's budget."""
    recipe, t, geometry, settings, _ = _plan("mobilevlm-v2-1.7b", target)
    chosen = fit_batch(geometry, recipe, t, settings)
    plan = plan_memory(geometry, recipe, t, chosen)
    kv_key = next(k for k in dict(plan.rows) if k.startswith("KV cache"))
    assert dict(plan.rows)[kv_key] == pytest.approx(chosen.batch * 2 * 24 * 16 * 128 * 2 * chosen.context)
    assert plan.fits
    if chosen.batch < MAX_DEFAULT_BATCH:
        assert not plan_memory(geometry, recipe, t, dataclasses.replace(chosen, batch=chosen.batch + 1)).fits
    big = fit_batch(geometry, recipe, t, dataclasses.replace(settings, batch=1))
    assert big == chosen and 1 <= chosen.batch <= 8


def test_workspace_is_what_is_left_within_limits():
    *_, plan = _plan("mobilevlm-v2-1.7b", "orin-nano-8gb")
    assert 256 * 2**20 <= plan.workspace <= 4 * GIB
    assert plan.total + plan.workspace <= plan.budget


def test_context_is_capped_by_the_model_and_checked():
    recipe, target = load_recipe("tiny"), load_targets()["orin-agx-64gb"]
    assert BuildSettings.resolve(recipe, target, 512).context == 512  # target default 2048
    with pytest.raises(MvlmError, match=r"--context 4096: expected 2 to the model's context of 512"):
        BuildSettings.resolve(recipe, target, 512, context=4096)


def test_decode_traffic_of_the_tiny_bundle_by_hand():
    """Weights (INT4 packed two per byte, FP16 scales and lm_head) read once, the past's K/V read
    once, one row written per layer: the analytic bytes of a TensorRT decode step."""
    import numpy as np
    import onnx
    from conftest import TINY_BUNDLE
    from onnx import numpy_helper

    from mvlm_compile.engine.plan import decode_traffic
    from mvlm_compile.manifest import load_manifest

    artifacts = TINY_BUNDLE / "artifacts"
    manifest = load_manifest(artifacts)
    graph = manifest.graph_path(artifacts, "decoder")
    model = onnx.load(str(graph))  # with its weights: their sizes counted from the arrays themselves
    weights = 0
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        packed = tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
        weights += -(-array.size // 2) if packed else array.nbytes
    geometry = Geometry.from_recipe_and_manifest(load_recipe("tiny"), manifest.model)
    traffic = decode_traffic(graph, geometry, past=300)
    items = dict(traffic.rows)
    assert items["weights (each read once)"] == weights
    kv = next(v for k, v in items.items() if k.startswith("K/V of the past"))
    assert kv == 2 * 2 * 300 * 4 * 16 * 2  # K and V, 2 layers, 300 rows of 4 heads x 16, FP16
    assert traffic.floor == weights + kv
    assert traffic.total == pytest.approx(sum(items.values())) and traffic.ratio > 1
    assert np.isfinite(traffic.to_json()["total_over_floor"]) and "total / floor" in traffic.table()
