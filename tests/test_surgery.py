"""Graph surgery: the optimized graphs run in ONNX Runtime and match the golden tensors; the
passes do what they say, say it, and are idempotent; MACs are checked against hand counts."""

from __future__ import annotations

import json
import shutil
import sys
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from conftest import GOLDEN_TINY, save_graph_by_hand

from mvlm_compile import contract, peg_op
from mvlm_compile.errors import MvlmError
from mvlm_compile.export.exporter import export_artifacts
from mvlm_compile.fileio import sha256_graph
from mvlm_compile.manifest import load_manifest
from mvlm_compile.model.ldpv2 import LDPNetV2Projector
from mvlm_compile.peg_op import PEG_CONTRACT, peg_numpy
from mvlm_compile.runtime.ort_backend import OrtBackend, ort_session
from mvlm_compile.runtime.pipeline import Pipeline
from mvlm_compile.surgery import optimize_artifacts
from mvlm_compile.surgery.optimize import DEFAULT_DECODER_SEQ, ROW_HEADER, optimize_graph
from mvlm_compile.surgery.passes import (
    PassContext,
    PatternMissing,
    fold_constants,
    ldpv2_pool_first,
    peg_to_plugin,
    rmsnorm_check,
)
from mvlm_compile.verify.components import check_components
from mvlm_compile.verify.golden_io import load_component, load_generation

GRAPHS = ("vision", "projector", "decoder")


@pytest.fixture(scope="module")
def optimized(tiny_artifacts, tmp_path_factory):
    """A copy of the FP32 tiny artifacts, optimized once: (directory, report)."""
    out = shutil.copytree(tiny_artifacts, tmp_path_factory.mktemp("optimized") / "fp32")
    return out, optimize_artifacts(out)


def _nodes(path, op=None):
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return [n for n in nodes if op is None or n.op_type == op]


def _record(report, graph, name):
    return next(r for r in report.records if r.graph == graph and r.name == name)


def _all_pass(checks, limit):
    assert len(checks) == 2 + 2 * (1 + 2 * 2)
    for check in checks:
        assert check.metrics["rel_to_scale"] <= limit, (check.component, check.output, check.metrics)
        assert check.passed


# --- numerics after optimize --------------------------------------------------------------


def test_optimized_fp32_graphs_match_golden_within_1e_4_of_scale(optimized):
    _all_pass(check_components(OrtBackend(optimized[0]), GOLDEN_TINY), 1e-4)


def test_optimized_fp16_graphs_match_golden_within_documented_tolerance(tiny_checkpoint, tmp_path):
    export_artifacts(tiny_checkpoint, tmp_path / "fp16", dtype="fp16")
    report = optimize_artifacts(tmp_path / "fp16")
    assert _record(report, "projector", "peg_to_plugin").status == "changed"
    (peg,) = _nodes(tmp_path / "fp16" / "projector.onnx", PEG_CONTRACT["op_type"])
    weights = {t.name: t for t in onnx.load(str(tmp_path / "fp16" / "projector.onnx")).graph.initializer}
    assert {weights[name].data_type for name in peg.input[1:]} == {onnx.TensorProto.FLOAT16}
    _all_pass(check_components(OrtBackend(tmp_path / "fp16"), GOLDEN_TINY), 3e-2)


def test_greedy_generation_through_the_optimized_graphs_reproduces_golden_tokens(optimized):
    pipeline = Pipeline(OrtBackend(optimized[0]))
    feed, _ = load_component(GOLDEN_TINY, "vision")
    generation = load_generation(GOLDEN_TINY)
    embeds = pipeline.splice(generation["input_ids"], pipeline.image_embeds(feed[contract.VISION_INPUT]))
    assert pipeline.greedy(embeds, 32) == generation["generated_ids"]


# --- the PEG plugin node and its CPU reference --------------------------------------------


def test_peg_node_follows_the_op_contract(optimized):
    model = onnx.load(str(optimized[0] / "projector.onnx"))
    (peg,) = [n for n in model.graph.node if n.op_type == "MvlmPEG"]
    assert peg.domain == "ai.onnx.contrib" == PEG_CONTRACT["onnx_domain"]
    attrs = {a.name: onnx.helper.get_attribute_value(a).decode() for a in peg.attribute}
    assert attrs == {"plugin_version": "1", "plugin_namespace": "mvlm_compile"}
    assert attrs == {k: PEG_CONTRACT[k] for k in ("plugin_version", "plugin_namespace")}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    x, weight, bias = peg.input
    assert x not in weights and weights[weight].shape == (64, 1, 3, 3) and weights[bias].shape == (64,)
    assert weights[weight].dtype == weights[bias].dtype == np.float32
    assert not [n for n in model.graph.node if n.op_type == "Conv"]
    assert ("ai.onnx.contrib", 1) in {(o.domain, o.version) for o in model.opset_import}


