"""TensorRT backend: runs the engines by graph name, after checking engines.json against this machine.

It drives TensorRT itself (the TensorRT 10 API: set_input_shape, set_tensor_address,
execute_async_v3), with one execution context per engine, so one activation block each. The
decoder loop is runtime/kv_cache.py's, the one the ONNX Runtime backend runs in CI: its block
(the KV cache of N slots at the engine's context, the prompt embeddings, positions, a row of
logits per slot) is allocated on the device once and zeroed; each step uploads the new tokens'
embeddings, binds the past as a view of the cache and the new rows at their offset (or staged and
moved to each sequence's offset with cudaMemcpy2DAsync, a row per layer, device to device), and
copies back one row of logits per sequence. The cache never goes through the host.

`run(graph, feed)` (vision, projector, verification's decoder calls on golden inputs) copies its
inputs in and its outputs out: fresh host arrays, never views of a buffer a later call reuses. Every
input is bound to a non-null 256-byte aligned address, an empty one (the past of a prefill) too.
Device memory and the stream are Polygraphy's `polygraphy.cuda` (a core dependency).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mvlm_compile import contract
from mvlm_compile.engines_record import (
    PEG_PLUGIN,
    TokenLimits,
    check_engines_record,
    check_plugin_library,
    check_source_graphs,
    decoder_limits,
    engine_path,
    require_engines_record,
)
from mvlm_compile.errors import InternalError, MvlmError
from mvlm_compile.manifest import MANIFEST_NAME, Manifest, load_manifest
from mvlm_compile.peg_op import chosen_plugin_library
from mvlm_compile.runtime.kv_cache import (
    ADDRESS_ALIGNMENT,
    Binding,
    Copy2D,
    DecoderLoop,
    DecoderPlan,
    align,
    choose_profile,
)
from mvlm_compile.trt_env import (
    FLAVOURS,
    import_flavour,
    load_plugin_library,
    no_collection_inside_tensorrt,
    query_gpu,
)


def feed_bindings(
    feed: dict[str, np.ndarray], base: int, empty: int
) -> tuple[dict[str, Binding], list[tuple[int, np.ndarray]]]:
    """Bindings for a host feed packed into a device block at `base` (each tensor at an aligned
    offset), and the (address, array) uploads; an empty tensor is bound at `empty` (a buffer the
    backend owns: TensorRT 10.3 refuses a null address even for zero bytes, and reads nothing)."""
    if empty == 0 or empty % ADDRESS_ALIGNMENT or base % ADDRESS_ALIGNMENT:
        raise InternalError(f"device buffers at {base:#x}, {empty:#x}: not non-null {ADDRESS_ALIGNMENT}-byte aligned")
    bindings, uploads, offset = {}, [], 0
    for name, array in feed.items():
        if array.size == 0:
            bindings[name] = Binding(empty, array.shape, array.dtype)
            continue
        bindings[name] = Binding(base + offset, array.shape, array.dtype)
        uploads.append((base + offset, array))
        offset += align(array.nbytes)
    return bindings, uploads


def block_bytes(arrays: list[np.ndarray]) -> int:
    """The device block `feed_bindings` packs non-empty `arrays` into."""
    return sum(align(a.nbytes) for a in arrays if a.size)


class TrtEngine:
    """One engine and its one execution context; runs bindings (addresses it does not own) on a stream."""

    def __init__(self, trt: Any, engine: Any, stream: Any, name: str) -> None:
        self.trt, self.engine, self.stream, self.name = trt, engine, stream, name
        self.context = engine.create_execution_context()
        if self.context is None:
            raise MvlmError(f"--backend trt: TensorRT could not create an execution context for the {name} engine")
        self.profile = 0  # a new context starts on profile 0
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def set_shapes(self, profile: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """Select `profile` and set every input's shape."""
        if profile != self.profile:
            # Switching invalidates the shapes: every call sets them all again.
            if not self.context.set_optimization_profile_async(profile, self.stream.ptr):
                raise InternalError(f"{self.name} engine: TensorRT refused optimisation profile {profile}")
            self.profile = profile
        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise InternalError(f"{self.name} engine: TensorRT refused shape {shapes[name]} for {name}")

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """The outputs' shapes (for the input shapes set) and NumPy types."""
        return {
            name: (tuple(self.context.get_tensor_shape(name)), self.trt.nptype(self.engine.get_tensor_dtype(name)))
            for name in self.outputs
        }

    def execute(self, profile: int, inputs: dict[str, Binding], outputs: dict[str, Binding]) -> None:
        """Enqueue one run with these addresses (not waited for: a read on the stream waits)."""
        self.set_shapes(profile, {name: b.shape for name, b in inputs.items()})
        for name, binding in (*inputs.items(), *outputs.items()):
            if binding.address % ADDRESS_ALIGNMENT or not self.context.set_tensor_address(name, binding.address):
                raise InternalError(f"{self.name} engine: address {binding.address:#x} refused for {name}")
        if not self.context.execute_async_v3(self.stream.ptr):
            raise InternalError(f"{self.name} engine: execute_async_v3 failed (TensorRT's log above says why)")


