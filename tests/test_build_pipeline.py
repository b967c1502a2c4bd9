"""`build` without TensorRT: every stage up to the engines, the self-contained bundle, the
command for the target, stage skipping by content hash and the memory refusal."""

from __future__ import annotations

import importlib.metadata
import json

import onnx
import pytest
from click.testing import CliRunner
from conftest import TINY_BUNDLE, run_cli_without_torch

from mvlm_compile.cli import cli
from mvlm_compile.errors import EXIT_ENGINES_DEFERRED, EXIT_INPUT_ERROR
from mvlm_compile.manifest import load_manifest
from mvlm_compile.trt_env import import_tensorrt, query_gpu

pytestmark = pytest.mark.skipif(
    import_tensorrt()[0] is not None and query_gpu() is not None,
    reason="TensorRT and a GPU are here: engines get built (tests/test_trt_integration.py covers that path)",
)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "bundle"
    result = CliRunner().invoke(
        cli,
        ["build", str(tiny_checkpoint), "--target", "orin-nx-16gb", "--out", str(out), "--json"],
        catch_exceptions=False,
    )
    return out, result


def test_engines_are_deferred_with_status_3_and_the_target_command(bundle):
    out, result = bundle
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    summary = json.loads(result.stdout)
    assert summary["stages"] == {"golden": "ran", "export": "ran", "optimize": "ran", "quantize": "ran"}
    assert "TensorRT" in summary["deferred_reason"]
    plugin = "bundle-peg-plugin/libmvlm_peg_plugin.so"  # built beside the bundle, named explicitly
    assert summary["target_command"] == f"mvlm-compile build bundle --target orin-nx-16gb --plugin {plugin}"
    assert summary["settings"]["context"] == 512  # the tiny model's context caps the target's 2048
    note = (out / "BUILD_ON_TARGET.txt").read_text()
    assert summary["target_command"] in note
    assert "cmake -S bundle/plugins/peg -B bundle-peg-plugin" in note  # from the bundle's parent


def test_the_bundle_is_self_contained(bundle):
    out, _ = bundle
    for path in (
        "artifacts/manifest.json",
        "golden/manifest.json",
        "golden/image.png",
        "plugins/peg/CMakeLists.txt",
        "plugins/peg/peg_contract.json",
        "recipe.yaml",
        "bundle.json",
    ):
        assert (out / path).is_file(), path
    assert not (out / "plugins/peg/build").exists()
    manifest = load_manifest(out / "artifacts")
    assert {name: g["dtype"] for name, g in manifest.graphs.items()} == {
        "vision": "fp16",
        "projector": "fp16",
        "decoder": "int4",
    }
    projector = onnx.load(str(out / "artifacts" / "projector.onnx"))
    assert [n.op_type for n in projector.graph.node].count("MvlmPEG") == 1
    decoder = onnx.load(str(out / "artifacts" / "decoder.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in decoder.graph.node)
    record = json.loads((out / "bundle.json").read_text())
    assert record["memory_plan"]["total_gib"] > 0
    # The version that made the bundle, as `mvlm-compile --version` says it (the package's metadata).
    made_by = importlib.metadata.version("mvlm-compile")
    artifacts_record = json.loads((out / "artifacts" / "manifest.json").read_text())
    assert record["mvlm_compile_version"] == artifacts_record["mvlm_compile_version"] == made_by
    assert CliRunner().invoke(cli, ["--version"]).output == f"mvlm-compile, version {made_by}\n"


def test_unchanged_inputs_skip_every_stage_and_the_bundle_builds_on_its_own(bundle, tiny_checkpoint):
    out, _ = bundle
    again = CliRunner().invoke(
        cli, ["build", str(tiny_checkpoint), "--target", "orin-nx-16gb", "--out", str(out), "--json"]
    )
    assert again.exit_code == EXIT_ENGINES_DEFERRED
    assert set(json.loads(again.stdout)["stages"].values()) == {"skipped (unchanged)"}
    # The target side: only the bundle, no checkpoint, no torch needed for these stages.
    on_target = CliRunner().invoke(cli, ["build", str(out), "--target", "orin-nx-16gb", "--json"])
    assert on_target.exit_code == EXIT_ENGINES_DEFERRED
    assert json.loads(on_target.stdout)["stages"] == {
        "optimize": "skipped (unchanged)",
        "quantize": "skipped (unchanged)",
    }


def test_the_committed_tiny_bundle_is_what_the_code_makes_now(bundle):
    """tests/data/tiny-bundle (what the TensorRT tests build from, torch-free) against this build of
    the same seed-0 checkpoint: the same graphs byte for byte, references included."""
    out, _ = bundle
    for artifacts in ("artifacts", "artifacts/reference"):
        fresh, committed = load_manifest(out / artifacts), load_manifest(TINY_BUNDLE / artifacts)
        assert committed.model == fresh.model, artifacts
        assert committed.files == fresh.files, artifacts
        for name, graph in fresh.graphs.items():
            assert committed.graphs[name] == graph, f"{artifacts}/{graph['file']} is stale: run `make tiny-bundle`"
        for file in fresh.files.values():
            assert (TINY_BUNDLE / artifacts / file).read_bytes() == (out / artifacts / file).read_bytes(), file


def test_a_configuration_that_does_not_fit_is_refused_with_the_numbers(bundle):
    out, _ = bundle
    result = CliRunner().invoke(cli, ["build", str(out), "--target", "orin-nano-8gb", "--max-batch", "100000"])
    assert result.exit_code == EXIT_INPUT_ERROR
    assert "error: --target orin-nano-8gb: tiny needs" in result.output
    # 100000 slots x 2 x 2 layers x 4 heads x 16 x 2 bytes x 512 positions = 24.4 GiB
    assert "KV cache (fp16, 100000 slots at context 512, one preallocated) 24.41 GiB" in result.output


def test_bundle_or_checkpoint_is_required(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(cli, ["build", "--target", "orin-nx-16gb"])
    assert result.exit_code == 2 and "Missing argument 'SOURCE'" in result.output
    result = CliRunner().invoke(cli, ["build", str(tmp_path), "--target", "orin-nx-16gb"])
    assert result.exit_code == 2 and "neither a checkpoint (config.json) nor a bundle" in result.output
    result = CliRunner().invoke(cli, ["build", str(tiny_checkpoint), "--target", "orin-nx-16gb"])
    assert result.exit_code == 2 and "is a checkpoint: give --out BUNDLE" in result.output


def test_the_target_side_never_imports_torch_or_transformers(bundle, tmp_path):
    """build (from the bundle), verify and run as on a JetPack without torch/transformers."""
    out, _ = bundle
    commands = [
        (["build", str(out), "--target", "orin-nx-16gb"], EXIT_ENGINES_DEFERRED),
        (["verify", str(out), "--golden", str(out / "golden")], 0),
        (
            [
                "run",
                str(out),
                "--image",
                str(out / "golden" / "image.png"),
                "--prompt",
                "What is it?",
                "--max-new-tokens",
                "4",
            ],
            0,
        ),
    ]
    for args, status in commands:
        done = run_cli_without_torch(args)
        assert done.returncode == status, (args, done.stderr[-2000:])
