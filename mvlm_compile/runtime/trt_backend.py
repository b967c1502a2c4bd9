"""TensorRT backend: runs the engines by graph name, after checking engines.json against this machine.

Buffers and execution contexts come from Polygraphy's TrtRunner (core dependency). The
decoder engine has two optimisation profiles (prefill, decode); each gets its own runner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mvlm_compile import contract
from mvlm_compile.engines_record import DECODE_PROFILE, PREFILL_PROFILE, check_engines_record, engine_path
from mvlm_compile.errors import MvlmError
from mvlm_compile.manifest import Manifest, load_manifest
from mvlm_compile.peg_op import find_plugin_library
from mvlm_compile.trt_env import import_tensorrt, load_plugin_library, query_gpu


class TrtBackend:
    name = "trt"

    def __init__(self, artifacts: Path, engines_dir: Path, manifest: Manifest | None = None) -> None:
        from polygraphy.backend.trt import TrtRunner

        trt, why = import_tensorrt()
        if trt is None:
            raise MvlmError(f"--backend trt: {why}")
        self.artifacts = Path(artifacts)
        self.manifest = manifest or load_manifest(self.artifacts)
        plugin = find_plugin_library([Path(engines_dir), self.artifacts.parent / "plugins" / "peg" / "build"])
        load_plugin_library(plugin, trt)  # before deserialising: the projector engine holds the plugin
        gpu = query_gpu()
        self.record = check_engines_record(engines_dir, trt.__version__, gpu and gpu.name, gpu and gpu.sm, plugin)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {}
        self._runners = {}
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
        cast = {k: np.ascontiguousarray(v, dtype=self.input_dtype(graph, k)) for k, v in feed.items()}
        return dict(self._runners[(graph, profile)].infer(cast))

    def close(self) -> None:
        for runner in self._runners.values():
            if runner.is_active:
                runner.deactivate()
        self._runners.clear()

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