def _peg_torch(x, weight, bias):
    x32 = torch.from_numpy(x.astype(np.float32))
    conv = torch.nn.functional.conv2d(
        x32,
        torch.from_numpy(weight.astype(np.float32)),
        torch.from_numpy(bias.astype(np.float32)),
        padding=1,
        groups=x.shape[1],
    )
    return (conv + x32).numpy()


def _single_peg_model(weight, bias, shape, elem_type):
    node = onnx.helper.make_node(
        "MvlmPEG",
        ["x", "weight", "bias"],
        ["y"],
        domain="ai.onnx.contrib",
        plugin_version="1",
        plugin_namespace="mvlm_compile",
    )
    graph = onnx.helper.make_graph(
        [node],
        "peg",
        [onnx.helper.make_tensor_value_info("x", elem_type, ["batch", *shape[1:]])],
        [onnx.helper.make_tensor_value_info("y", elem_type, ["batch", *shape[1:]])],
        [onnx.numpy_helper.from_array(weight, "weight"), onnx.numpy_helper.from_array(bias, "bias")],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("ai.onnx.contrib", 1)]
    )
    model.ir_version = 10
    return model


@pytest.mark.parametrize(
    "dtype, elem_type, atol", [(np.float32, onnx.TensorProto.FLOAT, 1e-5), (np.float16, onnx.TensorProto.FLOAT16, 1e-2)]
)
def test_peg_reference_op_in_onnx_runtime_matches_torch_depthwise_conv(tmp_path, dtype, elem_type, atol):
    rng = np.random.default_rng(0)
    shape = (2, 8, 12, 12)
    x = rng.standard_normal(shape).astype(dtype)
    weight = rng.standard_normal((8, 1, 3, 3)).astype(dtype)
    bias = rng.standard_normal(8).astype(dtype)
    expected = _peg_torch(x, weight, bias)
    np.testing.assert_allclose(peg_numpy(x, weight, bias).astype(np.float32), expected, atol=atol)
    path = tmp_path / "peg.onnx"
    onnx.save(_single_peg_model(weight, bias, shape, elem_type), str(path))
    (y,) = ort_session(path).run(None, {"x": x})
    assert y.dtype == dtype
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=atol)


def test_running_the_peg_op_without_onnxruntime_extensions_is_a_clear_error(optimized, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # makes its import fail
    monkeypatch.setattr(peg_op, "_library_path", peg_op._library_path.__wrapped__)  # uncached
    with pytest.raises(MvlmError, match="install onnxruntime-extensions to run the PEG op in ONNX Runtime"):
        ort_session(optimized[0] / "projector.onnx")
    ort_session(optimized[0] / "vision.onnx")  # graphs without the op never need it


# --- LDPv2 pool-first ----------------------------------------------------------------------


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _apply(model, *passes):
    graph = gs.import_onnx(model)
    details = [p(graph, PassContext("projector", {})) for p in passes]
    graph.cleanup().toposort()
    return gs.export_onnx(graph), details


def test_pool_first_equals_the_unrewritten_projector(tiny_artifacts):
    exported = onnx.load(str(tiny_artifacts / "projector.onnx"))
    rewritten, (detail,) = _apply(exported, ldpv2_pool_first)
    assert "576 -> 144 tokens" in detail
    graph = gs.import_onnx(rewritten)
    (pool,) = [n for n in graph.nodes if n.op == "AveragePool"]
    assert pool.i(0).i(0).i(0).op == "Gelu"  # AveragePool <- Reshape <- Transpose <- Gelu
    feed, expected = load_component(GOLDEN_TINY, "projector")
    random = {contract.PROJECTOR_INPUT: np.random.default_rng(1).standard_normal((2, 576, 64)).astype(np.float32)}
    for inputs in (feed, random):
        before, after = _run(exported, inputs), _run(rewritten, inputs)
        assert after.shape == before.shape
        np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max())
    np.testing.assert_allclose(
        _run(rewritten, feed),
        expected[contract.PROJECTOR_OUTPUT],
        atol=1e-4 * np.abs(expected[contract.PROJECTOR_OUTPUT]).max(),
    )
    again, (second,) = _apply(rewritten, ldpv2_pool_first)
    assert second.startswith("already rewritten") and len(again.graph.node) == len(rewritten.graph.node)


