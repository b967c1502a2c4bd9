"""Shared by the benchmark scripts: run a command in a child process, measure it."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def mvlm_compile(*args: str) -> list[str]:
    """argv for `mvlm-compile ARGS` with this interpreter."""
    return [sys.executable, "-m", "mvlm_compile.cli", *args]


def run_measured(argv: list[str], ok: tuple[int, ...] = (0,)) -> dict:
    """Wall seconds and peak RSS (GiB, os.wait4) of a child process; exits if its status is not in `ok`."""
    started = time.perf_counter()
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code not in ok:
        raise SystemExit(f"{' '.join(argv)} failed with status {code}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "status": code}
