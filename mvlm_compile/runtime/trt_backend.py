"""TensorRT backend: runs the engines by graph name, after checking engines.json against this machine.

Buffers and execution contexts come from Polygraphy's TrtRunner (core dependency). The
decoder engine has two optimisation profiles (prefill, decode); each gets its own runner.
Two TensorRT 10.3 rules Polygraphy leaves to us: every input needs a non-null address, at
least 256-byte aligned, also an empty one (the prefill's past of length 0), so empty inputs
are bound to one small buffer of our own; and the outputs Polygraphy returns are views of host
buffers it reuses on the next call, so they are copied before they leave this backend.
Issue 15 replaces the runners with execute_async_v3 driven directly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from mvlm_compile import contract
from mvlm_compile.engines_record import (
    DECODE_PROFILE,
    PEG_PLUGIN,
    PREFILL_PROFILE,
    TokenLimits,
    check_engines_record,
    decoder_limits,
    engine_path,
    require_engines_record,
)
from mvlm_compile.errors import InternalError, MvlmError
from mvlm_compile.manifest import Manifest, load_manifest
from mvlm_compile.peg_op import find_plugin_library
from mvlm_compile.trt_env import (
    FLAVOURS,
    import_flavour,
    load_plugin_library,
    no_collection_inside_tensorrt,
    query_gpu,
)

ADDRESS_ALIGNMENT = 256  # TensorRT's minimum alignment of an I/O tensor address


def bind_empty_inputs(feed: dict[str, np.ndarray], address: int) -> dict[str, Any]:
    """`feed` with each zero-element array replaced by a device view of its shape at `address`
    (a buffer the backend owns): TensorRT 10.3 refuses a null address even for an empty tensor,
    and nothing is read from it."""
    from polygraphy.cuda import DeviceView

    if address == 0 or address % ADDRESS_ALIGNMENT:
        raise InternalError(
            f"empty-input buffer at {address:#x} is not a non-null {ADDRESS_ALIGNMENT}-byte aligned address"
        )
    if all(v.size for v in feed.values()):
        return feed
    return {k: DeviceView(address, v.shape, v.dtype) if v.size == 0 else v for k, v in feed.items()}


def owned_outputs(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Copies of the runner's outputs: they view host buffers the runner overwrites on its next call."""
    return {name: np.array(value, copy=True) for name, value in outputs.items()}


class TrtBackend:
    name = "trt"

    def __init__(self, artifacts: Path, engines_dir: Path, manifest: Manifest | None = None) -> None:
        from polygraphy import cuda
        from polygraphy.backend.trt import TrtRunner

        self.artifacts = Path(artifacts)
        self.manifest = manifest or load_manifest(self.artifacts)
        self._runners: dict[tuple[str, int], Any] = {}
        record = require_engines_record(engines_dir)
        flavour = FLAVOURS.get(record["builder"]["flavour"])
        if flavour is None:
            raise MvlmError(f"--engines {engines_dir}: unknown builder {record['builder']['flavour']!r}: rebuild")
        trt, why = import_flavour(flavour)
        if trt is None:
            raise MvlmError(f"--backend trt: the engines in {engines_dir} were built with {flavour.name}: {why}")
        plugin = None
        if record["plugin"]["mode"] == PEG_PLUGIN:
            plugin = find_plugin_library([Path(engines_dir), self.artifacts.parent / "plugins" / "peg" / "build"])
            load_plugin_library(plugin, trt)  # before deserialising: the projector engine holds the plugin
        gpu = query_gpu()
        self.record = check_engines_record(
            engines_dir, flavour.name, trt.__version__, gpu and gpu.name, gpu and gpu.sm, plugin
        )
        if not flavour.runs_in_backend:  # reached only on a GPU these engines match
            raise MvlmError(f"--backend trt: running {flavour.name} engines is not supported yet ({engines_dir})")
        self.limits: TokenLimits = decoder_limits(self.record, Path(engines_dir))
        self._empty = cuda.DeviceArray.raw((ADDRESS_ALIGNMENT,))  # cudaMalloc: 256-byte aligned, never null
        self._engines = {}
        with no_collection_inside_tensorrt():
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            for name in self.record["engines"]:
                self._engines[name] = runtime.deserialize_cuda_engine(
                    engine_path(engines_dir, self.record, name).read_bytes()
                )
                profiles = [PREFILL_PROFILE, DECODE_PROFILE] if name == "decoder" else [0]
                for profile in profiles:
                    runner = TrtRunner(self._engines[name], optimization_profile=profile)
                    runner.activate()
                    self._runners[(name, profile)] = runner

    def input_dtype(self, graph: str, name: str) -> type:
        return self.manifest.input_dtype(graph, name)

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        profile = 0
        if graph == "decoder":
            profile = (
                DECODE_PROFILE
                if feed[contract.DECODER_EMBEDS].shape[1] == 1 and feed[contract.past_names(0)[0]].shape[2] > 0
                else PREFILL_PROFILE
            )
        from polygraphy.logger import G_LOGGER

        cast = {k: np.ascontiguousarray(v, dtype=self.input_dtype(graph, k)) for k, v in feed.items()}
        bound = bind_empty_inputs(cast, self._empty.ptr)
        # Polygraphy warns on reading a DeviceView's dtype (a deprecation notice): once per prefill, noise.
        quiet = G_LOGGER.verbosity(G_LOGGER.ERROR) if bound is not cast else contextlib.nullcontext()
        with quiet:
            outputs = self._runners[(graph, profile)].infer(bound)
        return owned_outputs(outputs)

    def close(self) -> None:
        for runner in self._runners.values():
            if runner.is_active:
                runner.deactivate()
        self._runners.clear()
        empty = getattr(self, "_empty", None)
        if empty is not None:
            empty.free()
            self._empty = None

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
