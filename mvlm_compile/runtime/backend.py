"""Execution backends: the same pipeline drives ONNX Runtime sessions and TensorRT engines.

A backend runs the artifacts' graphs by name. Like Polygraphy's runners, each one is a context
manager: `with open_backend("ort", artifacts) as backend:` opens its sessions or engines
lazily or on entry and releases them on exit, so nothing is left activated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mvlm_compile.engines_record import TokenLimits
from mvlm_compile.errors import MvlmError
from mvlm_compile.manifest import Manifest
from mvlm_compile.runtime.kv_cache import DecoderLoop

BACKENDS = ("ort", "trt")


class Backend(Protocol):
    name: str  # "ort" or "trt"
    manifest: Manifest
    artifacts: Path
    limits: TokenLimits  # longest prompt and context: TensorRT's from the engine's profiles, not the model's

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def input_dtype(self, graph: str, name: str) -> type: ...

    def decoder(self, slots: int = 1) -> DecoderLoop: ...  # the decoder over the backend's preallocated cache

    def close(self) -> None: ...


@contextlib.contextmanager
def open_backend(
    name: str,
    artifacts: Path,
    engines_dir: Path | None = None,
    threads: int = 0,
    int4_activations: str = "fp32",
    plugin: Path | None = None,
    graphs: Sequence[str] | None = None,
) -> Iterator[Backend]:
    """A backend over an artifacts directory (and, for "trt", its engines directory); closed on exit.
    `threads` and `int4_activations` (see ort_backend.INT4_ACTIVATIONS) are ONNX Runtime's; `plugin`
    (the PEG plugin library the user chose) and `graphs` (the engines to load, default all) are
    TensorRT's (ONNX Runtime opens a graph's session when it first runs)."""
    if name == "ort":
        if plugin is not None:
            raise MvlmError(f"--plugin {plugin}: applies to --backend trt only")
        from mvlm_compile.runtime.ort_backend import OrtBackend

        backend: Backend = OrtBackend(Path(artifacts), threads=threads, int4_activations=int4_activations)
    elif name == "trt":
        from mvlm_compile.runtime.trt_backend import TrtBackend

        if engines_dir is None:
            raise MvlmError("--engines: the TensorRT backend needs an engines directory")
        backend = TrtBackend(Path(artifacts), Path(engines_dir), plugin=plugin, graphs=graphs)
    else:
        raise MvlmError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")
    try:
        yield backend
    finally:
        backend.close()
