"""A bundle from elsewhere is untrusted input (issue 20): no native code is loaded from it, no path
the user named is clobbered, and engines or records that do not match what is on disk are rebuilt
or refused with a one-line error (exit 2).

A "planted" library stands for native code shipped inside a bundle: a shared library named like
the PEG plugin, compiled here with `cc`, whose constructor writes a marker file the moment anything
opens it (dlopen runs constructors before any symbol is looked up). The marker staying absent is
the proof that nothing opened it. Tests that need a real TensorRT builder use TensorRT for RTX (the
rtx extra, CPU-only) and skip with the reason where it is not installed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import GOLDEN_TINY, TINY_BUNDLE, copy_tiny_bundle

from mvlm_compile import peg_op
from mvlm_compile.cli import cli
from mvlm_compile.errors import EXIT_INPUT_ERROR
from mvlm_compile.fileio import LOCK
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


# 5. Smaller: quoted commands, recipes named by the manifest, lock messages, full disks --------------


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
