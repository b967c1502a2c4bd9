"""A bundle from elsewhere is untrusted input: no native code is loaded from it, no path
the user named is clobbered, and engines or records that do not match what is on disk are rebuilt
or refused with a one-line error (exit 2).

A "planted" library stands for native code shipped inside a bundle: a shared library named like
the PEG plugin, compiled here with `cc`, whose constructor writes a marker file the moment anything
opens it (dlopen runs constructors before any symbol is looked up). The marker staying absent is
the proof that nothing opened it. Tests that need a real TensorRT builder use TensorRT for RTX (the
rtx extra, CPU-only) and skip with the reason where it is not installed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import GOLDEN_TINY, REPO, TINY_BUNDLE, copy_tiny_bundle, save_graph_by_hand

from mvlm_compile import peg_op
from mvlm_compile.cli import cli
from mvlm_compile.engines_record import ENGINES_MANIFEST
from mvlm_compile.errors import EXIT_ENGINES_DEFERRED, EXIT_INPUT_ERROR
from mvlm_compile.fileio import LOCK, sha256_file
from mvlm_compile.manifest import load_manifest
from mvlm_compile.trt_env import TENSORRT_RTX, import_flavour

rtx, why_no_rtx = import_flavour(TENSORRT_RTX)
needs_rtx = pytest.mark.skipif(rtx is None, reason=why_no_rtx or "")
RTX_TARGET = "rtx-sm86"
ORIN_TARGET = "orin-nx-16gb"

PLANTED_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted_constructor(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) {
        fputs("the planted library's constructor ran\n", f);
        fclose(f);
    }
}
"""


