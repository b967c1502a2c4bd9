"""verify / run / bench through the CLI on the tiny model's FP32 export (ONNX Runtime)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
from click.testing import CliRunner
from conftest import GOLDEN_TINY, save_graph_by_hand

from mvlm_compile.cli import cli
from mvlm_compile.manifest import keep_reference, load_manifest


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_verify_passes_and_writes_json_and_junit(tiny_artifacts, tmp_path):
    report = tmp_path / "report.json"
    result = _invoke("verify", tiny_artifacts, "--golden", GOLDEN_TINY, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["passed"] and data["greedy"]["prefix"] == 32 and data["greedy"]["required_prefix"] == 32
    assert all(c["rel_to_scale"] <= 1e-4 for c in data["components"])
    suite = ET.parse(report.with_suffix(".xml")).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 13


def test_verify_names_the_first_diverging_node(tiny_artifacts, tmp_path):
    broken = shutil.copytree(tiny_artifacts, tmp_path / "broken")
    keep_reference(broken)
    # Perturb the down projection of decoder layer 1: everything before it still matches.
    path = load_manifest(broken).graph_path(broken, "decoder")
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == "/language_model/model/layers.1/mlp/down_proj/MatMul")
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    values = onnx.numpy_helper.to_array(weight).copy()
    values[:5] *= 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    save_graph_by_hand(model, broken, "decoder")

    report = tmp_path / "r.json"
    result = _invoke("verify", broken, "--golden", GOLDEN_TINY, "--report", report)
    assert result.exit_code == 1
    assert (
        "decoder_prefill: first diverging node /language_model/model/layers.1/mlp/down_proj/MatMul (MatMul)"
        in result.output
    )
    data = json.loads(report.read_text())
    assert not data["passed"]
    assert {c["component"] for c in data["components"] if not c["passed"]} == {"decoder_prefill", "decoder_decode"}


def test_verify_missing_golden_is_an_input_error(tiny_artifacts, tmp_path):
    result = CliRunner().invoke(cli, ["verify", str(tiny_artifacts), "--golden", str(tmp_path)])
    assert result.exit_code == 2
    assert "generation.json: missing (golden greedy generation)" in result.output  # checked before any graph runs
    golden = shutil.copytree(GOLDEN_TINY, tmp_path / "golden", ignore=shutil.ignore_patterns("vision.*"))
    result = CliRunner().invoke(cli, ["verify", str(tiny_artifacts), "--golden", str(golden)])
    assert result.exit_code == 2
    assert "missing golden file for component 'vision'" in result.output


def test_run_streams_the_same_text_it_returns(tiny_artifacts, tmp_path):
    from mvlm_compile.model.preprocess import golden_image

    golden_image().save(tmp_path / "image.png")
    args = (
        "run",
        tiny_artifacts,
        "--image",
        tmp_path / "image.png",
        "--prompt",
        "What is in the image?",
        "--max-new-tokens",
        12,
    )
    whole = _invoke(*args)
    streamed = _invoke(*args, "--stream")
    assert whole.exit_code == streamed.exit_code == 0
    assert whole.output.rstrip("\n") == streamed.output.rstrip("\n") != ""


def test_run_refuses_a_prompt_longer_than_the_context(tiny_artifacts, tmp_path):
    from mvlm_compile.model.preprocess import golden_image

    golden_image().save(tmp_path / "image.png")
    result = CliRunner().invoke(
        cli, ["run", str(tiny_artifacts), "--image", str(tmp_path / "image.png"), "--prompt", "word " * 400]
    )
    assert result.exit_code == 2
    assert "exceed the context of 512" in result.output


def test_sampling_is_reproducible_and_differs_from_greedy(tiny_artifacts):
    from mvlm_compile import Session
    from mvlm_compile.model.preprocess import golden_image

    with Session(tiny_artifacts) as session:
        image = golden_image()
        sampled = [
            session.generate(image, "Describe it.", 16, temperature=1.0, top_p=0.95, seed=3).text for _ in range(2)
        ]
        assert sampled[0] == sampled[1]
        assert sampled[0] != session.generate(image, "Describe it.", 16).text


def test_bench_reports_every_stage(tiny_artifacts, tmp_path):
    out = tmp_path / "bench.json"
    result = _invoke(
        "bench",
        tiny_artifacts,
        "--repeats",
        1,
        "--warmup",
        0,
        "--decode-steps",
        2,
        "--prompt-tokens",
        160,
        "--report",
        out,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())["ort"]
    assert set(data) >= {"vision", "projector", "prefill", "decode", "peak_rss_gib"}
    assert data["decode"]["steps"] == 2 and np.isfinite(data["decode"]["tokens_per_s"])


def test_int8_activations_take_effect_and_stay_close_to_fp32():
    """run and bench default to int8 activations in INT4 MatMulNBits (speed), verify keeps fp32:
    the setting reaches the session, changes the INT4 decoder's logits a little, not the answer."""
    import numpy as np
    from conftest import TINY_BUNDLE

    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.runtime.pipeline import Pipeline
    from mvlm_compile.verify.metrics import compare

    artifacts = TINY_BUNDLE / "artifacts"
    logits = {}
    for activations, level in (("fp32", "0"), ("int8", "4")):
        with OrtBackend(artifacts, int4_activations=activations) as backend:
            pipeline = Pipeline(backend)
            rng = np.random.default_rng(0)
            embeds = (rng.standard_normal((1, 8, int(backend.manifest.model["hidden_size"]))) * 0.5).astype(np.float32)
            logits[activations] = pipeline.prefill(embeds)
            options = backend._session("decoder").get_session_options()
            assert options.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == level
    metrics = compare(logits["int8"], logits["fp32"])
    assert metrics["max_abs"] > 0  # the int8 path really ran
    assert metrics["cosine"] > 0.99 and logits["int8"].argmax() == logits["fp32"].argmax()
