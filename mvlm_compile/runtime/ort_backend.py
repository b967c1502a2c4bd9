"""ONNX Runtime (CPU) backend: runs the artifacts' graphs by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mvlm_compile.manifest import Manifest, load_manifest

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def ort_session(path: Path, threads: int = 0):
    """A CPU session. INT4 MatMulNBits runs with FP32 activations (accuracy level 0): the default
    int8 activations cost about 0.5% relative error, too much for verification. A graph with
    nodes in the ai.onnx.contrib domain (the MvlmPEG plugin node) gets onnxruntime-extensions
    and the op's NumPy reference."""
    import onnxruntime as ort

    from mvlm_compile.surgery.peg_reference import ort_model_source

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(ort_model_source(path, options), options, providers=["CPUExecutionProvider"])


class OrtBackend:
    name = "ort"

    def __init__(self, artifacts: Path, manifest: Manifest | None = None) -> None:
        self.artifacts = Path(artifacts)
        self.manifest = manifest or load_manifest(self.artifacts)
        self._sessions: dict = {}

    def _session(self, graph: str):
        if graph not in self._sessions:
            self._sessions[graph] = ort_session(self.manifest.graph_path(self.artifacts, graph))
        return self._sessions[graph]

    def input_dtype(self, graph: str, name: str) -> type:
        types = {i.name: i.type for i in self._session(graph).get_inputs()}
        return _ORT_TYPES[types[name]]

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a graph; inputs are cast to the graph's input types (FP16 graphs take FP32 feeds)."""
        session = self._session(graph)
        cast = {i.name: np.asarray(feed[i.name], dtype=_ORT_TYPES[i.type]) for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, cast)))
