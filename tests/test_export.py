"""Exported graphs, run in ONNX Runtime on CPU, against the golden tensors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import GOLDEN_TINY

from mvlm_compile import contract
from mvlm_compile.errors import CheckpointError
from mvlm_compile.export import exporter
from mvlm_compile.export.exporter import export_artifacts
from mvlm_compile.manifest import load_manifest
from mvlm_compile.runtime.ort_backend import OrtBackend
from mvlm_compile.runtime.pipeline import Pipeline
from mvlm_compile.verify.components import check_components
from mvlm_compile.verify.golden_io import load_component, load_generation


def _assert_all_pass(checks, limit):
    assert len(checks) == 2 + 2 * (1 + 2 * 2)  # vision, projector, 2 x (logits + 2 layers x k/v)
    for check in checks:
        assert check.metrics["rel_to_scale"] <= limit, (check.component, check.output, check.metrics)
        assert check.passed


def test_fp32_graphs_match_golden_within_1e_4_of_scale(tiny_artifacts):
    _assert_all_pass(check_components(OrtBackend(tiny_artifacts), GOLDEN_TINY), 1e-4)


def test_fp16_graphs_match_golden_within_documented_tolerance(tiny_checkpoint, tmp_path):
    out = export_artifacts(tiny_checkpoint, tmp_path / "fp16", dtype="fp16")
    assert {g["dtype"] for g in out.graphs.values()} == {"fp16"}
    _assert_all_pass(check_components(OrtBackend(tmp_path / "fp16"), GOLDEN_TINY), 3e-2)


def test_greedy_generation_through_the_graphs_reproduces_golden_tokens(tiny_artifacts):
    pipeline = Pipeline(OrtBackend(tiny_artifacts))
    feed, _ = load_component(GOLDEN_TINY, "vision")
    generation = load_generation(GOLDEN_TINY)
    embeds = pipeline.splice(generation["input_ids"], pipeline.image_embeds(feed[contract.VISION_INPUT]))
    prefill_feed, _ = load_component(GOLDEN_TINY, "decoder_prefill")
    np.testing.assert_allclose(embeds, prefill_feed[contract.DECODER_EMBEDS], atol=1e-5)
    assert pipeline.greedy(embeds, 32) == generation["generated_ids"]


def test_vision_graph_stops_at_the_selected_layer(tiny_artifacts):
    model = onnx.load(str(tiny_artifacts / "vision.onnx"))
    names = " ".join([i.name for i in model.graph.initializer] + [n.name for n in model.graph.node])
    # tiny tower: 2 layers, select -2 -> only layer 0 runs; no post-layernorm.
    assert "layers.0." in names
    assert "layers.1." not in names and "post_layernorm" not in names
    assert model.opset_import[0].version == 21 and model.ir_version == 10


def test_dynamic_batch_and_separate_vision_layout(tiny_separate, tiny_artifacts, tmp_path):
    checkpoint, clip_dir = tiny_separate
    export_artifacts(checkpoint, tmp_path / "separate", vision_tower=clip_dir)
    feed, expected = load_component(GOLDEN_TINY, "vision")
    pixels = np.concatenate([feed[contract.VISION_INPUT], feed[contract.VISION_INPUT][:, :, ::-1]])
    for artifacts in (tiny_artifacts, tmp_path / "separate"):
        out = OrtBackend(artifacts).run("vision", {contract.VISION_INPUT: pixels})[contract.VISION_OUTPUT]
        assert out.shape == (2, 576, 64)
        np.testing.assert_allclose(out[:1], expected[contract.VISION_OUTPUT], atol=1e-4)
        assert not np.allclose(out[0], out[1])


def test_manifest_records_graphs_io_and_hashes(tiny_artifacts):
    manifest = load_manifest(tiny_artifacts)
    decoder = manifest.graphs["decoder"]
    assert [i["name"] for i in decoder["inputs"]] == contract.decoder_input_names(2)
    assert decoder["inputs"][3]["shape"] == ["past", "slots", 4, 16]  # row b reads slot b
    assert decoder["outputs"][1]["shape"] == ["seq", "batch", 4, 16]
    assert [o["name"] for o in decoder["outputs"]] == contract.decoder_output_names(2)
    assert manifest.model["num_layers"] == 2 and manifest.model["recipe"] == "tiny"
    assert manifest.stages["export"]["opset"] == 21


def test_not_a_mobilevlm_checkpoint(tiny_checkpoint, tmp_path):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "llama")
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected 'mobilevlm'"):
        export_artifacts(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_no_output(tiny_checkpoint, tmp_path, monkeypatch):
    real_export = exporter._export

    def interrupted(module, args, path, *rest):
        if path.name == "decoder.onnx":
            raise KeyboardInterrupt
        real_export(module, args, path, *rest)

    monkeypatch.setattr(exporter, "_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_artifacts(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_polygraphy_run_compares_a_graph_with_golden_as_is(tiny_artifacts):
    """The golden files are Polygraphy's own format: its CLI loads and compares them unchanged."""
    import subprocess
    import sys
    from pathlib import Path

    polygraphy = Path(sys.executable).with_name("polygraphy")
    done = subprocess.run(
        [
            str(polygraphy),
            "run",
            str(tiny_artifacts / "projector.onnx"),
            "--onnxrt",
            "--load-inputs",
            str(GOLDEN_TINY / "projector.inputs.json"),
            "--load-outputs",
            str(GOLDEN_TINY / "projector.outputs.json"),
            "--atol",
            "1e-5",
            "--rtol",
            "1e-4",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout + done.stderr
