"""Every stage on graphs whose weights live in external data (`<graph>.onnx.data`), as every
full-size model's do: the tiny model with the inline-weights limit forced to zero."""

from __future__ import annotations

import json
import os

import onnx
import pytest
from click.testing import CliRunner

from mvlm_compile.cli import cli
from mvlm_compile.errors import EXIT_ENGINES_DEFERRED
from mvlm_compile.manifest import REFERENCE_DIR, load_manifest, reference_graph_path
from mvlm_compile.onnx_io import INLINE_WEIGHTS_ENV


@pytest.fixture(scope="module")
def external_bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("external") / "bundle"
    os.environ[INLINE_WEIGHTS_ENV] = "0"
    try:
        result = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "--target", "orin-nx-16gb", "--out", str(out)])
    finally:
        del os.environ[INLINE_WEIGHTS_ENV]
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    return out


def _external_tensors(path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_build_writes_every_graph_with_external_data(external_bundle):
    artifacts = external_bundle / "artifacts"
    manifest = load_manifest(artifacts)
    for name in ("vision", "projector", "decoder"):
        path = manifest.graph_path(artifacts, name)
        assert path.with_name(path.name + ".data").stat().st_size > 0, name
        assert _external_tensors(path) > 0, name
        onnx.load(str(path))  # onnx's hard-link guard accepts the data file: it has one link
        assert os.stat(path.with_name(path.name + ".data")).st_nlink == 1


def test_the_reference_keeps_the_export_with_its_external_data(external_bundle):
    reference = external_bundle / "artifacts" / REFERENCE_DIR
    for name in ("vision", "projector", "decoder"):
        path = reference_graph_path(reference, name)
        model = onnx.load(str(path))  # weights included
        exported = load_manifest(reference).graphs[name]
        assert exported["dtype"] == "fp16"  # what export wrote, not the INT4 decoder
        assert os.stat(path).st_nlink >= 1 and model.graph.initializer
    decoder = onnx.load(str(reference / "decoder.onnx"), load_external_data=False)
    assert not any(n.op_type == "DequantizeLinear" for n in decoder.graph.node)


def test_verify_and_run_on_external_data(external_bundle, tmp_path):
    report = tmp_path / "verify.json"
    verify = CliRunner().invoke(
        cli, ["verify", str(external_bundle), "--golden", str(external_bundle / "golden"), "--report", str(report)]
    )
    assert verify.exit_code == 0, verify.output
    assert json.loads(report.read_text())["passed"]
    run = CliRunner().invoke(
        cli,
        [
            "run",
            str(external_bundle),
            "--image",
            str(external_bundle / "golden" / "image.png"),
            "--prompt",
            "What is it?",
            "--max-new-tokens",
            "4",
        ],
    )
    assert run.exit_code == 0, run.output


def test_a_rebuild_skips_every_stage(external_bundle):
    again = CliRunner().invoke(cli, ["build", str(external_bundle), "--target", "orin-nx-16gb", "--json"])
    assert again.exit_code == EXIT_ENGINES_DEFERRED, again.output
    assert set(json.loads(again.stdout)["stages"].values()) == {"skipped (unchanged)"}
