"""Random bad inputs to the CLI for a bounded time: every run must end in a documented status
(0, 1, 2, 3) with no traceback; status 4 (internal error) is a bug. Seeded: a failure names its
seed and arguments so it can be replayed."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from click.testing import CliRunner
from conftest import GOLDEN_TINY

from mvlm_compile.cli import cli

BUDGET_SECONDS = float(os.environ.get("MVLM_FUZZ_SECONDS", "20"))
ALLOWED = {0, 1, 2, 3}


def _corrupt(rng: random.Random, directory: Path) -> str:
    """Damage one file of `directory` at random; returns what was done."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    target = rng.choice(files)
    action = rng.choice(["truncate", "garbage", "empty", "delete", "json-list", "json-null-values", "zero-byte-header"])
    data = target.read_bytes()
    if action == "truncate":
        target.write_bytes(data[: rng.randrange(max(1, len(data)))])
    elif action == "garbage":
        target.write_bytes(rng.randbytes(rng.randrange(1, 256)))
    elif action == "empty":
        target.write_bytes(b"")
    elif action == "delete":
        target.unlink()
    elif action == "json-list":
        target.write_text("[]")
    elif action == "json-null-values":
        target.write_text('{"format": null, "format_version": null, "model": null, "graphs": null}')
    else:
        target.write_bytes(b"\0" * 16 + data[16:])
    return f"{action} {target.relative_to(directory)}"


def _value(rng: random.Random, paths: list[Path]) -> str:
    pool = ["-1", "0", "1", "3", "nan", "inf", "-inf", "1e309", "abc", "", " ", "<image>", "é\u202e", "9" * 30]
    return str(rng.choice(paths)) if rng.random() < 0.4 else rng.choice(pool)


def _arguments(rng: random.Random, artifacts: Path, golden: Path, paths: list[Path]) -> list[str]:
    image = str(golden / "image.png")
    commands = {
        "verify": [str(artifacts), "--golden", rng.choice([str(golden), _value(rng, paths)])],
        "run": [str(artifacts), "--image", rng.choice([image, _value(rng, paths)]), "--prompt", _value(rng, paths)],
        "chat": [str(artifacts), "--image", rng.choice([image, _value(rng, paths)])],
        "bench": [str(artifacts), "--repeats", "1", "--warmup", "0", "--decode-steps", "1", "--prompt-tokens", "150"],
        "optimize": [str(artifacts)],
        "quantize": [str(artifacts), "--method", "rtn"],
        "build": [str(artifacts), "--target", rng.choice(["orin-nx-16gb", "no-such-target", ""])],
        "export": ["--checkpoint", _value(rng, paths), "--out", _value(rng, paths)],
        "golden": ["--checkpoint", _value(rng, paths), "--out", _value(rng, paths)],
        "triton": [str(artifacts), "--out", rng.choice([str(artifacts.parent / "repo"), _value(rng, paths)])],
    }
    name = rng.choice(sorted(commands))
    args = commands[name]
    options = {
        "run": ["--max-new-tokens", "--temperature", "--top-p", "--seed", "--stop"],
        "chat": ["--max-new-tokens", "--temperature", "--top-p", "--seed", "--stop", "--system", "--prefix-cache-mib"],
        "bench": ["--repeats", "--decode-steps", "--prompt-tokens", "--report"],
        "quantize": ["--group-size", "--keep", "--golden"],
        "build": ["--context", "--batch", "--recipe"],
        "verify": ["--report", "--recipe", "--reference"],
        "triton": ["--backend", "--engines", "--instances", "--model-name", "--max-tokens", "--threads"],
    }.get(name, [])
    for option in rng.sample(options, k=rng.randrange(len(options) + 1)):
        args += [option, _value(rng, paths)]
    return [name, *args]


def _chat_lines(rng: random.Random, paths: list[Path]) -> str:
    """What a script might feed `chat`: questions, commands, and bad ones."""
    commands = ["/reset", "/help", "/exit", "/frob", "/image", "/reset now"]
    lines = [
        rng.choice([_value(rng, paths), f"/image {_value(rng, paths)}", rng.choice(commands)])
        for _ in range(rng.randrange(4))
    ]
    return "".join(f"{line}\n" for line in lines)


def test_random_bad_inputs_end_in_a_documented_status(tiny_artifacts, tmp_path, monkeypatch):
    seed = int(os.environ.get("MVLM_FUZZ_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    # Hermetic: relative paths land in tmp_path, and every path handed out is a copy, since a
    # random run may write a report over any of them.
    monkeypatch.chdir(tmp_path)
    golden = shutil.copytree(GOLDEN_TINY, tmp_path / "golden")
    repository = _snapshot(GOLDEN_TINY.parent.parent)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(rng.randbytes(4096))
    (tmp_path / "empty").mkdir()
    paths = [junk, tmp_path / "empty", tmp_path / "missing", golden / "generation.json", Path("/")]
    deadline = time.monotonic() + BUDGET_SECONDS
    runs = 0
    while time.monotonic() < deadline:
        work = tmp_path / f"case{runs}"
        artifacts = shutil.copytree(tiny_artifacts, work)
        damage = _corrupt(rng, artifacts) if rng.random() < 0.7 else "none"
        args = _arguments(rng, artifacts, golden, paths)
        stdin = _chat_lines(rng, paths) if args[0] == "chat" else None
        result = CliRunner().invoke(cli, args, input=stdin)
        context = f"seed {seed}, run {runs}: damage {damage}, args {args}, stdin {stdin!r}\n{result.output[-1500:]}"
        assert result.exit_code in ALLOWED, context
        assert "Traceback" not in result.output, context
        if result.exception is not None:
            assert isinstance(result.exception, SystemExit), (context, repr(result.exception))
        shutil.rmtree(work, ignore_errors=True)
        runs += 1
    assert runs >= 5  # the budget bought real runs
    assert _snapshot(GOLDEN_TINY.parent.parent) == repository  # nothing outside tmp_path was written


def _snapshot(repository: Path) -> dict[str, int]:
    """Tracked-looking files of the repository (name -> mtime), build outputs aside."""
    skip = {".git", ".venv", "build", ".pytest_cache", ".ruff_cache"}
    return {
        str(p.relative_to(repository)): p.stat().st_mtime_ns
        for p in repository.rglob("*")
        if p.is_file()
        and not skip & set(p.relative_to(repository).parts)
        and not any(part == "__pycache__" or part.endswith(".egg-info") for part in p.parts)
    }