def _cli(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def _assert_input_error(result, *needles: str) -> None:
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    """(library, marker): libmvlm_peg_plugin.so whose constructor writes `marker` when it is opened.
    One per test: a path dlopen has opened once is not run again in this process."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler (cc) to make the planted library")
    marker = tmp_path / "constructor-ran"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_SOURCE)
    library = tmp_path / "planted" / peg_op.PLUGIN_LIBRARY
    library.parent.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(library), str(source)], check=True)
    return library, marker


@pytest.fixture
def no_plugin_anywhere(monkeypatch):
    """Neither $MVLM_PEG_PLUGIN nor this installation's plugins/peg/build offers a plugin."""
    monkeypatch.delenv(peg_op.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(peg_op, "BUILD_DIRS", ())


def _plant(library: Path, *directories: Path) -> None:
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(library, directory / peg_op.PLUGIN_LIBRARY)


def _build_rtx(bundle: Path, *extra):
    result = _cli("build", bundle, "--target", RTX_TARGET, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return copy_tiny_bundle(tmp_path / "bundle")


def _verify(bundle: Path, *extra):
    return _cli("verify", bundle, "--golden", GOLDEN_TINY, "--task-items", "0", *extra)


def _bench(bundle: Path, *extra):
    options = ("--repeats", "1", "--warmup", "0", "--decode-steps", "1", "--prompt-tokens", "150")
    return _cli("bench", bundle, *options, *extra)


def _graph_hashes(artifacts: Path) -> dict[str, str]:
    return {name: graph["sha256"] for name, graph in load_manifest(artifacts).graphs.items()}


# 1. Native code from a bundle ----------------------------------------------------------------------


def test_the_planted_library_shows_when_it_is_opened(planted):
    """The instrument itself: opening the library (as TensorRT's load_library does) writes the marker."""
    library, marker = planted
    ctypes.CDLL(str(library))
    assert marker.read_text() == "the planted library's constructor ran\n"


@needs_rtx
def test_build_never_loads_a_library_found_in_the_bundle(planted, tmp_path, no_plugin_anywhere):
    library, marker = planted
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    _plant(library, bundle / "plugins" / "peg" / "build")
    result = _cli("build", bundle, "--target", RTX_TARGET, "--json")
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    record = json.loads((bundle / f"engines-{RTX_TARGET}" / ENGINES_MANIFEST).read_text())
    assert record["plugin"]["mode"] == "native"  # built without it, and says why
    assert "not loaded (a library inside a bundle is used only when named with --plugin)" in result.output


@needs_rtx
def test_the_runtime_loads_no_library_it_was_not_given_nor_one_with_another_hash(
    planted, tmp_path, no_plugin_anywhere, monkeypatch
):
    """engines.json claims the projector holds the plugin, with an all-zero SHA-256, and the planted
    library sits in the engines directory and in the bundle's plugin build directory."""
    library, marker = planted
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    engines_dir = Path(_build_rtx(bundle)["engines_dir"])
    record = json.loads((engines_dir / ENGINES_MANIFEST).read_text())
    record["plugin"] = {"mode": "plugin", "file": peg_op.PLUGIN_LIBRARY, "sha256": "0" * 64}
    (engines_dir / ENGINES_MANIFEST).write_text(json.dumps(record))
    _plant(library, engines_dir, bundle / "plugins" / "peg" / "build")
    run = ("run", bundle, "--backend", "trt", "--image", GOLDEN_TINY / "image.png", "--prompt", "What is it?")

    _assert_input_error(_cli(*run), "the projector engine holds the PEG plugin: pass --plugin PATH")
    assert not marker.exists()
    planted_there = engines_dir / peg_op.PLUGIN_LIBRARY
    _assert_input_error(_cli(*run, "--plugin", planted_there), f"than {planted_there} (SHA-256 differs)")
    monkeypatch.setenv(peg_op.PLUGIN_ENV, str(library))
    _assert_input_error(_cli(*run), f"than {library} (SHA-256 differs)")
    assert not marker.exists()


def _engines_record_for(artifacts: Path, plugin: dict, flavour: str = "tensorrt") -> dict:
    """An engines.json as the engine stage writes it for these artifacts (no engine files)."""
    engines = {
        name: {"file": f"{name}.engine", "sha256": "", "graph_sha256": sha256}
        for name, sha256 in _graph_hashes(artifacts).items()
    }
    builder = {"flavour": flavour, "version": "10.3.0", "sm": 87, "compute_capability": "8.7"}
    return {"builder": builder, "target": ORIN_TARGET, "plugin": plugin, "engines": engines}


def test_a_named_plugin_with_another_hash_is_refused_before_tensorrt_or_any_load(planted, tmp_path, monkeypatch):
    """No TensorRT needed: the plugin's hash is checked before TensorRT is imported, so this holds
    on every machine, the Jetson included."""
    library, marker = planted
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    engines_dir = bundle / f"engines-{ORIN_TARGET}"
    engines_dir.mkdir()
    plugin = {"mode": "plugin", "file": peg_op.PLUGIN_LIBRARY, "sha256": "0" * 64}
    (engines_dir / ENGINES_MANIFEST).write_text(json.dumps(_engines_record_for(bundle / "artifacts", plugin)))
    monkeypatch.setenv(peg_op.PLUGIN_ENV, str(library))
    run = ("run", bundle, "--backend", "trt", "--image", GOLDEN_TINY / "image.png", "--prompt", "What is it?")
    _assert_input_error(_cli(*run), f"than {library} (SHA-256 differs), so it was not loaded")
    assert not marker.exists()


def test_a_wrong_explicit_plugin_is_exit_2_even_where_engines_are_deferred(tmp_path, monkeypatch):
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    monkeypatch.setenv(peg_op.PLUGIN_ENV, str(tmp_path / "missing.so"))
    _assert_input_error(_cli("build", bundle, "--target", ORIN_TARGET), "MVLM_PEG_PLUGIN=", "missing.so is not a file")
    monkeypatch.delenv(peg_op.PLUGIN_ENV)
    _assert_input_error(
        _cli("build", bundle, "--target", ORIN_TARGET, "--plugin", tmp_path / "missing.so"), "--plugin", "missing.so"
    )


@needs_rtx
def test_a_wrong_explicit_plugin_is_never_a_build_without_the_plugin(tmp_path, monkeypatch):
    """TensorRT-RTX may build PEG natively when no library is at hand; not when the one named is wrong."""
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    monkeypatch.setenv(peg_op.PLUGIN_ENV, str(tmp_path / "missing.so"))
    _assert_input_error(_cli("build", bundle, "--target", RTX_TARGET), "MVLM_PEG_PLUGIN=", "missing.so is not a file")
    assert not (bundle / f"engines-{RTX_TARGET}").exists()


def test_plugin_with_the_onnx_runtime_backend_is_a_usage_error(planted, tmp_path):
    library, marker = planted
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    result = _cli("run", bundle, "--image", GOLDEN_TINY / "image.png", "--prompt", "What?", "--plugin", library)
    _assert_input_error(result, f"--plugin {library}: applies to --backend trt only")
    assert not marker.exists()


# 2. --report never replaces what is there ------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_a_report_that_is_a_symbolic_link_is_refused_and_neither_end_is_touched(bundle, tmp_path, command):
    target, link, dangling = tmp_path / "target.json", tmp_path / "link.json", tmp_path / "dangling.json"
    target.write_text("precious")
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "would-be-created.json")
    for report in (link, dangling):
        result = _verify(bundle, "--report", report) if command == "verify" else _bench(bundle, "--report", report)
        _assert_input_error(result, f"--report {report}: is a symbolic link")
    assert link.is_symlink() and dangling.is_symlink() and target.read_text() == "precious"
    assert not (tmp_path / "would-be-created.json").exists()


def test_the_junit_xml_beside_a_verify_report_is_held_to_the_same_rules(bundle, tmp_path):
    target = tmp_path / "target.xml"
    target.write_text("precious")
    (tmp_path / "report.xml").symlink_to(target)
    _assert_input_error(_verify(bundle, "--report", tmp_path / "report.json"), "report.xml: is a symbolic link")
    assert target.read_text() == "precious" and not (tmp_path / "report.json").exists()


def test_a_verify_report_named_xml_is_refused_rather_than_overwritten_by_the_junit(bundle, tmp_path):
    _assert_input_error(_verify(bundle, "--report", tmp_path / "report.xml"), "name it .json")
    assert not (tmp_path / "report.xml").exists()


def test_a_report_into_a_pipe_is_written_through_and_the_pipe_stays(bundle, tmp_path):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        result = _bench(bundle, "--report", fifo)
        assert result.exit_code == 0, result.output
        received, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
        reader.wait()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(received)["backend"] == "ort"


def test_a_report_into_a_pipe_nobody_reads_is_one_line_not_a_hang(tmp_path):
    from mvlm_compile.errors import MvlmError
    from mvlm_compile.fileio import write_user_file

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    with pytest.raises(MvlmError, match="a pipe that no process reads"):
        write_user_file(fifo, b"{}", "--report")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def _device(path: Path, kind: int, major: int, minor: int) -> Path:
    """A device node in tmp (never the real /dev entries): needs root."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root (the pipe tests cover non-regular files otherwise)")
    os.mknod(path, kind | 0o666, os.makedev(major, minor))
    return path


def test_a_report_into_a_character_device_stays_a_device_and_gets_no_junit_beside_it(bundle, tmp_path):
    null = _device(tmp_path / "null", stat.S_IFCHR, 1, 3)  # what /dev/null is
    result = _verify(bundle, "--report", null)
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert not (tmp_path / "null.xml").exists()


def test_a_report_onto_a_block_device_is_refused(tmp_path):
    from mvlm_compile.errors import MvlmError
    from mvlm_compile.fileio import write_user_file

    disk = _device(tmp_path / "disk", stat.S_IFBLK, 60, 0)  # 60: a local/experimental major, no driver
    with pytest.raises(MvlmError, match="not a regular file, a character device or a pipe"):
        write_user_file(disk, b"{}", "--report")
    assert stat.S_ISBLK(os.lstat(disk).st_mode)


# 3. Stale engines, --force ------------------------------------------------------------------------


@needs_rtx
def test_an_engine_written_after_engines_json_is_rebuilt_not_called_unchanged(tmp_path, no_plugin_anywhere):
    """A build killed between writing decoder.engine and engines.json: the inputs are unchanged, the
    engine file is not the recorded one. The next build rebuilds, and the record matches the files."""
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    engines_dir = Path(_build_rtx(bundle)["engines_dir"])
    shutil.copy(engines_dir / "vision.engine", engines_dir / "decoder.engine")
    assert _build_rtx(bundle)["stages"]["engines"] == "ran"
    record = json.loads((engines_dir / ENGINES_MANIFEST).read_text())
    for engine in record["engines"].values():
        assert sha256_file(engines_dir / engine["file"]) == engine["sha256"]
    assert _build_rtx(bundle)["stages"]["engines"] == "skipped (unchanged)"


def test_force_redoes_optimize_and_quantize_from_the_export(bundle):
    """The committed bundle was made from the checkpoint by `make tiny-bundle`; redoing its graph
    stages from the export it keeps gives the same graphs, byte for byte, every time."""
    committed = _graph_hashes(TINY_BUNDLE / "artifacts")
    for _ in range(2):
        result = _cli("build", bundle, "--target", ORIN_TARGET, "--force", "--json")
        assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
        assert json.loads(result.stdout)["stages"] == {"optimize": "ran", "quantize": "ran"}
        assert _graph_hashes(bundle / "artifacts") == committed
    assert load_manifest(bundle / "artifacts" / "reference").graphs["decoder"]["dtype"] == "fp16"  # kept as it was
    again = _cli("build", bundle, "--target", ORIN_TARGET, "--json")
    assert json.loads(again.stdout)["stages"] == {"optimize": "skipped (unchanged)", "quantize": "skipped (unchanged)"}


def test_force_without_the_export_keeps_the_graphs_and_says_so(bundle):
    shutil.rmtree(bundle / "artifacts" / "reference")  # left out when the bundle was copied
    result = _cli("build", bundle, "--target", ORIN_TARGET, "--force", "--json")
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    assert json.loads(result.stdout)["stages"] == {"optimize": "skipped (unchanged)", "quantize": "skipped (unchanged)"}
    assert "holds no export to redo optimize and quantize from" in result.output
    assert _graph_hashes(bundle / "artifacts") == _graph_hashes(TINY_BUNDLE / "artifacts")


@needs_rtx
def test_force_rebuilds_the_engines(tmp_path, no_plugin_anywhere):
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    _build_rtx(bundle)
    stages = _build_rtx(bundle, "--force")["stages"]
    assert stages == {"optimize": "ran", "quantize": "ran", "engines": "ran"}


# 4. Engines of another model ----------------------------------------------------------------------


@needs_rtx
def test_engines_of_another_model_are_refused_naming_the_graph(tmp_path, no_plugin_anywhere):
    built = copy_tiny_bundle(tmp_path / "built")
    engines_dir = Path(_build_rtx(built)["engines_dir"])
    other = copy_tiny_bundle(tmp_path / "other")  # the same model with one decoder weight changed
    artifacts = other / "artifacts"
    decoder = onnx.load(str(load_manifest(artifacts).graph_path(artifacts, "decoder")))
    weight = next(t for t in decoder.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16 and t.dims)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += np.float16(1)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    save_graph_by_hand(decoder, artifacts, "decoder")
    result = _cli(
        "run",
        other,
        "--backend",
        "trt",
        "--engines",
        engines_dir,
        "--image",
        GOLDEN_TINY / "image.png",
        "--prompt",
        "?",
    )
    _assert_input_error(result, "the decoder engine was built from another decoder graph")


# 5. Smaller: quoted commands, recipes named by the manifest, lock messages, full disks --------------


def test_printed_commands_quote_the_bundle_path(tmp_path):
    """Run as the shell runs them, with mvlm-compile and cmake standing in as functions that print
    their arguments: each path arrives as one argument, and nothing in the name runs."""
    name = "my bundle;touch PWNED"
    bundle = copy_tiny_bundle(tmp_path / name)
    result = _cli("build", bundle, "--target", ORIN_TARGET, "--json")
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    command = json.loads(result.stdout)["target_command"]
    note = (bundle / "BUILD_ON_TARGET.txt").read_text()
    lines = [line.strip() for line in note.splitlines() if line.startswith(("  mvlm-compile ", "  cmake "))]
    assert command in lines and len(lines) == 3
    show = (
        "mvlm-compile() { printf '[%s]' mvlm-compile \"$@\"; echo; }; cmake() { printf '[%s]' cmake \"$@\"; echo; }; "
    )
    printed = [
        subprocess.run(["bash", "-c", show + line], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        for line in lines
    ]
    plugin = f"{name}-peg-plugin"
    assert printed == [
        f"[cmake][-S][{name}/plugins/peg][-B][{plugin}]\n[cmake][--build][{plugin}][-j]\n",
        f"[mvlm-compile][build][{name}][--target][{ORIN_TARGET}][--plugin][{plugin}/libmvlm_peg_plugin.so]\n",
        f"[mvlm-compile][verify][{name}][--golden][{name}/golden][--backend][trt]"
        f"[--plugin][{plugin}/libmvlm_peg_plugin.so]\n",
    ]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_a_manifest_recipe_that_names_a_file_is_refused(bundle, tmp_path, where):
    outside = tmp_path / "outside" / "evil.yaml"
    outside.parent.mkdir()
    shutil.copy(REPO / "recipes" / "tiny.yaml", outside)
    manifest_path = bundle / "artifacts" / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["model"]["recipe"] = str(outside) if where == "absolute" else "../../outside/evil.yaml"
    manifest_path.write_text(json.dumps(data))
    _assert_input_error(_cli("build", bundle, "--target", ORIN_TARGET), "model.recipe", "is not a recipe name")
    _assert_input_error(_verify(bundle), "model.recipe", "is not a recipe name")


def _hold_lock(directory: Path, mode: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, time\n"
            f"fd = os.open({str(directory / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
            f"fcntl.flock(fd, fcntl.{mode})\nprint('held', flush=True)\ntime.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize(
    "holder_mode,command,says",
    [("LOCK_SH", "optimize", "(reading)"), ("LOCK_EX", "optimize", "(writing)"), ("LOCK_EX", "verify", "(writing)")],
)
def test_the_lock_message_says_what_the_holder_does(bundle, holder_mode, command, says):
    holder = _hold_lock(bundle / "artifacts", holder_mode)
    try:
        result = _cli("optimize", bundle) if command == "optimize" else _verify(bundle)
        _assert_input_error(result, f"in use by another mvlm-compile {says}")
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_during_a_write_names_the_file(tmp_path, monkeypatch):
    """write() on a full disk raises ENOSPC with no file name; the error must still say which output."""
    from mvlm_compile import fileio
    from mvlm_compile.cli import _os_error_line

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    report = tmp_path / "report.json"
    with pytest.raises(OSError) as err:
        fileio.write_bytes(report, b"{}")
    assert _os_error_line(err.value) == f"{report}: no space left on the device"
    assert list(tmp_path.iterdir()) == []  # and no temporary file left


def test_a_full_disk_while_saving_a_graph_names_the_graph(tmp_path, monkeypatch):
    from mvlm_compile import onnx_io
    from mvlm_compile.cli import _os_error_line

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_io.onnx, "save_model", full)
    model = onnx.load(str(TINY_BUNDLE / "artifacts" / "projector.onnx"))
    with pytest.raises(OSError) as err:
        onnx_io.save_model(model, tmp_path / "projector.onnx")
    assert _os_error_line(err.value) == f"{tmp_path / 'projector.onnx'}: no space left on the device"


def test_a_copy_that_fills_the_disk_names_the_destination():
    from mvlm_compile.cli import _os_error_line

    copying = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/src/decoder.onnx.data", None, "/dst/decoder.onnx.data")
    assert _os_error_line(copying) == "/dst/decoder.onnx.data: no space left on the device"


def test_a_report_onto_a_full_device_names_it(bundle, tmp_path):
    full = _device(tmp_path / "full", stat.S_IFCHR, 1, 7)  # what /dev/full is: every write is ENOSPC
    _assert_input_error(_bench(bundle, "--report", full), f"{full}: no space left on the device")
    assert stat.S_ISCHR(os.lstat(full).st_mode)
