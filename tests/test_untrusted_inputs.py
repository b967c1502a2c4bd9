"""A bundle, checkpoint, golden set or image from elsewhere is untrusted input: no
resource bomb from a small file, no silently wrong answer, and a clear one-line error with exit
status 2 where a number in a file asks for the impossible. Each test fails on code without the
check it names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import GOLDEN_SHAPES, GOLDEN_TINY, REPO, TINY_BUNDLE

from mvlm_compile.cli import cli
from mvlm_compile.errors import EXIT_INPUT_ERROR, MvlmError


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A copy of the committed tiny bundle: readers take a lock file in it."""
    return shutil.copytree(TINY_BUNDLE, tmp_path_factory.mktemp("untrusted") / "bundle")


def _assert_one_line_input_error(result, *needles: str) -> None:
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, result.output)


# --threads is bounded ------------------------------------------------------------------------------


def test_threads_beyond_four_per_core_are_refused_by_every_command(bundle):
    from mvlm_compile.runtime.ort_backend import usable_cores

    image = GOLDEN_TINY / "image.png"
    limit = 4 * usable_cores()
    for threads in (limit + 1, 3_000_000_000):  # one past the bound; what gave exit 4 (ONNX Runtime's int)
        for args in (
            ("verify", bundle, "--golden", GOLDEN_TINY),
            ("eval", bundle, "--golden", GOLDEN_SHAPES, "--items", "1"),
            ("run", bundle, "--image", image, "--prompt", "What is it?", "--max-new-tokens", "1"),
            ("bench", bundle, "--repeats", "1", "--warmup", "0", "--decode-steps", "1", "--prompt-tokens", "150"),
        ):
            result = _cli(*args, "--threads", threads)
            _assert_one_line_input_error(result, f"--threads {threads}", f"to {limit}")
    assert (
        _cli("run", bundle, "--image", image, "--prompt", "Hi?", "--max-new-tokens", "1", "--threads", limit).exit_code
        == 0
    )


def test_bench_repeats_are_bounded(bundle):
    """An unbounded --repeats (the fuzz test once drew 99999...) ran for ever: refused before anything loads."""
    for repeats in (1001, 10**12):
        result = _cli("bench", bundle, "--repeats", repeats, "--warmup", "0", "--decode-steps", "1")
        assert result.exit_code == EXIT_INPUT_ERROR and "--repeats" in result.output, result.output
        assert "1<=x<=1000" in result.output


def test_the_python_api_bounds_threads_too():
    from mvlm_compile.manifest import load_manifest
    from mvlm_compile.runtime.ort_backend import OrtBackend, ort_session, usable_cores

    artifacts = TINY_BUNDLE / "artifacts"
    too_many = 4 * usable_cores() + 1
    with pytest.raises(MvlmError, match=f"--threads {too_many}"):
        OrtBackend(artifacts, threads=too_many)
    with pytest.raises(MvlmError, match="--threads -1"):
        OrtBackend(artifacts, threads=-1)
    with pytest.raises(MvlmError, match=f"--threads {too_many}"):
        ort_session(load_manifest(artifacts).graph_path(artifacts, "projector"), threads=too_many)


def test_the_benchmarks_bound_threads_too(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import int4_kernel_bench
    import llama_cpp_bench
    import lm_head_study

    from mvlm_compile.runtime.ort_backend import usable_cores

    too_many = str(4 * usable_cores() + 1)
    report = ["--report", str(tmp_path / "r.json")]
    assert int4_kernel_bench.main(["--recipe", "tiny", "--blocks", "16", "--threads", too_many, *report]) == 2
    assert lm_head_study.main(["--checkpoint", str(tmp_path), "--threads", too_many, *report]) == 2
    bench = ["--checkpoint", str(tmp_path), "--artifacts", str(TINY_BUNDLE), "--workdir", str(tmp_path)]
    assert llama_cpp_bench.main([*bench, "--threads", too_many, *report]) == 2
    assert capsys.readouterr().err.count(f"error: --threads {too_many}: expected 0") == 3
    assert not (tmp_path / "r.json").exists()


# Every error is one line ---------------------------------------------------------------------------


def _assert_error_is_the_last_and_only_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), result.output
    assert sum(line.startswith("error:") for line in lines) == 1, result.output
    return lines[-1]


