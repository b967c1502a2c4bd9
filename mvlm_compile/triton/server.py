"""A CPU Triton Inference Server on this machine, to run a model repository without a container.

nvidia-pytriton's wheel ships a working `tritonserver` (core 2.51, CPU: the Python backend only)
with the Python backend's stub built for each Python version. Installed by `make` (the wheel's
metadata pins numpy<2, which mvlm-compile's pins exceed, and only its binaries are used, so it is
installed without its dependencies: `pip install --no-deps nvidia-pytriton==0.7.0`). To run it:
  - the Python backend's directory must hold the stub of the Python that runs the models: it is
    assembled here, in a directory of ours (the wheel's own files are never written),
  - the wheel's libraries (nvidia_pytriton.libs) on LD_LIBRARY_PATH,
  - PATH starting with the bin/ of the Python environment the models run in: the stub's embedded
    interpreter takes its prefix (the venv, so its packages, mvlm-compile's included) from the
    `python3` it finds there. That environment must have numpy < 2: this stub (pybind11) reads
    arrays through numpy 1's ABI, and under numpy 2 every tensor it hands over is garbage (each
    byte a copy of the first). `make` makes one: .venv/triton-python (constraints/triton-python.txt).
On a GPU, serve with NVIDIA's Triton container instead (docs/user_guide/serving.md: "Serving a fleet with Triton").
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mvlm_compile.errors import MvlmError

PYTRITON_PIN = "nvidia-pytriton==0.7.0"
INSTALL_HINT = f"pip install --no-deps {PYTRITON_PIN} (make test installs it)"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class ServerFiles:
    binary: Path  # tritonserver
    python_backend: Path  # the wheel's backends/python/
    stub: Path  # the Python backend stub for this Python
    libraries: Path  # the wheel's bundled shared libraries


def find_server_files() -> ServerFiles:
    """The tritonserver of nvidia-pytriton's wheel, for this Python; MvlmError saying how to get it."""
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it (numpy<2)
    if spec is None or not spec.submodule_search_locations:
        raise MvlmError(f"no local tritonserver: nvidia-pytriton is not installed; {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = ServerFiles(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / python / STUB,
        libraries=package.parent / "nvidia_pytriton.libs",
    )
    for path in (files.binary, files.python_backend, files.stub, files.libraries):
        if not path.exists():
            raise MvlmError(f"{path}: missing from nvidia-pytriton's install (Python {python}?); {INSTALL_HINT}")
    return files


def prepare_backends(files: ServerFiles, directory: Path) -> Path:
    """A backends directory whose python/ holds the wheel's Python backend and this Python's stub."""
    python = Path(directory) / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        shutil.copy2(files.python_backend / name, python / name)
    shutil.copy2(files.stub, python / STUB)
    return Path(directory)


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def server_command(files: ServerFiles, repository: Path, backends: Path, ports: Ports) -> list[str]:
    return [
        str(files.binary),
        f"--model-repository={Path(repository).absolute()}",
        f"--backend-directory={backends}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--exit-on-error=true",
        "--strict-readiness=true",
    ]


def check_model_python(python: Path) -> None:
    """The models' Python: this stub's version, numpy < 2, mvlm-compile importable (MvlmError otherwise)."""
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    probe = "import sys, numpy, mvlm_compile; print(f'{sys.version_info[0]}.{sys.version_info[1]} {numpy.__version__}')"
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise MvlmError(f"--python {python}: cannot run it ({e.strerror or e})") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MvlmError(f"--python {python}: cannot import numpy and mvlm_compile ({last})")
    version, numpy_version = done.stdout.split()
    if version != want:
        raise MvlmError(f"--python {python}: Python {version}; the stub prepared here is for Python {want}")
    if int(numpy_version.split(".")[0]) >= 2:
        raise MvlmError(
            f"--python {python}: numpy {numpy_version}; this tritonserver's Python backend needs numpy < 2 "
            "(make's .venv/triton-python has it)"
        )


def server_environment(files: ServerFiles, python: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(files.libraries), env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(python).absolute().parent), env.get("PATH")]))
    return env


@contextlib.contextmanager
def local_server(
    repository: Path,
    workdir: Path,
    python: Path,
    ports: Ports = Ports(),
    log: Path | None = None,
    ready_timeout: float = 300,
) -> Iterator[subprocess.Popen]:
    """Run tritonserver on `repository` until the block ends (then stopped, killed if it must be),
    its models in the environment of `python` (see check_model_python). Returns once the server
    is ready; raises MvlmError with its log's tail if it exits first."""
    files = find_server_files()
    check_model_python(Path(python))
    backends = prepare_backends(files, Path(workdir) / "backends")
    log = log or Path(workdir) / "tritonserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            server_command(files, repository, backends, ports),
            env=server_environment(files, Path(python)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
        )
    try:
        wait_ready(process, ports, log, ready_timeout)
        yield process
    finally:
        stop(process)


def wait_ready(process: subprocess.Popen, ports: Ports, log: Path, timeout: float) -> None:
    """Poll the server's readiness endpoint (every model loaded) until it answers 200."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{ports.http}/v2/health/ready"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MvlmError(f"tritonserver exited with status {process.returncode} before ready:\n{_tail(log)}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise MvlmError(f"tritonserver not ready after {timeout:.0f} s:\n{_tail(log)}")


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM (Triton unloads its models and exits), then SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