def test_peg_first_then_pool_first_gives_the_same_projector(tiny_artifacts, optimized, tmp_path):
    exported = onnx.load(str(tiny_artifacts / "projector.onnx"))
    reordered, details = _apply(exported, peg_to_plugin, ldpv2_pool_first)
    assert details[0].startswith("replaced 1") and "576 -> 144" in details[1]
    onnx.save(reordered, str(tmp_path / "reordered.onnx"))
    feed, _ = load_component(GOLDEN_TINY, "projector")
    (a,) = ort_session(tmp_path / "reordered.onnx").run(None, feed)
    (b,) = ort_session(optimized[0] / "projector.onnx").run(None, feed)
    np.testing.assert_allclose(a, b, atol=1e-6)


# --- missing patterns ------------------------------------------------------------------------


def _without_peg(model):
    """The projector with its PEG block (depthwise Conv + residual Add) cut out."""
    graph = gs.import_onnx(model)
    (conv,) = [n for n in graph.nodes if n.op == "Conv"]
    add = conv.o()
    for reader in list(add.outputs[0].outputs):
        reader.inputs[reader.inputs.index(add.outputs[0])] = conv.inputs[0]
    add.outputs.clear()
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def test_projector_without_peg_is_an_error_unless_allowed(tiny_artifacts, tmp_path):
    out = shutil.copytree(tiny_artifacts, tmp_path / "no_peg")
    no_peg = _without_peg(onnx.load(str(tiny_artifacts / "projector.onnx")))
    save_graph_by_hand(no_peg, out, "projector")
    with pytest.raises(
        MvlmError, match=r"projector.onnx: pass peg_to_plugin: expected a PEG block.*--allow-missing peg_to_plugin"
    ):
        optimize_artifacts(out)
    with pytest.raises(MvlmError, match="no such pass"):
        optimize_artifacts(out, allow_missing=["peg_to_plug"])
    report = optimize_artifacts(out, allow_missing=["peg_to_plugin"])
    skipped = _record(report, "projector", "peg_to_plugin")
    assert skipped.status == "skipped" and skipped.detail.startswith("not found: a PEG block")
    assert _record(report, "projector", "ldpv2_pool_first").status == "changed"
    assert not _nodes(out / "projector.onnx", "MvlmPEG")
    feed, _ = load_component(GOLDEN_TINY, "projector")
    got = OrtBackend(out).run("projector", feed)[contract.PROJECTOR_OUTPUT]
    reference = _run(no_peg, feed)
    np.testing.assert_allclose(got, reference, atol=1e-5 * np.abs(reference).max())


def test_broken_rmsnorm_is_reported(tiny_artifacts):
    graph = gs.import_onnx(onnx.load(str(tiny_artifacts / "decoder.onnx")))
    context = PassContext("decoder", {"num_layers": 2})
    fold_constants(graph, context)  # the check runs after the clean-ups: exponent, eps and 1 as initializers
    assert rmsnorm_check(graph, context) == "5 RMSNorm chains intact"
    divide = next(n for n in graph.nodes if n.op == "Div" and n.name.endswith("input_layernorm/Div"))
    divide.op, divide.inputs = "Reciprocal", divide.inputs[1:]  # same value, another pattern
    with pytest.raises(PatternMissing, match="5 RMSNorm chains .* found 4"):
        rmsnorm_check(graph, context)


# --- LayerNormalization --------------------------------------------------------------------


