"""TensorRT backend: runs the engines by graph name, after checking engines.json against this machine.

Buffers and execution contexts come from Polygraphy's TrtRunner (core dependency). The
decoder engine has two optimisation profiles (prefill, decode); each gets its own runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mvlm_compile import contract
from mvlm_compile.build.engines import import_tensorrt
from mvlm_compile.build.gpu import query_gpu
from mvlm_compile.build.pipeline import ENGINES_MANIFEST
from mvlm_compile.build.plan import DECODE_PROFILE, PREFILL_PROFILE
from mvlm_compile.build.plugin import find_plugin_library, load_plugin_library
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.fileio import sha256_file
from mvlm_compile.manifest import Manifest, load_manifest


def check_engines_record(engines_dir: Path, trt, gpu, plugin_path: Path) -> dict:
    """engines.json must match this TensorRT, GPU and plugin: engines are not portable."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (build the engines with `mvlm-compile build --target ...`)") from None
    if record["tensorrt_version"] != trt.__version__:
        raise ArtifactError(f"{path}: engines built with TensorRT {record['tensorrt_version']}, this is {trt.__version__}: rebuild")
    if gpu is None or record["gpu"]["sm"] != gpu.sm:
        here = f"{gpu.name} (SM {gpu.sm})" if gpu else "no GPU"
        raise ArtifactError(f"{path}: engines built for SM {record['gpu']['sm']} ({record['gpu']['name']}), this is {here}: rebuild")
    if record["plugin"]["sha256"] != sha256_file(plugin_path):
        raise ArtifactError(f"{path}: built with another PEG plugin library than {plugin_path} (hash differs): rebuild")
    for name, engine in record["engines"].items():
        if sha256_file(Path(engines_dir) / engine["file"]) != engine["sha256"]:
            raise ArtifactError(f"{Path(engines_dir) / engine['file']}: content differs from {ENGINES_MANIFEST} (corrupt or replaced)")
    return record


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
        self.record = check_engines_record(engines_dir, trt, query_gpu(), plugin)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {}
        self._runners = {}
        for name, engine in self.record["engines"].items():
            self._engines[name] = runtime.deserialize_cuda_engine((Path(engines_dir) / engine["file"]).read_bytes())
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
            profile = DECODE_PROFILE if feed[contract.DECODER_EMBEDS].shape[1] == 1 and feed[contract.past_names(0)[0]].shape[2] > 0 else PREFILL_PROFILE
        cast = {k: np.ascontiguousarray(v, dtype=self.input_dtype(graph, k)) for k, v in feed.items()}
        return dict(self._runners[(graph, profile)].infer(cast))

    def close(self) -> None:
        for runner in self._runners.values():
            runner.deactivate()
