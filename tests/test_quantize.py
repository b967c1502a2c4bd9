"""Quantize stage: INT4 packing, the DequantizeLinear graph form, accuracy on the tiny model
(thresholds from measurement, RTN vs AWQ), FP16 vision/projector, and refusing to quantize twice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import GOLDEN_TINY
from onnx import TensorProto, helper, numpy_helper

from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.manifest import load_manifest
from mvlm_compile.quantize import QuantizeSettings, int4, quantize_artifacts, resolve_settings
from mvlm_compile.quantize.decoder import AlreadyQuantizedError, Linear, is_kept
from mvlm_compile.quantize.fp16 import convert_to_fp16
from mvlm_compile.runtime.ort_backend import OrtBackend
from mvlm_compile.verify.components import TOLERANCES, check_components


def _unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """Independent unpack: low nibble first, two's complement 4-bit."""
    b = np.frombuffer(raw, np.uint8)
    nibbles = np.stack([b & 0x0F, b >> 4], axis=1).ravel()[:count].astype(np.int16)
    return (np.where(nibbles >= 8, nibbles - 16, nibbles)).astype(np.int8)


@pytest.mark.parametrize("shape", [(64, 96), (128, 3)])
def test_int4_packing_round_trip_and_error_bound(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    q, scale = int4.quantize_weight(w, 32, np.float32)
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == (shape[0] // 32, shape[1])
    tensor = int4.int4_tensor("w", q)
    assert tensor.data_type == TensorProto.INT4 and list(tensor.dims) == list(shape)
    assert len(tensor.raw_data) == (q.size + 1) // 2
    np.testing.assert_array_equal(_unpack_int4(tensor.raw_data, q.size).reshape(shape), q)
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8), q)  # onnx's own reader agrees
    error = np.abs(int4.dequantize(q, scale, 32) - w).reshape(shape[0] // 32, 32, shape[1])
    assert np.all(error <= scale[:, None, :] / 2 * (1 + 1e-6))


def test_keep_names_match_last_component_or_dotted_suffix():
    def lin(short):
        return Linear(None, "", short, "", "", "", 0, 0)

    assert is_kept(lin("lm_head"), ("embed_tokens", "lm_head"))
    assert is_kept(lin("layers.0.mlp.down_proj"), ("down_proj",))
    assert is_kept(lin("layers.0.mlp.down_proj"), ("layers.0.mlp.down_proj",))
    assert not is_kept(lin("layers.10.mlp.down_proj"), ("0.mlp.down_proj",))
    assert not is_kept(lin("layers.0.self_attn.q_proj"), ("lm_head",))


@pytest.fixture(scope="module")
def quantized(tiny_artifacts, tmp_path_factory):
    """RTN and AWQ of the tiny FP32 export, written to other directories (the source is untouched)."""
    from mvlm_compile.verify.accuracy import evaluate_artifacts

    root = tmp_path_factory.mktemp("quantized")
    settings = {m: resolve_settings(load_manifest(tiny_artifacts), method=m) for m in ("rtn", "awq")}
    reports = {m: quantize_artifacts(tiny_artifacts, s, out=root / m) for m, s in settings.items()}
    # Accuracy is measured after quantizing, against the unquantized source (the reference).
    return {m: (r, evaluate_artifacts(r.artifacts, GOLDEN_TINY, reference=tiny_artifacts)) for m, r in reports.items()}


def test_int4_graph_form_for_tensorrt(quantized):
    report, _ = quantized["awq"]
    model = onnx.load(str(load_manifest(report.artifacts).graph_path(report.artifacts, "decoder")))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10 and {o.domain: o.version for o in model.opset_import}[""] == 21
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized_matmuls, float_matmuls = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        if node.input[1] in inits:
            float_matmuls.append(node.name)
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue  # attention MatMuls
        assert len(dq.input) == 2  # no zero point
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        attrs = {a.name: a.i for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        assert weight.data_type == TensorProto.INT4 and len(weight.dims) == 2
        assert scale.data_type == TensorProto.FLOAT  # FP32 graph: FP32 scales
        assert list(scale.dims) == [weight.dims[0] // 32, weight.dims[1]]
        quantized_matmuls.append(node.name)
    assert len(quantized_matmuls) == 2 * 7  # q k v o gate up down per layer
    assert float_matmuls == ["/language_model/lm_head/MatMul"]  # kept by the tiny recipe
    manifest = load_manifest(report.artifacts)
    assert manifest.graphs["decoder"]["dtype"] == "int4"
    assert {manifest.graphs[g]["dtype"] for g in ("vision", "projector")} == {"fp16"}
    stage = manifest.stages["quantize"]
    assert stage["method"] == "awq" and stage["group_size"] == 32 and "lm_head" in stage["keep_fp16"]
    assert stage["calibration"]["tokens"] > 1000 and stage["report"]["sizes"]["int4_vs_fp16"] < 0.5
    assert not (Path(report.artifacts) / "decoder.onnx.data").exists()


def test_int4_decoder_accuracy_on_tiny_and_awq_beats_rtn(quantized):
    # Measured (tiny, group 32, teacher-forced 256 positions): RTN top-1 0.758, KL 0.120,
    # cosine 0.9888; AWQ (scales + clip) top-1 0.777, KL 0.0735, cosine 0.9933.
    from mvlm_compile.verify.accuracy import accuracy_table

    metrics = {m: accuracy["decoder"]["teacher_forced"] for m, (_, accuracy) in quantized.items()}
    for m in metrics.values():
        assert m["positions"] == 224 + 32
        assert m["logits_cosine"] >= 0.985 and m["top1_agreement"] >= 0.70 and m["kl_mean"] <= 0.15
    assert metrics["awq"]["kl_mean"] <= 0.8 * metrics["rtn"]["kl_mean"]
    assert metrics["awq"]["logits_cosine"] > metrics["rtn"]["logits_cosine"]
    assert metrics["awq"]["top1_agreement"] >= metrics["rtn"]["top1_agreement"]
    # Every AWQ group does at least as well as RTN on the calibration loss (alpha = 0 is RTN).
    for record in quantized["awq"][0].linears:
        if record["quantized"]:
            assert record["loss_awq"] <= record["loss_rtn"]
    assert "teacher_forced" in accuracy_table(quantized["awq"][1])


def test_fp16_vision_and_projector_pass_the_fp16_tolerance(quantized):
    backend = OrtBackend(quantized["rtn"][0].artifacts)
    checks = check_components(backend, GOLDEN_TINY, components=("vision", "projector"))
    assert len(checks) == 2
    for check in checks:
        assert check.tolerance == TOLERANCES["fp16"] and check.passed, (check.component, check.metrics)
        assert check.metrics["rel_to_scale"] < 2e-3  # measured 1.0e-3 (vision), 6.4e-4 (projector)
    for graph in ("vision", "projector"):
        types = {i.type for i in backend._session(graph).get_inputs()}
        assert types == {"tensor(float16)"}


def test_quantizing_twice_is_refused(tiny_artifacts, tmp_path):
    work = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, work)
    rtn = QuantizeSettings.resolve(None, method="rtn", group_size=32)
    first = quantize_artifacts(work, rtn)  # in place
    assert first.graphs["decoder"]["dtype"] == "int4"
    before = (work / "decoder.onnx").read_bytes()
    with pytest.raises(AlreadyQuantizedError, match="already INT4") as info:
        quantize_artifacts(work, QuantizeSettings.resolve(None, method="awq", group_size=32))
    assert isinstance(info.value, ArtifactError) and info.value.exit_code == 2
    with pytest.raises(AlreadyQuantizedError):
        quantize_artifacts(work, rtn, out=tmp_path / "again")
    assert (work / "decoder.onnx").read_bytes() == before and not (tmp_path / "again").exists()
    # The graph itself is checked too, not only the manifest's word.
    manifest = load_manifest(work)
    manifest.graphs["decoder"]["dtype"] = "fp32"
    manifest.save(work)
    with pytest.raises(AlreadyQuantizedError):
        quantize_artifacts(work, rtn)


def test_fp16_decoder_gets_fp16_scales(tiny_checkpoint, tmp_path):
    from mvlm_compile.export.exporter import export_artifacts

    export_artifacts(tiny_checkpoint, tmp_path / "fp16", dtype="fp16")
    settings = resolve_settings(load_manifest(tmp_path / "fp16"), method="rtn", keep_fp16=("embed_tokens",))
    report = quantize_artifacts(tmp_path / "fp16", settings)
    assert report.graphs["vision"]["action"] == "unchanged"
    model = onnx.load(str(tmp_path / "fp16" / "decoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(scales) == 2 * 7 + 1 and {s.data_type for s in scales} == {TensorProto.FLOAT16}
    backend = OrtBackend(tmp_path / "fp16")
    checks = check_components(backend, GOLDEN_TINY, components=("vision",))
    assert all(c.passed for c in checks)
    from mvlm_compile.runtime.pipeline import Pipeline

    logits = Pipeline(backend).prefill(np.zeros((1, 3, 64), np.float32))
    assert np.isfinite(logits).all()


def test_fp16_conversion_leaves_custom_domain_ops_alone():
    """A projector after surgery holds MvlmPEG (ai.onnx.contrib): op type, domain and attributes
    stay, its weight/bias initializers become FP16 like x."""
    c = 4
    peg = helper.make_node(
        "MvlmPEG",
        ["x", "peg.weight", "peg.bias"],
        ["y"],
        name="/peg/MvlmPEG",
        domain="ai.onnx.contrib",
        plugin_version="1",
        plugin_namespace="mvlm_compile",
    )
    ln = helper.make_node("LayerNormalization", ["y", "ln.scale", "ln.bias"], ["z"], name="/ln", axis=1)
    graph = helper.make_graph(
        [peg, ln],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 3, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, 3, 3])],
        [
            numpy_helper.from_array(np.ones((c, 1, 3, 3), np.float32), "peg.weight"),
            numpy_helper.from_array(np.full(c, 1e6, np.float32), "peg.bias"),
            numpy_helper.from_array(np.ones(c * 9, np.float32).reshape(c, 3, 3), "ln.scale"),
            numpy_helper.from_array(np.zeros((c, 3, 3), np.float32), "ln.bias"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.contrib", 1)]
    )
    for keep in ((), ("LayerNormalization",)):
        out = convert_to_fp16(model, keep)
        node = next(n for n in out.graph.node if n.op_type == "MvlmPEG")
        assert node.domain == "ai.onnx.contrib" and list(node.input) == ["x", "peg.weight", "peg.bias"]
        assert {a.name: a.s for a in node.attribute} == {"plugin_version": b"1", "plugin_namespace": b"mvlm_compile"}
        inits = {t.name: t for t in out.graph.initializer}
        assert inits["peg.weight"].data_type == TensorProto.FLOAT16
        assert numpy_helper.to_array(inits["peg.bias"]).max() == np.float16(65504)  # clipped, not inf
        assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        expected_ln_scale = TensorProto.FLOAT if keep else TensorProto.FLOAT16
        assert inits["ln.scale"].data_type == expected_ln_scale
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # input model untouched


def test_calibration_images_from_a_directory(tiny_artifacts, tmp_path):
    from mvlm_compile.errors import MvlmError
    from mvlm_compile.model.preprocess import golden_image
    from mvlm_compile.model.prompt import build_prompt
    from mvlm_compile.quantize.calibration import CalibrationSpec, calibration_sequences

    manifest = load_manifest(tiny_artifacts)
    with pytest.raises(MvlmError, match="no image files"):
        calibration_sequences(tiny_artifacts, manifest, CalibrationSpec(images=tmp_path))
    golden_image().rotate(180).save(tmp_path / "one.png")
    embeds, described = calibration_sequences(tiny_artifacts, manifest, CalibrationSpec(images=tmp_path, max_samples=2))
    assert len(embeds) == 2 and [d["image"] for d in described] == ["one.png", "one.png"]
    assert all(e.shape[0] == 1 and e.shape[2] == 64 and e.shape[1] > 144 for e in embeds)
    # The golden prompt (evaluation data) is never a calibration prompt.
    from mvlm_compile.quantize.calibration import CALIBRATION_TEXTS
    from mvlm_compile.verify.golden_io import load_generation

    assert all(build_prompt(q) != load_generation(GOLDEN_TINY)["prompt"] for q, _ in CALIBRATION_TEXTS)


def test_int8_lm_head_is_per_output_channel_and_close_to_the_float_one(quantized, tiny_artifacts, tmp_path):
    """--lm-head int8: DequantizeLinear(int8 [K, N], scale [N], axis=1) -> MatMul; every weight within
    half a step of the exported one; logits close to the float lm_head's (same INT4 decoder, RTN)."""
    from mvlm_compile.verify.golden_io import load_component

    settings = resolve_settings(load_manifest(tiny_artifacts), method="rtn", lm_head="int8")
    out = quantize_artifacts(tiny_artifacts, settings, out=tmp_path / "int8-head").artifacts
    model = onnx.load(str(load_manifest(out).graph_path(out, "decoder")))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    head = next(n for n in model.graph.node if n.name == "/language_model/lm_head/MatMul")
    dq = producers[head.input[1]]
    assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute} == {"axis": 1}
    codes, scale = inits[dq.input[0]], inits[dq.input[1]]
    exported = onnx.load(str(load_manifest(tiny_artifacts).graph_path(tiny_artifacts, "decoder")))
    head_weight = next(n for n in exported.graph.node if n.name == "/language_model/lm_head/MatMul").input[1]
    w = numpy_helper.to_array(next(t for t in exported.graph.initializer if t.name == head_weight))
    assert codes.dtype == np.int8 and codes.shape == w.shape and scale.shape == (w.shape[1],)
    assert np.abs(codes).max() == 127  # the largest weight of a column maps to +-127
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.all(np.abs(codes * scale[None, :] - w) <= scale[None, :] / 2 * (1 + 1e-5))
    assert load_manifest(out).stages["quantize"]["lm_head"] == "int8"

    feed, _ = load_component(GOLDEN_TINY, "decoder_prefill")
    with OrtBackend(quantized["rtn"][0].artifacts) as float_head, OrtBackend(out) as int8_head:
        expected, got = float_head.run("decoder", feed)["logits"], int8_head.run("decoder", feed)["logits"]
    cosine = (expected * got).sum(-1) / np.linalg.norm(expected, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cosine.min() > 0.9999
    # Measured 0.973 of 224 positions: random weights have small top-1 margins (1.7B: 0.991).
    assert (expected.argmax(-1) == got.argmax(-1)).mean() >= 0.95


def test_int8_lm_head_needs_lm_head_kept_out_of_int4():
    with pytest.raises(MvlmError, match="--lm-head int8"):
        QuantizeSettings(keep_fp16=(), lm_head="int8")
    with pytest.raises(MvlmError, match="--lm-head"):
        QuantizeSettings(lm_head="int4")