def _decompose_layernorms(model):
    """Write every LayerNormalization as the primitive ops older exporters emit."""
    graph = gs.import_onnx(model)
    for i, ln in enumerate([n for n in graph.nodes if n.op == "LayerNormalization"]):
        x, gamma, beta = ln.inputs
        dtype = gamma.values.dtype
        axes = gs.Constant(f"ln{i}/axes", np.array([-1], np.int64))
        t = {
            name: gs.Variable(f"ln{i}/{name}", dtype=dtype)
            for name in ("mean", "d", "sq", "var", "var_eps", "std", "n", "scaled")
        }
        y = ln.outputs[0]
        ln.outputs.clear()
        graph.nodes += [
            gs.Node("ReduceMean", inputs=[x, axes], outputs=[t["mean"]]),
            gs.Node("Sub", inputs=[x, t["mean"]], outputs=[t["d"]]),
            gs.Node("Pow", inputs=[t["d"], gs.Constant(f"ln{i}/two", np.array(2, dtype))], outputs=[t["sq"]]),
            gs.Node("ReduceMean", inputs=[t["sq"], axes], outputs=[t["var"]]),
            gs.Node(
                "Add",
                inputs=[t["var"], gs.Constant(f"ln{i}/eps", np.array(ln.attrs.get("epsilon", 1e-5), dtype))],
                outputs=[t["var_eps"]],
            ),
            gs.Node("Sqrt", inputs=[t["var_eps"]], outputs=[t["std"]]),
            gs.Node("Div", inputs=[t["d"], t["std"]], outputs=[t["n"]]),
            gs.Node("Mul", inputs=[t["n"], gamma], outputs=[t["scaled"]]),
            gs.Node("Add", inputs=[t["scaled"], beta], outputs=[y]),
        ]
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def test_decomposed_layer_norms_are_fused_back(tiny_artifacts, optimized, tmp_path):
    assert _record(optimized[1], "vision", "layernorm_fusion").detail == "already fused: 3 LayerNormalization"
    out = shutil.copytree(tiny_artifacts, tmp_path / "decomposed")
    save_graph_by_hand(_decompose_layernorms(onnx.load(str(tiny_artifacts / "vision.onnx"))), out, "vision")
    assert not _nodes(out / "vision.onnx", "LayerNormalization")
    report = optimize_artifacts(out)
    fusion = _record(report, "vision", "layernorm_fusion")
    assert fusion.status == "changed" and fusion.detail.startswith("fused 3 decomposed layer norms")
    assert len(_nodes(out / "vision.onnx", "LayerNormalization")) == 3
    assert report.totals()["vision"]["nodes"][1] == optimized[1].totals()["vision"]["nodes"][1]
    for check in check_components(OrtBackend(out), GOLDEN_TINY, components=("vision",)):
        assert check.metrics["rel_to_scale"] <= 1e-4 and check.passed


# --- reports, manifest, idempotence ----------------------------------------------------------


def test_second_optimize_changes_nothing(optimized, tmp_path):
    out = shutil.copytree(optimized[0], tmp_path / "again")
    before = {name: (out / f"{name}.onnx").read_bytes() for name in GRAPHS}
    report = optimize_artifacts(out)
    assert not report.changed
    assert {r.status for r in report.records} == {"no change"}
    for graph, total in report.totals().items():
        assert total["nodes"] == (optimized[1].totals()[graph]["nodes"][1],) * 2
        assert total["macs"] == (optimized[1].totals()[graph]["macs"][1],) * 2
    assert {name: (out / f"{name}.onnx").read_bytes() for name in GRAPHS} == before
    assert _record(report, "projector", "peg_to_plugin").detail == "already rewritten: 1 MvlmPEG node"


def test_report_rows_json_and_manifest(optimized, tiny_artifacts):
    out, report = optimized
    header, rows = ROW_HEADER, report.rows()
    assert header == ("graph", "pass", "result", "nodes", "MACs", "what")
    by_pass = {row[:2]: row[2:] for row in rows}
    assert by_pass["projector", "ldpv2_pool_first"][:3] == ("changed", "29 -> 31", "4.8M -> 3.03M")
    assert by_pass["projector", "(all)"][1:3] == ("55 -> 30", "4.8M -> 3.03M")
    assert json.loads(json.dumps(report.to_json()))["changed"] is True
    manifest, exported = load_manifest(out), load_manifest(tiny_artifacts)
    record = manifest.stages["optimize"]
    assert record["passes"]["projector"] == [
        "cleanup",
        "fold_constants",
        "remove_identity_casts",
        "ldpv2_pool_first",
        "peg_to_plugin",
        "infer_shapes",
    ]
    assert len(record["report"]) == len(report.records) and record["dims"]["seq"] == DEFAULT_DECODER_SEQ
    for name in GRAPHS:
        assert manifest.graphs[name]["sha256"] == sha256_graph(out / f"{name}.onnx") != exported.graphs[name]["sha256"]
        assert record["graphs"][name]["input_sha256"] == exported.graphs[name]["sha256"]
        assert manifest.graphs[name]["inputs"] == exported.graphs[name]["inputs"]
        assert manifest.graphs[name]["outputs"] == exported.graphs[name]["outputs"]
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        original = onnx.load(str(tiny_artifacts / f"{name}.onnx"), load_external_data=False)
        assert model.graph.input == original.graph.input and model.graph.output == original.graph.output
        assert model.ir_version == 10 and {o.domain: o.version for o in model.opset_import}[""] == 21
        assert record["graphs"][name]["nodes"][1] < record["graphs"][name]["nodes"][0]