class TrtExecutor:
    """kv_cache.Executor on the device: buffers from cudaMalloc (256-byte aligned), copies on the stream."""

    def __init__(self, engine: TrtEngine) -> None:
        from polygraphy import cuda

        self.cuda, self.engine, self.stream = cuda, engine, engine.stream
        self._arrays: list[Any] = []

    def allocate(self, nbytes: int) -> int:
        array = self.cuda.DeviceArray.raw((nbytes,))
        self._arrays.append(array)
        wrapper = self.cuda.wrapper()
        ptr = ctypes.c_void_p
        wrapper.check(
            wrapper.handle.cudaMemsetAsync(
                ptr(array.ptr), ctypes.c_int(0), ctypes.c_size_t(nbytes), ptr(self.stream.ptr)
            )
        )
        return array.ptr

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        self.cuda.wrapper().memcpy(dst, src, nbytes, kind, self.stream.ptr)

    def write(self, address: int, array: np.ndarray) -> None:
        # From pageable memory the copy is staged before the call returns, so `array` may go.
        array = np.ascontiguousarray(array)
        self._memcpy(address, array.ctypes.data, array.nbytes, self.cuda.MemcpyKind.HostToDevice)

    def read(self, binding: Binding) -> np.ndarray:
        out = np.empty(binding.shape, binding.dtype)
        self._memcpy(out.ctypes.data, binding.address, out.nbytes, self.cuda.MemcpyKind.DeviceToHost)
        self.stream.synchronize()
        return out

    def copy_2d(self, copies: Sequence[Copy2D]) -> None:
        wrapper, void_ptr, size = self.cuda.wrapper(), ctypes.c_void_p, ctypes.c_size_t
        for c in copies:
            wrapper.check(
                wrapper.handle.cudaMemcpy2DAsync(
                    void_ptr(c.dst),
                    size(c.dst_pitch),
                    void_ptr(c.src),
                    size(c.src_pitch),
                    size(c.width),
                    size(c.height),
                    self.cuda.MemcpyKind.DeviceToDevice,
                    void_ptr(self.stream.ptr),
                )
            )

    def execute(self, profile: int, inputs: dict[str, Binding], outputs: dict[str, Binding]) -> None:
        self.engine.execute(profile, inputs, outputs)

    def free(self) -> None:
        for array in self._arrays:
            array.free()
        self._arrays.clear()


