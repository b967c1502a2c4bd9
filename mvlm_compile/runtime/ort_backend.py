"""ONNX Runtime (CPU) backend: runs the artifacts' graphs by name, and the decoder loop
(runtime/kv_cache.py) over host memory bound through IOBinding."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from mvlm_compile.engines_record import TokenLimits
from mvlm_compile.errors import ArtifactError, InternalError, MvlmError
from mvlm_compile.fileio import directory_lock
from mvlm_compile.manifest import MANIFEST_NAME, Manifest, load_manifest
from mvlm_compile.runtime.kv_cache import ADDRESS_ALIGNMENT, Binding, Copy2D, DecoderLoop, DecoderPlan

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


# ONNX Runtime fuses the INT4 DequantizeLinear + MatMul into MatMulNBits, whose "accuracy level"
# sets the activations' type: 0 keeps them float (what verification needs: int8 activations cost
# about 0.5% relative error), 4 quantizes them to int8 per block, as llama.cpp's Q4_0 does, for
# about 2.5x the decode speed (measured at 1.7B). run and bench use int8; verify keeps float.
INT4_ACTIVATIONS = {"fp32": "0", "int8": "4"}

# ONNX Runtime starts every thread it is asked for, up front: --threads 100000 made 13,000
# threads and 16.5 GB before the first run, and a process that ignored SIGTERM for minutes.
# More threads than a few per core only slows it down, so more than this is a usage error.
THREADS_PER_CORE = 4

# The most sequences one ONNX Runtime decoder step takes (a sanity bound on --max-batch: on a CPU
# the INT4 kernel's gain flattens out by 8 rows).
MAX_SLOTS = 64


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def check_threads(threads: int) -> int:
    """`threads` for ONNX Runtime: 0 (its default, one per core) up to THREADS_PER_CORE x usable_cores()."""
    cores = usable_cores()
    limit = THREADS_PER_CORE * cores
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= limit:
        raise MvlmError(
            f"--threads {threads}: expected 0 (ONNX Runtime's default) to {limit} "
            f"({THREADS_PER_CORE}x the {cores} cores this process may use)"
        )
    return threads


def check_int4_activations(int4_activations: str) -> str:
    """One of INT4_ACTIVATIONS' keys."""
    if int4_activations not in INT4_ACTIVATIONS:
        raise MvlmError(f"--int4-activations {int4_activations!r}: expected one of {', '.join(INT4_ACTIVATIONS)}")
    return int4_activations


def ort_session(path: Path, threads: int = 0, extra_outputs: Sequence[str] = (), int4_activations: str = "fp32"):
    """A CPU session on `threads` threads (0: ONNX Runtime's default). INT4 MatMulNBits runs with
    `int4_activations` ("fp32" for verification, "int8" for speed; INT4_ACTIVATIONS). A graph with
    nodes in the ai.onnx.contrib domain (the MvlmPEG plugin node) gets onnxruntime-extensions
    and the op's NumPy reference. `extra_outputs` exposes intermediate tensors as outputs too
    (in a copy held in memory; external weights are still read from the graph's directory)."""
    import onnxruntime as ort

    from mvlm_compile.peg_op import ort_model_source

    options = ort.SessionOptions()
    options.intra_op_num_threads = check_threads(threads)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", INT4_ACTIVATIONS[int4_activations])
    source = ort_model_source(path, options)
    if extra_outputs:
        model = (
            onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
        )
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs if name not in known)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
        source = model.SerializeToString()
        del model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise ArtifactError(f"{path}: ONNX Runtime cannot load the graph ({type(e).__name__}: {e})") from None


