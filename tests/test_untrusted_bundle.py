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
