"""A normal (non-editable) install works away from the source tree: the wheel carries the recipes,
the target profiles and the PEG plugin's sources, and the console script runs from a fresh venv."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv holding only our wheel; its dependencies come from this environment's
    site-packages through a .pth line (no download, and not our editable install: a .pth
    directory's own .pth files are not processed)."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
        str(REPO),
    ]
    subprocess.run(build, check=True, capture_output=True, cwd=root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("mvlm_compile-*.whl"))
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, cwd=root)
    return venv


def _run(venv: Path, code: str, cwd: Path) -> str:
    done = subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_wheel_carries_recipes_targets_and_plugin_sources(fresh_venv, tmp_path):
    out = _run(
        fresh_venv,
        "import mvlm_compile, mvlm_compile.resources as r\n"
        "from mvlm_compile.recipes import load_recipe, load_targets\n"
        "from mvlm_compile.peg_op import PEG_CONTRACT\n"
        "print(mvlm_compile.__file__); print(r.PEG_DIR); print(load_recipe('mobilevlm-v2-1.7b').name)\n"
        "print(sorted(load_targets())[0]); print(PEG_CONTRACT['op_type'])\n"
        "print(sorted(p.name for p in r.PEG_DIR.iterdir()))\n",
        cwd=tmp_path,
    )
    module, peg_dir, recipe, target, op, files = out.splitlines()
    assert fresh_venv.as_posix() in module and REPO.as_posix() not in module  # the installed copy, not the tree
    assert fresh_venv.as_posix() in peg_dir
    assert recipe == "mobilevlm-v2-1.7b" and target and op == "MvlmPEG"
    for name in ("CMakeLists.txt", "peg_contract.json", "pegKernel.cu", "pegPlugin.cpp"):
        assert name in files


def test_the_console_script_runs_from_the_fresh_venv(fresh_venv, tmp_path):
    done = subprocess.run([fresh_venv / "bin" / "mvlm-compile", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "synth" in done.stdout and "build" in done.stdout
