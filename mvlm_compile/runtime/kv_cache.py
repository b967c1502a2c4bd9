"""The decoder loop over a preallocated KV cache, shared by every backend; only the executor differs.

One block of memory is allocated once per backend and laid out by `DecoderPlan`: per layer a
key and a value tensor of the full context ([context, batch, kv_heads, head_dim], the sequence
outermost: contract.py), the embeddings and position ids of the longest prefill, the logits
index, one row of logits per sequence, and a staging row per cache tensor. Each step binds

  * past.{i}.key/value  to the first `past` rows of that layer's tensor (a prefix: contiguous),
  * new.{i}.key/value   to the rows right after them, so the graph writes its new rows in place,
  * logits              to the single row of logits, the only thing that comes back to the host,

and runs. Nothing is concatenated, copied whole or reallocated per step. TensorRT wants every
I/O address 256-byte aligned, the empty past of a prefill included: the prefix starts at its
tensor's (aligned) base, and a new row whose offset `past * row_bytes` is not aligned (rows of
fewer than 256 bytes: the tiny model) is written to the staging row and copied into place by
the executor (a row, not the cache). At 1.7B a row is 4 KiB in FP16, so the rows are always
written in place.

The executors: ONNX Runtime binds host memory through IOBinding (ort_backend), TensorRT device
memory through set_tensor_address (trt_backend). Both run this module's arithmetic, so the
suite tests it for real on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mvlm_compile import contract
from mvlm_compile.engines_record import DECODE_PROFILE, PREFILL_PROFILE, TokenLimits
from mvlm_compile.errors import ArtifactError, InternalError
from mvlm_compile.manifest import MANIFEST_NAME, Manifest

ADDRESS_ALIGNMENT = 256  # TensorRT's minimum alignment of an I/O address; ONNX Runtime runs the same plan


def host_memory_bytes() -> int:
    """This machine's physical memory (a Jetson's CPU and GPU share it)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def align(nbytes: int, alignment: int = ADDRESS_ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


@dataclass(frozen=True)
class Binding:
    """A tensor in the executor's block: its address, shape and element type."""

    address: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Executor(Protocol):
    """What a backend provides: memory it owns (addresses aligned to ADDRESS_ALIGNMENT), copies, one run."""

    def allocate(self, nbytes: int) -> int: ...

    def write(self, address: int, array: np.ndarray) -> None: ...  # host -> block

    def read(self, binding: Binding) -> np.ndarray: ...  # block -> a new host array (never a view)

    def copy(self, dst: int, src: int, nbytes: int) -> None: ...  # within the block

    def execute(self, profile: int, inputs: dict[str, Binding], outputs: dict[str, Binding]) -> None: ...


def choose_profile(past: int, seq: int) -> int:
    """The decoder engine's profile for a call (engine/plan.py builds them): a prefill has no
    past; a decode step is one token after a past."""
    if past == 0:
        return PREFILL_PROFILE
    if seq == 1:
        return DECODE_PROFILE
    raise InternalError(f"decoder call with {seq} tokens after a past of {past}: no profile takes it")


def _output_dtype(manifest: Manifest, graph: str, name: str) -> np.dtype:
    for item in manifest.graphs[graph]["outputs"]:
        if item["name"] == name:
            return np.dtype(item["dtype"])
    raise ArtifactError(f"{MANIFEST_NAME}: graph {graph!r} has no output {name!r}")


@dataclass(frozen=True)
class DecoderPlan:
    """Where each decoder tensor lives in one block (offsets in bytes from its aligned base)."""

    layers: int
    batch: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    context: int  # rows of each cache tensor: the longest prompt + generated tokens
    max_prompt: int
    embeds_dtype: np.dtype
    kv_dtype: np.dtype
    logits_dtype: np.dtype

    @classmethod
    def from_manifest(cls, manifest: Manifest, limits: TokenLimits, batch: int = 1) -> DecoderPlan:
        model = manifest.model
        layers = int(model["num_layers"])
        names = [item["name"] for item in manifest.graphs["decoder"]["inputs"]]
        if names != contract.decoder_input_names(layers):
            raise ArtifactError(
                f"{MANIFEST_NAME}: the decoder's inputs {names[:4]}... are not this version's contract "
                f"{contract.decoder_input_names(layers)[:4]}... (an export before the in-place KV cache): re-export"
            )
        plan = cls(
            layers=layers,
            batch=batch,
            kv_heads=int(model["num_kv_heads"]),
            head_dim=int(model["head_dim"]),
            hidden=int(model["hidden_size"]),
            vocab=int(model["vocab_size"]),
            context=limits.context,
            max_prompt=limits.max_prompt,
            embeds_dtype=np.dtype(manifest.input_dtype("decoder", contract.DECODER_EMBEDS)),
            kv_dtype=np.dtype(manifest.input_dtype("decoder", contract.past_names(0)[0])),
            logits_dtype=_output_dtype(manifest, "decoder", contract.DECODER_LOGITS),
        )
        # The block is allocated whole, up front: a context a manifest or engine record from
        # elsewhere claims (a config's max_position_embeddings of 10^12 asked for 589 TiB) is
        # refused here rather than failing as an allocation. The build's memory plan
        # (engine/plan.py) sizes engines to the target; this bounds what any record can ask.
        memory = host_memory_bytes()
        if plan.total_bytes > memory:
            raise ArtifactError(
                f"the decoder's KV cache, preallocated at a context of {plan.context} tokens ({limits.source}), "
                f"needs {plan.total_bytes / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of memory"
            )
        return plan

    @property
    def row_bytes(self) -> int:
        """One token's keys (or values) of one layer, all sequences of the batch."""
        return self.batch * self.kv_heads * self.head_dim * self.kv_dtype.itemsize

    @property
    def cache_tensor_bytes(self) -> int:
        return align(self.context * self.row_bytes)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.layers * self.cache_tensor_bytes

    def cache_tensor(self, layer: int, kind: int) -> int:
        """Offset of layer `layer`'s keys (kind 0) or values (kind 1)."""
        return (2 * layer + kind) * self.cache_tensor_bytes

    def row_in_place(self, past: int) -> bool:
        """Whether the rows after `past` start at an aligned address (else: staging + copy)."""
        return (past * self.row_bytes) % ADDRESS_ALIGNMENT == 0

    # The small tensors after the cache, each at an aligned offset.
    @property
    def embeds(self) -> int:
        return self.cache_bytes

    @property
    def positions(self) -> int:
        return self.embeds + align(self.batch * self.max_prompt * self.hidden * self.embeds_dtype.itemsize)

    @property
    def logits_index(self) -> int:
        return self.positions + align(self.batch * self.max_prompt * 8)

    @property
    def logits(self) -> int:
        return self.logits_index + ADDRESS_ALIGNMENT

    def staging(self, layer: int, kind: int) -> int:
        base = self.logits + align(self.batch * self.vocab * self.logits_dtype.itemsize)
        return base + (2 * layer + kind) * align(self.row_bytes)

    @property
    def total_bytes(self) -> int:
        return self.staging(self.layers, 0)

    def bindings(self, base: int, past: int, seq: int) -> tuple[dict[str, Binding], dict[str, Binding]]:
        """The decoder's inputs and outputs for `seq` tokens after `past`, in the block at `base`."""
        kv_row = (self.batch, self.kv_heads, self.head_dim)
        inputs = {
            contract.DECODER_EMBEDS: Binding(base + self.embeds, (self.batch, seq, self.hidden), self.embeds_dtype),
            contract.DECODER_POSITIONS: Binding(base + self.positions, (self.batch, seq), np.dtype(np.int64)),
            contract.DECODER_LOGITS_INDEX: Binding(base + self.logits_index, (1,), np.dtype(np.int64)),
        }
        outputs = {
            contract.DECODER_LOGITS: Binding(base + self.logits, (self.batch, 1, self.vocab), self.logits_dtype),
        }
        in_place = self.row_in_place(past)
        for layer in range(self.layers):
            for kind, (past_name, new_name) in enumerate(zip(contract.past_names(layer), contract.new_kv_names(layer))):
                tensor = base + self.cache_tensor(layer, kind)
                # An empty past (prefill) is bound at the tensor's base: aligned and non-null.
                inputs[past_name] = Binding(tensor, (past, *kv_row), self.kv_dtype)
                at = tensor + past * self.row_bytes if in_place else base + self.staging(layer, kind)
                outputs[new_name] = Binding(at, (seq, *kv_row), self.kv_dtype)
        return inputs, outputs


class DecoderLoop:
    """Prefill, then one token per step, over the plan's block in an executor's memory."""

    def __init__(self, executor: Executor, plan: DecoderPlan) -> None:
        self.executor, self.plan = executor, plan
        self.base = executor.allocate(plan.total_bytes)
        if self.base == 0 or self.base % ADDRESS_ALIGNMENT:
            raise InternalError(f"decoder block at {self.base:#x} is not a non-null {ADDRESS_ALIGNMENT}-byte address")
        self.past = 0

    def step(self, embeds: np.ndarray) -> np.ndarray:
        """Logits [batch, vocab] (float32, the last token's) for `embeds` [batch, seq, hidden] after
        the cache; a call with no past starts a new sequence (prefill), the cache grows by seq."""
        plan = self.plan
        batch, seq = embeds.shape[:2]
        if batch != plan.batch:
            raise InternalError(f"decoder call with batch {batch}, the cache holds {plan.batch}")
        if seq > plan.max_prompt or self.past + seq > plan.context:
            raise InternalError(
                f"decoder call of {seq} tokens after {self.past} exceeds the plan "
                f"(prefill {plan.max_prompt}, context {plan.context}): the limits are checked before"
            )
        profile = choose_profile(self.past, seq)
        inputs, outputs = plan.bindings(self.base, self.past, seq)
        positions = np.broadcast_to(np.arange(self.past, self.past + seq, dtype=np.int64), (batch, seq))
        self.executor.write(inputs[contract.DECODER_EMBEDS].address, embeds.astype(plan.embeds_dtype, copy=False))
        self.executor.write(inputs[contract.DECODER_POSITIONS].address, positions)
        self.executor.write(inputs[contract.DECODER_LOGITS_INDEX].address, np.array([seq - 1], np.int64))
        self.executor.execute(profile, inputs, outputs)
        if not plan.row_in_place(self.past):
            for layer in range(plan.layers):
                for kind, name in enumerate(contract.new_kv_names(layer)):
                    at = self.base + plan.cache_tensor(layer, kind) + self.past * plan.row_bytes
                    self.executor.copy(at, outputs[name].address, outputs[name].nbytes)
        self.past += seq
        logits = self.executor.read(outputs[contract.DECODER_LOGITS])
        return logits[:, 0].astype(np.float32, copy=False)

    def reset(self) -> None:
        """Forget the cache: the next step is a prefill."""
        self.past = 0

    def cache(self) -> list[np.ndarray]:
        """Host copies of the cache so far (per layer key, value: [past, batch, kv_heads, head_dim]); for tests."""
        inputs, _ = self.plan.bindings(self.base, self.past, 1)
        return [self.executor.read(inputs[name]) for name in contract.decoder_input_names(self.plan.layers)[3:]]


def describe(plan: DecoderPlan) -> dict[str, Any]:
    """The plan in numbers (for bench's report and the tests)."""
    return {
        "cache_bytes": plan.cache_bytes,
        "row_bytes": plan.row_bytes,
        "rows_in_place": "always" if plan.row_in_place(1) else f"when past * {plan.row_bytes} is a multiple of 256",
        "block_bytes": plan.total_bytes,
    }
