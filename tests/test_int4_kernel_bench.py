"""The INT4 kernel benchmark's graph: MatMulNBits nodes that compute what their codes and scales
say (checked against NumPy), the step's linears of a recipe, and its report and bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import int4_kernel_bench  # noqa: E402

from mvlm_compile.errors import MvlmError  # noqa: E402


@pytest.mark.parametrize(("bits", "block"), [(4, 16), (4, 64), (8, 32)])
def test_matmulnbits_node_computes_the_dequantized_product(bits: int, block: int) -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    n, k = 48, 128
    codes = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, k // block)).astype(np.float32)
    node, inits = int4_kernel_bench.matmulnbits("y", "x", codes, scales, bits, block, level=0)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    weight = (codes.astype(np.float64) - 2 ** (bits - 1)) * np.repeat(scales, block, axis=1)  # [n, k]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight.T, rtol=1e-4, atol=1e-4)


def test_step_linears_are_the_decoder_linears_of_one_token() -> None:
    linears = int4_kernel_bench.step_linears("mobilevlm-v2-1.7b")
    assert len(linears) == 24 * 7
    # MobileLLaMA 1.4B: hidden 2048, intermediate 5632 (../shared/model-facts.md).
    assert sum(k * n for _, k, n in linears) == 24 * (4 * 2048 * 2048 + 3 * 2048 * 5632)
    assert ("layers.23.down", 5632, 2048) in linears


def test_report_per_block_size_and_bad_blocks(tmp_path, capsys) -> None:
    report = tmp_path / "kernel.json"
    args = ["--recipe", "tiny", "--blocks", "16", "32", "--repeats", "2", "--report", str(report)]
    assert int4_kernel_bench.main(args) == 0
    data = json.loads(report.read_text())
    assert data["linears"] == 2 * 7 and set(data["blocks"]) == {"16", "32"}
    # Tiny: 2 layers x (4 x 64x64 + 3 x 64x192) weights, half a byte each, plus one FP32 scale per block.
    weights = 2 * (4 * 64 * 64 + 3 * 64 * 192)
    assert data["blocks"]["16"]["weight_mib"] == round((weights / 2 + weights / 16 * 4) / 2**20, 1)
    assert all(b["median_ms"] > 0 for b in data["blocks"].values())
    assert int4_kernel_bench.main(["--recipe", "tiny", "--blocks", "24", "--report", str(report)]) == 2
    assert "--blocks" in capsys.readouterr().err


def test_batch_gain_structure_on_tiny_linears(tmp_path, capsys) -> None:
    gain = int4_kernel_bench.matmulnbits_batch_gain(rows=(4, 2), layers=2, k=64, n=96, block=32, threads=1, repeats=3)
    assert [r["rows"] for r in gain["per_rows"]] == [1, 2, 4]  # batch 1, the reference, always timed
    # 2 layers of 64 x 96 codes, half a byte each, and one FP32 scale per 32 inputs per output.
    assert gain["weight_mib"] == round(2 * (64 * 96 / 2 + 64 // 32 * 96 * 4) / 2**20, 1)
    assert (gain["layers"], gain["k"], gain["n"], gain["block"], gain["accuracy_level"]) == (2, 64, 96, 32, 4)
    one = gain["per_rows"][0]["median_ms"]
    for r in gain["per_rows"]:
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["gain"] == pytest.approx(r["rows"] * one / r["median_ms"])
    with pytest.raises(MvlmError, match="does not divide"):
        int4_kernel_bench.matmulnbits_batch_gain(rows=(2,), layers=1, k=48, n=8, block=32, repeats=1)
    # The CLI's --rows: the 2048 x 5632 linears, one layer here.
    report = tmp_path / "gain.json"
    assert int4_kernel_bench.main(["--rows", "2", "--layers", "1", "--repeats", "1", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert (data["k"], data["n"], data["block"]) == (2048, 5632, 128) and len(data["per_rows"]) == 2
    assert "gain (rows x t1 / tN)" in capsys.readouterr().out