def test_a_yaml_parse_error_is_one_line_with_its_position(tmp_path):
    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "bundle")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\narchitecture:\n  vision: {hidden_size: 64\n  decoder: [\n")
    result = _cli("build", bundle, "--target", "orin-nx-16gb", "--recipe", recipe)
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    line = _assert_error_is_the_last_and_only_error_line(result)
    assert f"{recipe}: not valid YAML at line " in line


def test_a_library_message_over_several_lines_is_shown_on_one(tiny_artifacts, monkeypatch):
    from mvlm_compile.runtime import kv_cache

    def broken(*args, **kwargs):
        raise RuntimeError("first line\n  second line\n\nthird")

    monkeypatch.setattr(kv_cache.DecoderLoop, "step", broken)  # raised on the scheduler's thread
    result = _cli("run", tiny_artifacts, "--image", GOLDEN_TINY / "image.png", "--prompt", "What?")
    line = _assert_error_is_the_last_and_only_error_line(result)
    assert "RuntimeError: first line second line third (at" in line


def test_mvlm_error_show_collapses_whitespace(capsys):
    MvlmError("a.onnx: cannot load\n  Invoked with:\tthis\n").show()
    assert capsys.readouterr().err == "error: a.onnx: cannot load Invoked with: this\n"


# Golden sets: another model's, too long, or not a file --------------------------------------------


def _mvlm_compile(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed command in a subprocess, so that a hang fails the test instead of stalling it."""
    command = [sys.executable, "-c", "from mvlm_compile.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_a_golden_generation_longer_than_the_context_is_a_usage_error(bundle, tmp_path):
    golden = shutil.copytree(GOLDEN_TINY, tmp_path / "golden")
    generation = json.loads((golden / "generation.json").read_text())
    prompt_tokens = len(generation["input_ids"]) - 1 + 144
    generation["generated_ids"] = [5] * (512 - prompt_tokens + 1)  # one past the tiny model's context of 512
    (golden / "generation.json").write_text(json.dumps(generation))
    result = _cli("verify", bundle, "--golden", golden)
    _assert_one_line_input_error(
        result, "generation.json: input_ids", f"+ generated_ids {512 - prompt_tokens + 1} exceed the context of 512"
    )


def test_golden_token_ids_outside_the_vocabulary_are_a_usage_error(bundle, tmp_path):
    golden = shutil.copytree(GOLDEN_TINY, tmp_path / "golden")
    generation = json.loads((golden / "generation.json").read_text())
    generation["generated_ids"][3] = 512  # the tiny model's vocabulary is 0..511
    (golden / "generation.json").write_text(json.dumps(generation))
    _assert_one_line_input_error(
        _cli("verify", bundle, "--golden", golden), "generated_ids holds 512, outside this model's vocabulary"
    )


def test_another_models_golden_set_is_a_usage_error(bundle, tmp_path):
    # The shapes model's golden tensors (vision width 128, decoder 256) against the tiny bundle (64, 64).
    _assert_one_line_input_error(
        _cli("verify", bundle, "--golden", GOLDEN_SHAPES, "--task-items", "0"),
        "image_features is [1, 576, 128], graph vision gives [1, 576, 64]",
        "another model",
    )
    golden = shutil.copytree(GOLDEN_SHAPES, tmp_path / "golden")
    (golden / "vision.outputs.json").unlink()  # the first mismatch left: the decoder's feed
    shutil.copy(GOLDEN_TINY / "vision.outputs.json", golden / "vision.outputs.json")
    shutil.copy(GOLDEN_TINY / "projector.inputs.json", golden / "projector.inputs.json")
    shutil.copy(GOLDEN_TINY / "projector.outputs.json", golden / "projector.outputs.json")
    _assert_one_line_input_error(
        _cli("verify", bundle, "--golden", golden, "--task-items", "0"),
        "decoder_prefill.inputs.json: inputs_embeds is [1, ",
        "graph decoder takes [batch, seq, 64]",
    )


@pytest.mark.parametrize("name", ["generation.json", "vision.inputs.json", "decoder_decode.outputs.json"])
def test_a_fifo_in_a_golden_set_is_refused_not_waited_on(bundle, tmp_path, name):
    golden = shutil.copytree(GOLDEN_TINY, tmp_path / "golden")
    (golden / name).unlink()
    os.mkfifo(golden / name)
    result = _mvlm_compile("verify", bundle, "--golden", golden)
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {golden / name}: unreadable (not a regular file)")


def test_a_fifo_as_the_task_file_is_refused_by_eval(bundle, tmp_path):
    golden = shutil.copytree(GOLDEN_SHAPES, tmp_path / "golden")
    (golden / "task.json").unlink()
    os.mkfifo(golden / "task.json")
    result = _mvlm_compile("eval", bundle, "--golden", golden, "--items", "1")
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert f"error: {golden / 'task.json'}: unreadable (not a regular file)" in result.stderr


# Images deeper than 8 bits ---------------------------------------------------------------------------


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped(tmp_path):
    from PIL import Image

    from mvlm_compile.model.preprocess import load_image, preprocess_image

    every_value = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    # The 8-bit value of each 16-bit one, v * 255 / 65535 to the nearest integer, in integer arithmetic
    # (no value falls on a tie: 65535 is odd).
    expected = Image.fromarray(((every_value.astype(np.int64) * 255 + 65535 // 2) // 65535).astype(np.uint8))
    png = tmp_path / "grey16.png"
    Image.fromarray(every_value).save(png)
    pgm = tmp_path / "grey16.pgm"  # written by hand: big-endian samples, maxval 65535
    pgm.write_bytes(b"P5 256 256 65535\n" + every_value.astype(">u2").tobytes())
    pgm10 = tmp_path / "grey10.pgm"  # maxval 1023, which Pillow rescales to 0..65535
    pgm10.write_bytes(b"P5 256 256 1023\n" + (np.arange(65536) % 1024).astype(">u2").tobytes())
    expected10 = Image.fromarray(np.rint((np.arange(65536) % 1024).reshape(256, 256) * 255 / 1023).astype(np.uint8))
    assert Image.open(png).mode == "I;16" and Image.open(pgm).mode == "I"
    want = preprocess_image(expected)
    np.testing.assert_array_equal(preprocess_image(load_image(png)), want)
    np.testing.assert_array_equal(preprocess_image(load_image(pgm)), want)
    np.testing.assert_array_equal(preprocess_image(load_image(pgm10)), preprocess_image(expected10))
    np.testing.assert_array_equal(
        preprocess_image(Image.open(png)), want
    )  # the Python API, an image not from load_image


@pytest.mark.parametrize("dtype,mode", [(np.int32, "I"), (np.float32, "F")])
def test_thirty_two_bit_samples_are_refused(bundle, tmp_path, dtype, mode):
    from PIL import Image

    from mvlm_compile.model.preprocess import preprocess_image

    samples = (np.arange(40 * 30).reshape(30, 40) * 50).astype(dtype)
    path = tmp_path / "deep.tif"
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode == mode
    result = _cli("run", bundle, "--image", path, "--prompt", "What is it?", "--max-new-tokens", "1")
    _assert_one_line_input_error(result, f"{path}: image mode {mode!r}", "no fixed intensity range")
    with pytest.raises(MvlmError, match=f"image mode {mode!r}"):
        preprocess_image(Image.fromarray(samples))


# Resource bombs in a small file ---------------------------------------------------------------------


def _edit_config(checkpoint, **changes):
    config = json.loads((checkpoint / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("vision_"):
            config["vision_config"][key.removeprefix("vision_")] = value
        else:
            config[key] = value
    (checkpoint / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "command,change,needle",
    [
        ("golden", {"num_hidden_layers": 1_000_000}, "the decoder's num_hidden_layers is 1000000"),
        ("export", {"vision_num_hidden_layers": 1_000_000}, "the vision tower's num_hidden_layers is 1000000"),
        ("golden", {"num_hidden_layers": 1}, "the decoder's num_hidden_layers is 1"),
    ],
)
def test_layer_counts_are_checked_against_the_weights_before_anything_is_built(
    tiny_checkpoint, tmp_path, command, change, needle
):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    _edit_config(checkpoint, **change)
    # A subprocess with a deadline: before the check, a million layers took minutes and gigabytes.
    result = _mvlm_compile(command, "--checkpoint", checkpoint, "--out", tmp_path / "out", timeout=90)
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {checkpoint / 'config.json'}: {needle}, but the weights hold"), line
    assert "layers: 2 (0..1)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("context", [10**12, 1e12])
def test_build_refuses_a_huge_context_before_any_work(tiny_checkpoint, tmp_path, context):
    """An integer context is refused like its float spelling, before build writes anything."""
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    _edit_config(checkpoint, max_position_embeddings=context)
    result = _cli("build", checkpoint, "--target", "rtx-sm86", "--out", tmp_path / "bundle")
    _assert_one_line_input_error(result, f"{checkpoint / 'config.json'}: max_position_embeddings is {context!r}")
    assert not (tmp_path / "bundle").exists()


def test_a_clip_directorys_layer_count_is_checked_too(tiny_separate, tmp_path):
    checkpoint, clip = tiny_separate
    clip = shutil.copytree(clip, tmp_path / "clip")
    config = json.loads((clip / "config.json").read_text())
    vision = config.get("vision_config", config)
    vision["num_hidden_layers"] = 1_000_000
    (clip / "config.json").write_text(json.dumps(config))
    result = _mvlm_compile(
        "golden", "--checkpoint", checkpoint, "--vision-tower", clip, "--out", tmp_path / "out", timeout=90
    )
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert f"error: {clip}/config.json: the vision tower's num_hidden_layers is 1000000" in result.stderr


def test_a_manifest_claiming_a_huge_context_is_refused_not_allocated(tmp_path):
    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "bundle")
    manifest = json.loads((bundle / "artifacts" / "manifest.json").read_text())
    manifest["model"]["max_context"] = 10**12  # a config's max_position_embeddings carried into the manifest
    (bundle / "artifacts" / "manifest.json").write_text(json.dumps(manifest))
    needles = ("preallocated at a context of 1000000000000 tokens", "manifest.json), needs", "of memory")
    image = GOLDEN_TINY / "image.png"
    _assert_one_line_input_error(_cli("run", bundle, "--image", image, "--prompt", "What is it?"), *needles)
    _assert_one_line_input_error(_cli("verify", bundle, "--golden", GOLDEN_TINY), *needles)


def test_the_cache_bound_is_this_machines_memory(monkeypatch):
    from mvlm_compile.engines_record import TokenLimits
    from mvlm_compile.manifest import load_manifest
    from mvlm_compile.runtime import kv_cache

    manifest = load_manifest(TINY_BUNDLE / "artifacts")
    limits = TokenLimits(512, 512, "test")
    plan = kv_cache.DecoderPlan.from_manifest(manifest, limits)
    # The tiny model at 512 tokens: K and V of 2 layers, 4 heads of 16 float16 values per token.
    assert plan.cache_bytes == 2 * 2 * 512 * 4 * 16 * 2
    monkeypatch.setattr(kv_cache, "host_memory_bytes", lambda: plan.total_bytes)
    assert kv_cache.DecoderPlan.from_manifest(manifest, limits) == plan
    monkeypatch.setattr(kv_cache, "host_memory_bytes", lambda: plan.total_bytes - 1)
    with pytest.raises(MvlmError, match="context of 512 tokens"):
        kv_cache.DecoderPlan.from_manifest(manifest, limits)


def test_only_the_calibration_images_used_are_decoded(tmp_path):
    from PIL import Image

    from mvlm_compile.quantize.calibration import CalibrationSpec, _image_samples

    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 200, 30))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    for name in ("c.png", "d.png"):  # sorted after the two used: never opened
        (tmp_path / name).write_bytes(b"not an image")
    samples = _image_samples(CalibrationSpec(images=tmp_path, max_samples=2))
    assert [name for name, *_ in samples] == ["a.png", "b.png"]
    assert np.asarray(samples[1][1])[0, 0].tolist() == [30, 200, 30]
    with pytest.raises(MvlmError, match="c.png: not an image file"):  # the third sample would use it
        _image_samples(CalibrationSpec(images=tmp_path, max_samples=3))


# The reference is the export, or nothing -----------------------------------------------------------


def test_a_bundle_without_its_reference_never_gets_one_made_from_the_rewritten_graphs(tmp_path):
    from mvlm_compile.errors import EXIT_ENGINES_DEFERRED

    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "bundle")
    shutil.rmtree(bundle / "artifacts" / "reference")  # left out when copying, as the docs allow
    result = _cli("build", bundle, "--target", "orin-nx-16gb", "--json")
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    assert not (bundle / "artifacts" / "reference").exists()
    assert _cli("optimize", bundle).exit_code == 0
    assert not (bundle / "artifacts" / "reference").exists()
    verified = _cli("verify", bundle, "--golden", GOLDEN_TINY, "--json")
    assert verified.exit_code == 0, verified.output
    assert not (bundle / "artifacts" / "reference").exists()


def test_an_export_still_gets_its_reference(tiny_artifacts, tmp_path):
    from mvlm_compile.fileio import sha256_graph
    from mvlm_compile.manifest import keep_reference, load_manifest

    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "artifacts")
    shutil.rmtree(artifacts / "reference", ignore_errors=True)
    exported = load_manifest(artifacts).graph_hashes(artifacts)
    reference = keep_reference(artifacts)
    assert reference is not None
    assert {name: sha256_graph(reference / f"{name}.onnx") for name in exported} == exported


# A recipe names a model's geometry ----------------------------------------------------------------


def test_another_models_recipe_is_refused_for_a_checkpoint_before_anything_is_written(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    result = _cli("build", tiny_checkpoint, "--target", "orin-nx-16gb", "--out", out, "--recipe", "tiny-shapes")
    _assert_one_line_input_error(
        result,
        f"--recipe tiny-shapes: does not fit the checkpoint {tiny_checkpoint}",
        "decoder.hidden_size is 64, recipe tiny-shapes expects 256",
        "vision.hidden_size is 64, recipe tiny-shapes expects 128",
    )
    assert not out.exists()


def test_another_models_recipe_is_refused_for_a_bundle(tmp_path):
    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "bundle")
    result = _cli("build", bundle, "--target", "orin-nx-16gb", "--recipe", "tiny-shapes")
    _assert_one_line_input_error(
        result,
        "--recipe tiny-shapes: does not fit",
        "manifest.json (decoder.hidden_size is 64, recipe tiny-shapes expects 256",
        "vision.hidden_size is 64, recipe tiny-shapes expects 128",
    )
    # A bundle's own recipe.yaml from elsewhere is checked the same way.
    (bundle / "recipe.yaml").write_text((REPO / "recipes" / "tiny-shapes.yaml").read_text())
    manifest = json.loads((bundle / "artifacts" / "manifest.json").read_text())
    manifest["model"]["recipe"] = None
    (bundle / "artifacts" / "manifest.json").write_text(json.dumps(manifest))
    _assert_one_line_input_error(
        _cli("build", bundle, "--target", "orin-nx-16gb"), "--recipe tiny-shapes: does not fit"
    )


def test_a_recipe_without_the_geometry_the_plan_needs_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text()
    recipe.write_text(text.replace("intermediate_size: 192, ", ""))
    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "bundle")
    result = _cli("build", bundle, "--target", "orin-nx-16gb", "--recipe", recipe)
    _assert_one_line_input_error(result, f"{recipe}: architecture.decoder lacks integer intermediate_size")