class OrtExecutor:
    """kv_cache.Executor over host memory: IOBinding binds inputs and outputs by address, so the
    graph reads the past where it lies and writes its new rows and logits into the block."""

    def __init__(self, session) -> None:
        self.session = session
        self._blocks: list[np.ndarray] = []

    def allocate(self, nbytes: int) -> int:
        block = np.zeros(nbytes + ADDRESS_ALIGNMENT, np.uint8)  # calloc: untouched pages cost no memory until used
        self._blocks.append(block)
        address = block.ctypes.data
        return address + (-address) % ADDRESS_ALIGNMENT

    def _rows(self, address: int, pitch: int, width: int, height: int) -> np.ndarray:
        """A [height, width] byte view of the block that holds `address`, rows `pitch` apart."""
        for block in self._blocks:
            offset = address - block.ctypes.data
            if 0 <= offset and offset + (height - 1) * pitch + width <= block.size:
                return np.lib.stride_tricks.as_strided(block[offset:], (height, width), (pitch, 1))
        raise InternalError(f"rows at {address:#x} are outside this executor's blocks")

    def write(self, address: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        ctypes.memmove(address, array.ctypes.data, array.nbytes)

    def read(self, binding: Binding) -> np.ndarray:
        out = np.empty(binding.shape, binding.dtype)
        ctypes.memmove(out.ctypes.data, binding.address, out.nbytes)
        return out

    def copy_2d(self, copies: Sequence[Copy2D]) -> None:
        for c in copies:
            self._rows(c.dst, c.dst_pitch, c.width, c.height)[...] = self._rows(c.src, c.src_pitch, c.width, c.height)

    def execute(self, profile: int, inputs: dict[str, Binding], outputs: dict[str, Binding]) -> None:
        del profile  # ONNX Runtime has no optimisation profiles
        binding = self.session.io_binding()
        for name, b in inputs.items():
            binding.bind_input(name, "cpu", 0, b.dtype.type, list(b.shape), b.address)
        for name, b in outputs.items():
            binding.bind_output(name, "cpu", 0, b.dtype.type, list(b.shape), b.address)
        self.session.run_with_iobinding(binding)


class OrtBackend:
    """The artifacts' graphs in ONNX Runtime on the CPU; a session per graph, made on first use."""

    name = "ort"

    def __init__(
        self, artifacts: Path, manifest: Manifest | None = None, threads: int = 0, int4_activations: str = "fp32"
    ) -> None:
        check_int4_activations(int4_activations)
        check_threads(threads)
        self.artifacts = Path(artifacts)
        self.threads, self.int4_activations = threads, int4_activations
        # A reader: no stage may rewrite the graphs under a running session.
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(directory_lock(self.artifacts, exclusive=False))
        try:
            self.manifest = manifest or load_manifest(self.artifacts)
        except BaseException:
            self._lock.close()
            raise
        context = int(self.manifest.model["max_context"])
        # No profiles here: one prefill may take the whole context, a step any number of sequences
        # the host's memory holds (DecoderPlan checks the cache against it).
        self.limits = TokenLimits(
            context, context, f"the model's context in {self.artifacts / MANIFEST_NAME}", max_batch=MAX_SLOTS
        )
        self._sessions: dict = {}
        self._decoder: DecoderLoop | None = None

    def _session(self, graph: str):
        if graph not in self._sessions:
            path = self.manifest.check_graph(self.artifacts, graph)
            self._sessions[graph] = ort_session(path, self.threads, int4_activations=self.int4_activations)
        return self._sessions[graph]

    def input_dtype(self, graph: str, name: str) -> type:
        return self.manifest.input_dtype(graph, name)

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a graph; inputs are cast to the graph's input types (FP16 graphs take FP32 feeds)."""
        session = self._session(graph)
        cast = {i.name: np.asarray(feed[i.name], dtype=_ORT_TYPES[i.type]) for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, cast)))

    def decoder(self, slots: int = 1) -> DecoderLoop:
        """The decoder loop over one preallocated cache of `slots` sequences at the model's context
        (made on first use, and again for another number of slots)."""
        if self._decoder is None or self._decoder.plan.slots != slots:
            self._decoder = None  # the old block goes before the new one is allocated
            plan = DecoderPlan.from_manifest(self.manifest, self.limits, slots)
            self._decoder = DecoderLoop(OrtExecutor(self._session("decoder")), plan)
        return self._decoder

    def close(self) -> None:
        self._decoder = None
        self._sessions.clear()
        self._lock.close()

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
