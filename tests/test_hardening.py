"""Trying to break it: a new user's mistakes and an attacker's files go in, a clear one-line error
(exit 2) and an untouched file system come out. One test per case (or a few per test)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import GOLDEN_TINY

from mvlm_compile.cli import cli
from mvlm_compile.errors import (
    EXIT_ENGINES_DEFERRED,
    EXIT_INPUT_ERROR,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    ArtifactError,
)
from mvlm_compile.fileio import LOCK, MARKER, atomic_output_dir, write_json
from mvlm_compile.manifest import load_manifest


def _cli(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _assert_input_error(result, *needles: str) -> None:
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:") or line.startswith("Error:")]
    assert lines, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "bundle"
    result = _cli("build", tiny_checkpoint, "--target", "orin-nx-16gb", "--out", out)
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    return out


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    return shutil.copytree(bundle, tmp_path / "bundle", symlinks=True)


# --out never replaces what is not ours --------------------------------------------------------


def test_export_into_its_own_checkpoint_is_refused(tiny_checkpoint):
    before = _snapshot(tiny_checkpoint)
    result = _cli("export", "--checkpoint", tiny_checkpoint, "--out", tiny_checkpoint)
    _assert_input_error(result, "is the input")
    assert _snapshot(tiny_checkpoint) == before


def test_golden_into_a_parent_of_the_checkpoint_is_refused(tiny_checkpoint):
    parent = tiny_checkpoint.parent
    before = _snapshot(parent)
    result = _cli("golden", "--checkpoint", tiny_checkpoint, "--out", parent)
    _assert_input_error(result, "contains it")
    assert _snapshot(parent) == before


def test_out_that_is_not_ours_is_refused(tiny_checkpoint, tmp_path):
    work = tmp_path / "project"
    (work / "golden").mkdir(parents=True)
    (work / "golden" / "notes.txt").write_text("mine")
    (work / "plugins").mkdir()
    before = _snapshot(work)
    _assert_input_error(
        _cli("build", tiny_checkpoint, "--target", "orin-nx-16gb", "--out", work), "not an mvlm-compile bundle"
    )
    _assert_input_error(
        _cli("golden", "--checkpoint", tiny_checkpoint, "--out", work / "golden"), "not an mvlm-compile golden"
    )
    a_file = work / "golden" / "notes.txt"
    _assert_input_error(_cli("export", "--checkpoint", tiny_checkpoint, "--out", a_file), "not a directory")
    assert _snapshot(work) == before


def test_our_own_output_is_replaced_and_carries_the_marker(tiny_checkpoint, tmp_path):
    out = tmp_path / "golden"
    for _ in range(2):
        result = _cli("golden", "--checkpoint", tiny_checkpoint, "--out", out, "--json")
        assert result.exit_code == 0, result.output
    assert json.loads((out / MARKER).read_text())["kind"] == "golden"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left beside it


def test_a_deferred_build_of_a_bundle_keeps_the_plugin_build_and_local_edits(bundle_copy):
    plugin = bundle_copy / "plugins" / "peg"
    (plugin / "build").mkdir()
    (plugin / "build" / "libmvlm_peg_plugin.so").write_bytes(b"built on the target")
    (plugin / "pegKernel.cu").write_text("// a local edit\n")
    result = _cli("build", bundle_copy, "--target", "orin-nx-16gb")
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    assert (plugin / "build" / "libmvlm_peg_plugin.so").read_bytes() == b"built on the target"
    assert (plugin / "pegKernel.cu").read_text() == "// a local edit\n"


# A bundle made elsewhere never reaches outside itself ------------------------------------------


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/hostname", "sub/../../outside.onnx"])
def test_manifest_names_outside_the_directory_are_refused(bundle_copy, tmp_path, name):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"precious")
    artifacts = bundle_copy / "artifacts"
    data = json.loads((artifacts / "manifest.json").read_text())
    data["graphs"]["projector"]["file"] = name
    (artifacts / "manifest.json").write_text(json.dumps(data))
    image = bundle_copy / "golden" / "image.png"
    for args in (
        ("optimize", artifacts),
        ("quantize", artifacts, "--method", "rtn"),
        ("build", bundle_copy, "--target", "orin-nx-16gb"),
        ("verify", bundle_copy, "--golden", bundle_copy / "golden"),
        ("run", bundle_copy, "--image", image, "--prompt", "What is it?"),
    ):
        _assert_input_error(_cli(*args), "points outside")
    assert outside.read_bytes() == b"precious"


def test_a_symbolic_link_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(bundle_copy / "artifacts" / "projector.onnx", outside)
    (bundle_copy / "artifacts" / "projector.onnx").unlink()
    (bundle_copy / "artifacts" / "projector.onnx").symlink_to(outside)
    _assert_input_error(_cli("optimize", bundle_copy), "resolves outside")


def test_engines_json_names_outside_are_refused(tmp_path):
    from mvlm_compile.engines_record import read_engines_record

    engines = tmp_path / "engines-x"
    engines.mkdir()
    engine = {"file": "../../x", "sha256": ""}
    record = {"builder": {"flavour": "tensorrt"}, "plugin": {}, "engines": {"vision": engine}}
    write_json(engines / "engines.json", record)
    with pytest.raises(ArtifactError, match="points outside"):
        read_engines_record(engines)


def test_a_graph_changed_behind_the_manifest_is_refused_before_use(bundle_copy):
    decoder = bundle_copy / "artifacts" / "decoder.onnx"
    decoder.write_bytes(b"")  # a 0-byte graph
    _assert_input_error(
        _cli("verify", bundle_copy, "--golden", bundle_copy / "golden"), "content differs from manifest.json"
    )
    _assert_input_error(_cli("optimize", bundle_copy), "content differs from manifest.json")


# One writer at a time; leftovers of a killed run are removed ------------------------------------


def test_a_directory_in_use_is_refused_at_once(bundle_copy):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(bundle_copy / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = _cli("build", bundle_copy, "--target", "orin-nx-16gb")
        _assert_input_error(result, "in use by another mvlm-compile")
        assert time.monotonic() - started < 30  # refused, not waited for
    finally:
        holder.kill()
        holder.wait()


def test_staging_leftovers_of_a_killed_run_are_removed(bundle_copy):
    artifacts = bundle_copy / "artifacts"
    leftovers = [
        artifacts / ".decoder.onnx.abc123.tmp",
        artifacts / ".quantize.xyz.tmp",
        bundle_copy / ".artifacts.q1.partial",
    ]
    for path in leftovers[:2]:
        path.mkdir()
        (path / "big.data").write_bytes(b"0" * 1024)
    leftovers[2].mkdir()
    mine = artifacts / ".my-notes.txt"
    mine.write_text("not ours")
    assert _cli("optimize", bundle_copy).exit_code == 0
    assert not leftovers[0].exists() and not leftovers[1].exists()
    assert mine.exists()  # only our own staging names


def test_sigterm_removes_the_partial_output(tmp_path):
    out = tmp_path / "checkpoint"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mvlm_compile.cli import main; main()",
            "synth",
            "--preset",
            "tiny",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".checkpoint.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".checkpoint.*"))


def test_an_interrupt_inside_an_output_block_leaves_the_old_output(tmp_path):
    final = tmp_path / "golden"
    with atomic_output_dir(final, "golden") as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(final, "golden") as tmp:
        (tmp / "a").write_text("second")
        raise KeyboardInterrupt
    assert (final / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["golden"]


# Modes honour the umask ---------------------------------------------------------------------------


def test_outputs_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out", "golden") as tmp:
            write_json(tmp / "x.json", {})
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "x.json").stat().st_mode & 0o777 == 0o644


# Corrupt records ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "mvlm-compile-artifacts"}', "lacks"),
    ],
)
def test_a_corrupt_manifest_is_one_line(bundle_copy, content, needle):
    (bundle_copy / "artifacts" / "manifest.json").write_text(content)
    _assert_input_error(_cli("verify", bundle_copy, "--golden", bundle_copy / "golden"), needle)


@pytest.mark.parametrize(
    "content,needle",
    [("", "not valid JSON"), ('{"input_ids": [1, -200], "generated_ids": []}', "non-empty list"), ("{}", "lacks")],
)
def test_a_corrupt_or_empty_golden_generation_is_one_line(tiny_artifacts, tmp_path, content, needle):
    golden = shutil.copytree(GOLDEN_TINY, tmp_path / "golden")
    (golden / "generation.json").write_text(content)
    _assert_input_error(_cli("verify", tiny_artifacts, "--golden", golden), needle)


def test_a_corrupt_host_stage_record_reruns_the_stages(bundle_copy, tiny_checkpoint):
    (bundle_copy / ".host-stages.json").write_text("[")
    result = _cli("build", tiny_checkpoint, "--target", "orin-nx-16gb", "--out", bundle_copy, "--json")
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    assert json.loads(result.stdout)["stages"]["export"] == "ran"


# Options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,needle",
    [
        (("--max-new-tokens", "-3"), "--max-new-tokens -3"),
        (("--max-new-tokens", "0"), "--max-new-tokens 0"),
        (("--temperature", "nan"), "--temperature nan"),
        (("--temperature", "0.0001"), "--temperature 0.0001"),
        (("--top-p", "0"), "--top-p 0"),
        (("--top-p", "1.5"), "--top-p 1.5"),
        (("--stop", ""), "--stop"),
        (("--seed", "-1"), "--seed -1"),
    ],
)
def test_bad_generation_options(tiny_artifacts, options, needle):
    image = GOLDEN_TINY / "image.png"
    _assert_input_error(_cli("run", tiny_artifacts, "--image", image, "--prompt", "What is it?", *options), needle)


@pytest.mark.parametrize("prompt,needle", [("Is <image> here?", "must not contain <image>"), ("   ", "is empty")])
def test_bad_prompts(tiny_artifacts, prompt, needle):
    _assert_input_error(_cli("run", tiny_artifacts, "--image", GOLDEN_TINY / "image.png", "--prompt", prompt), needle)


def test_a_non_utf8_prompt_is_an_input_error(tiny_artifacts):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what the shell hands Python for Latin-1 bytes
    result = _cli("run", tiny_artifacts, "--image", GOLDEN_TINY / "image.png", "--prompt", prompt)
    _assert_input_error(result, "not valid UTF-8")


@pytest.mark.parametrize(
    "options,needle",
    [
        (("--decode-steps", "0"), "--decode-steps"),
        (("--repeats", "0"), "--repeats"),
        (("--prompt-tokens", "100000"), "exceed the context of 512"),
    ],
)
def test_bad_bench_options(tiny_artifacts, options, needle):
    _assert_input_error(_cli("bench", tiny_artifacts, *options), needle)


def test_a_report_never_overwrites_an_input(tiny_artifacts, tmp_path):
    golden = shutil.copytree(GOLDEN_TINY, tmp_path / "golden")
    before = _snapshot(golden)
    result = _cli("verify", tiny_artifacts, "--golden", golden, "--report", golden / "generation.json")
    _assert_input_error(result, "inside the input")
    _assert_input_error(_cli("verify", tiny_artifacts, "--golden", golden, "--report", tmp_path), "is a directory")
    assert _snapshot(golden) == before


def test_a_bench_report_in_a_missing_folder_is_one_line(tiny_artifacts, tmp_path):
    result = _cli(
        "bench",
        tiny_artifacts,
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--decode-steps",
        "1",
        "--prompt-tokens",
        "150",
        "--report",
        tmp_path / "no" / "such" / "r.json",
    )
    _assert_input_error(result, "No such file or directory")


@pytest.mark.parametrize(
    "options,needle",
    [
        (("--group-size", "0"), "--group-size 0"),
        (("--group-size", "48"), "--group-size 48"),
        (("--method", "rtn", "--keep", "bogus"), "--keep 'bogus'"),
    ],
)
def test_bad_quantize_options(tiny_artifacts, tmp_path, options, needle):
    work = shutil.copytree(tiny_artifacts, tmp_path / "a")
    before = _snapshot(work)
    _assert_input_error(_cli("quantize", work, *options), needle)
    after = _snapshot(work)
    assert {k: v for k, v in after.items() if not k.startswith("reference/")} == before


@pytest.mark.parametrize("options,needle", [(("--context", "0"), "--context"), (("--batch", "0"), "--batch")])
def test_bad_build_options(bundle_copy, options, needle):
    _assert_input_error(_cli("build", bundle_copy, "--target", "orin-nx-16gb", *options), needle)


# Exit statuses ------------------------------------------------------------------------------------


def test_an_unexpected_error_is_status_4_in_one_line_and_debug_shows_it(tiny_artifacts, monkeypatch):
    from mvlm_compile.runtime import kv_cache

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(kv_cache.DecoderLoop, "step", broken)  # raised on the scheduler's thread
    args = ("run", tiny_artifacts, "--image", GOLDEN_TINY / "image.png", "--prompt", "What?")
    result = _cli(*args)
    assert result.exit_code == EXIT_INTERNAL_ERROR
    assert "RuntimeError: a bug" in result.output and "--debug" in result.output and "Traceback" not in result.output
    debug = _cli("--debug", *args)
    assert isinstance(debug.exception, RuntimeError)


@pytest.mark.parametrize(
    "code,needle", [(errno.ENOSPC, "no space left on the device"), (errno.EROFS, "read-only file system")]
)
def test_a_full_or_read_only_disk_is_one_line(tiny_checkpoint, tmp_path, monkeypatch, code, needle):
    from mvlm_compile import fileio

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "golden"))

    monkeypatch.setattr(fileio, "make_temp_dir", full)
    _assert_input_error(_cli("golden", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "golden"), needle)
    assert not (tmp_path / "golden").exists()


def test_a_verify_report_lists_the_bundle_untouched(bundle_copy):
    before = _snapshot(bundle_copy / "artifacts")
    assert _cli("verify", bundle_copy, "--golden", bundle_copy / "golden").exit_code == 0
    after = _snapshot(bundle_copy / "artifacts")
    assert {k: v for k, v in after.items() if k != LOCK} == {k: v for k, v in before.items() if k != LOCK}
    assert load_manifest(bundle_copy / "artifacts").graphs