class TrtBackend:
    name = "trt"

    def __init__(
        self,
        artifacts: Path,
        engines_dir: Path,
        manifest: Manifest | None = None,
        plugin: Path | None = None,
        graphs: Sequence[str] | None = None,
    ) -> None:
        """`plugin`: the PEG plugin library the user chose (--plugin), else $MVLM_PEG_PLUGIN or this
        installation's build (peg_op.chosen_plugin_library); never one found in the bundle or the
        engines directory. It is loaded only once engines.json is checked, its SHA-256 included, and
        only when the projector engine is loaded. `graphs`: the engines to load (default: all; Triton's
        entry model runs the decoder alone, its vision and projector being Triton's own models)."""
        from polygraphy import cuda

        self.artifacts = Path(artifacts)
        self.manifest = manifest or load_manifest(self.artifacts)
        self._engines: dict[str, TrtEngine] = {}
        self._executor: TrtExecutor | None = None
        self._decoder: DecoderLoop | None = None
        self._stream = self._empty = self._runtime = None
        record = require_engines_record(engines_dir)
        wanted = list(self.manifest.graphs) if graphs is None else list(graphs)
        unknown = sorted(set(wanted) - set(self.manifest.graphs))
        if unknown:
            raise MvlmError(
                f"graphs {unknown}: not in {self.artifacts / MANIFEST_NAME} ({sorted(self.manifest.graphs)})"
            )
        hashes = {name: self.manifest.graphs[name]["sha256"] for name in wanted}
        check_source_graphs(engines_dir, record, hashes)
        holds_plugin = "projector" in wanted and record["plugin"].get("mode") == PEG_PLUGIN
        plugin = chosen_plugin_library(plugin) if holds_plugin else None
        if holds_plugin:
            check_plugin_library(engines_dir, record, plugin)  # before TensorRT is even imported
        flavour = FLAVOURS.get(record["builder"]["flavour"])
        if flavour is None:
            raise MvlmError(f"--engines {engines_dir}: unknown builder {record['builder']['flavour']!r}: rebuild")
        trt, why = import_flavour(flavour)
        if trt is None:
            raise MvlmError(f"--backend trt: the engines in {engines_dir} were built with {flavour.name}: {why}")
        gpu = query_gpu()
        self.record = check_engines_record(
            engines_dir, flavour.name, trt.__version__, gpu and gpu.name, gpu and gpu.sm, plugin, graphs=hashes
        )
        if not flavour.runs_in_backend:  # reached only on a GPU these engines match
            raise MvlmError(f"--backend trt: running {flavour.name} engines is not supported yet ({engines_dir})")
        if plugin is not None:  # checked above; before deserialising, since the projector engine holds it
            load_plugin_library(plugin, trt)
        self.limits: TokenLimits = decoder_limits(self.record, Path(engines_dir))
        try:
            self._stream = cuda.Stream()
            self._empty = cuda.DeviceArray.raw((ADDRESS_ALIGNMENT,))  # cudaMalloc: 256-byte aligned, never null
            with no_collection_inside_tensorrt():
                runtime = self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # outlives its engines
                for name in wanted:
                    engine = runtime.deserialize_cuda_engine(engine_path(engines_dir, self.record, name).read_bytes())
                    if engine is None:
                        raise MvlmError(f"--engines {engines_dir}: TensorRT could not deserialize the {name} engine")
                    self._engines[name] = TrtEngine(trt, engine, self._stream, name)
        except BaseException:
            self.close()
            raise

    def input_dtype(self, graph: str, name: str) -> type:
        return self.manifest.input_dtype(graph, name)

    def decoder(self, slots: int = 1) -> DecoderLoop:
        """The decoder loop over one device block of `slots` sequences sized by the engine's profiles
        (made on first use, and again for another number of slots)."""
        if self._decoder is None or self._decoder.plan.slots != slots:
            plan = DecoderPlan.from_manifest(self.manifest, self.limits, slots)
            self._decoder = None
            if self._executor is not None:
                self._stream.synchronize()
                self._executor.free()
            self._executor = TrtExecutor(self._engines["decoder"])
            self._decoder = DecoderLoop(self._executor, plan)
        return self._decoder

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call with host inputs (cast to the graph's types) and fresh host outputs."""
        from polygraphy import cuda

        engine = self._engines[graph]
        cast = {name: np.ascontiguousarray(feed[name], dtype=self.input_dtype(graph, name)) for name in engine.inputs}
        profile = 0
        if graph == "decoder":
            rows, seq = cast[contract.DECODER_EMBEDS].shape[:2]
            profile = choose_profile(rows, seq, cast[contract.past_names(0)[0]].shape[contract.KV_SEQ_AXIS])
        engine.set_shapes(profile, {name: a.shape for name, a in cast.items()})
        outputs_host = {name: np.empty(shape, dtype) for name, (shape, dtype) in engine.output_shapes().items()}
        block = cuda.DeviceArray.raw((max(ADDRESS_ALIGNMENT, block_bytes([*cast.values(), *outputs_host.values()])),))
        try:
            inputs, uploads = feed_bindings(cast, block.ptr, self._empty.ptr)
            outputs, _ = feed_bindings(outputs_host, block.ptr + block_bytes(list(cast.values())), self._empty.ptr)
            copy = cuda.wrapper().memcpy
            for address, array in uploads:
                copy(address, array.ctypes.data, array.nbytes, cuda.MemcpyKind.HostToDevice, self._stream.ptr)
            engine.execute(profile, inputs, outputs)
            for name, host in outputs_host.items():
                if host.size:
                    copy(
                        host.ctypes.data,
                        outputs[name].address,
                        host.nbytes,
                        cuda.MemcpyKind.DeviceToHost,
                        self._stream.ptr,
                    )
            self._stream.synchronize()
        finally:
            block.free()
        return outputs_host

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._decoder = None
        if self._executor is not None:
            self._executor.free()
            self._executor = None
        self._engines.clear()  # contexts before their engines' memory and the stream go
        if self._empty is not None:
            self._empty.free()
            self._empty = None
        if self._stream is not None:
            self._stream.free()
            self._stream = None
        self._runtime = None

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