def test_clean_ups_fold_constants_and_identity_casts_but_keep_rmsnorm(optimized, tiny_artifacts):
    out, report = optimized
    for name in GRAPHS:
        assert not _nodes(out / f"{name}.onnx", "Constant")
        assert _record(report, name, "fold_constants").nodes[1] < _record(report, name, "fold_constants").nodes[0]
    # FP32 export: the float->float casts of the RMSNorms (2 per norm: 10), of the FP32 softmax (2 per
    # layer: 4) and of RoPE's cos/sin (2), and the int/bool no-op casts left after folding (4, and 3 of
    # the past's mask: where it is made and in each layer) go
    assert (
        _record(report, "decoder", "remove_identity_casts").detail
        == "removed 23 Casts to the type their input already has"
    )
    assert _record(report, "decoder", "rmsnorm_check").detail == "5 RMSNorm chains intact"
    for op in ("Pow", "ReduceMean", "Sqrt"):
        assert len(_nodes(out / "decoder.onnx", op)) == 5
    assert not _nodes(out / "decoder.onnx", "RMSNormalization")


# --- MACs ------------------------------------------------------------------------------------


def _projector_macs(mm_hidden, hidden, tokens=576, pooled=144):
    """(naive LDPv2, pool-first): Linear 1 on all tokens; Linear 2 on all or on the pooled
    tokens; the PEG's depthwise 3x3 on the pooled grid."""
    first, peg = tokens * mm_hidden * hidden, pooled * hidden * 9
    return first + tokens * hidden * hidden + peg, first + pooled * hidden * hidden + peg


def test_macs_match_hand_counts(optimized, tiny_checkpoint):
    totals = optimized[1].totals()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    vision, h, inter, heads = (
        config["vision_config"],
        config["hidden_size"],
        config["intermediate_size"],
        config["num_attention_heads"],
    )
    assert totals["projector"]["macs"] == _projector_macs(config["mm_hidden_size"], h)
    # vision: patch conv + the one layer below mm_vision_select_layer = -2, on 577 tokens
    w, t = vision["hidden_size"], 577
    patch = 576 * w * 3 * 14 * 14
    layer = 4 * t * w * w + 2 * t * t * w + 2 * t * w * vision["intermediate_size"]
    assert totals["vision"]["macs"] == (patch + layer,) * 2
    # decoder: prefill of the golden prompt's length, empty cache, lm_head on the last position only
    s = json.loads((GOLDEN_TINY / "manifest.json").read_text())["prompt_tokens"]
    assert s == DEFAULT_DECODER_SEQ
    assert heads * (h // heads) == h and config["num_key_value_heads"] == heads
    per_layer = 4 * s * h * h + 2 * s * s * h + 3 * s * h * inter
    assert totals["decoder"]["macs"] == (config["num_hidden_layers"] * per_layer + h * config["vocab_size"],) * 2


def test_pool_first_halves_the_projector_at_1_7b_geometry(tmp_path):
    naive, pool_first = _projector_macs(1024, 2048)
    assert 0.4 < pool_first / naive < 0.6
    # Measured: a 1.7B-geometry projector (random weights) exported and run through the passes.
    path = tmp_path / "projector.onnx"
    torch.manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter notices, as in the exporter
        torch.onnx.export(
            LDPNetV2Projector(1024, 2048).eval(),
            (torch.zeros(1, 576, 1024),),
            str(path),
            dynamo=False,
            opset_version=21,
            input_names=[contract.PROJECTOR_INPUT],
            output_names=[contract.PROJECTOR_OUTPUT],
            dynamic_axes={contract.PROJECTOR_INPUT: {0: "batch"}, contract.PROJECTOR_OUTPUT: {0: "batch"}},
        )
    _, records = optimize_graph(onnx.load(str(path)), PassContext("projector", {}), {"batch": 1})
    assert (records[0].macs[0], records[-1].macs[1]) == (naive, pool_first)
    assert 0.4 < records[-1].macs[1] / records[0].macs[0] < 0.6
