"""Small file helpers shared by every stage: atomic writes and content hashes.

Nothing is ever left half-written: outputs are written to a temporary sibling and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_graph(path: Path) -> str:
    """Content hash of an ONNX graph with its external weights: `<graph>.onnx.data` beside it
    (onnx_io.save_model's convention) changes the hash too. A graph without one hashes as its
    .onnx alone, so records of inline graphs keep their values."""
    data = Path(f"{path}.data")
    if not data.exists():
        return sha256_file(path)
    return hashlib.sha256(f"{sha256_file(path)} {sha256_file(data)}".encode()).hexdigest()


def digest(*parts: object) -> str:
    """SHA-256 of JSON-serialisable parts: the identity of a stage's inputs and parameters."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    An existing `final` is replaced as a whole; on any error (or Ctrl-C) the temporary
    directory is removed and `final` is left as it was.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
