"""The batched decode-traffic analysis: its weight bytes are the committed tiny INT4 graph's
initializers, its K/V and bandwidth arithmetic a hand count for the 1.7B."""

from __future__ import annotations

import json
import sys

import onnx
import pytest
from conftest import REPO, TINY_BUNDLE
from onnx import numpy_helper

from mvlm_compile.engine.plan import Geometry
from mvlm_compile.manifest import load_manifest
from mvlm_compile.recipes import load_recipe

sys.path.insert(0, str(REPO / "benchmarks"))
import decode_traffic  # noqa: E402


def test_weight_bytes_are_the_tiny_int4_graphs_initializers() -> None:
    artifacts = TINY_BUNDLE / "artifacts"
    manifest = load_manifest(artifacts)
    recipe = load_recipe(manifest.model["recipe"])
    assert decode_traffic.recipe_geometry(recipe) == Geometry.from_recipe_and_manifest(recipe, manifest.model)
    hidden, vocab = manifest.model["hidden_size"], manifest.model["vocab_size"]
    found = {"int4_codes": 0, "scales": 0, "lm_head": 0, "norms_and_awq_input_scales": 0}
    constants = 0
    for tensor in onnx.load(str(manifest.graph_path(artifacts, "decoder"))).graph.initializer:
        array = numpy_helper.to_array(tensor)
        if tensor.data_type == onnx.TensorProto.INT4:
            found["int4_codes"] += -(-array.size // 2)  # two codes per byte
        elif tensor.name.endswith(".weight_scale"):
            found["scales"] += array.nbytes  # FP16, one per 32 inputs per output
        elif array.shape == (hidden, vocab):
            found["lm_head"] += array.nbytes
        elif array.shape == (hidden,):
            found["norms_and_awq_input_scales"] += array.nbytes
        else:
            constants += array.nbytes  # the export's shape arithmetic, the past's mask and RoPE frequencies
    assert decode_traffic.decoder_weight_bytes(recipe) == found
    assert constants < 2048


def test_batched_step_of_the_1p7b_by_hand() -> None:
    report = decode_traffic.batched_decode_traffic(
        ["mobilevlm-v2-1.7b"], batches=[1, 8], pasts=[1024], targets=["orin-agx-64gb", "orin-nano-8gb"]
    )
    assert report["targets"] == {"orin-agx-64gb": 204.8, "orin-nano-8gb": 68.0}
    # MobileLLaMA 1.4B: 24 layers, hidden 2048 (16 heads x 128), MLP 5632, vocab 32000.
    linear = 24 * (4 * 2048 * 2048 + 3 * 2048 * 5632)
    weights = linear / 2 + linear / 128 * 2 + 2048 * 32000 * 2 + (2 * 24 + 1 + 24) * 2048 * 2
    kv_token = 2 * 24 * 16 * 128 * 2  # K and V of one token, every layer, FP16
    one, eight = report["models"]["mobilevlm-v2-1.7b"]["steps"]
    assert (one["batch"], eight["batch"], eight["past"]) == (1, 8, 1024)
    assert eight["bytes"]["weights"] == one["bytes"]["weights"] == weights
    assert eight["bytes"]["kv_read"] == 8 * 1024 * kv_token and eight["bytes"]["kv_written"] == 8 * kv_token
    floor1, floor8 = weights + 1024 * kv_token + kv_token, weights + 8 * 1025 * kv_token
    assert eight["floor_bytes"] == pytest.approx(floor8)
    agx = eight["targets"]["orin-agx-64gb"]
    assert agx["step_ms_min"] == pytest.approx(floor8 / 204.8e6)
    assert agx["tok_s_max"] == pytest.approx(8 * 204.8e9 / floor8)
    assert one["targets"]["orin-nano-8gb"]["tok_s_max"] == pytest.approx(68e9 / floor1)
    assert eight["gain_over_batch_1"] == pytest.approx(8 * floor1 / floor8) and one["gain_over_batch_1"] == 1


def test_cli_table_report_and_artifacts_mode(tmp_path, capsys) -> None:
    report = tmp_path / "traffic.json"
    args = ["--recipe", "tiny", "--batch", "2", "--past", "10", "--target", "orin-nx-16gb", "--report", str(report)]
    assert decode_traffic.main(args) == 0
    assert json.loads(report.read_text()) == decode_traffic.batched_decode_traffic(
        ["tiny"], [2], [10], ["orin-nx-16gb"]
    )
    table = capsys.readouterr().out
    assert "orin-nx-16gb: ms >= / tok/s <=" in table and "tiny" in table
    assert decode_traffic.main([str(TINY_BUNDLE / "artifacts"), "--past", "5", "300", "--json"]) == 0
    assert '"past": 300' in capsys.readouterr().out
