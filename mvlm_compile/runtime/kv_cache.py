"""The decoder loop over a preallocated KV cache of N slots, shared by every backend; only the executor differs.

One block of memory is allocated once per backend and laid out by `DecoderPlan`: per layer a
key and a value tensor of the full context with one slot per concurrent sequence
([context, slots, kv_heads, head_dim], the sequence outermost: contract.py), the embeddings and
position ids of the largest call, the logits index, one row of logits per slot, and staging rows.
A call advances the rows of consecutive slots [first, first + n) (the scheduler keeps the slots in
use contiguous), each after its own past (`lengths[slot]`). It binds

  * past.{i}.key/value  to a view of the first `max(lengths)` positions starting at the first
    slot: row b of the call reads slot first + b; the graph masks each row's past beyond its own
    length (position_ids[b, 0]), so rows whose pasts differ share one call;
  * new.{i}.key/value   in place right after the past when every row has the same past and
    the rows are contiguous there (a single sequence; a batch in step), else to staging rows that
    are copied to each row's own offset in its own slot (a row per sequence per layer, not the
    cache);
  * logits              to one row per sequence, the only thing that comes back to the host,

and runs. Nothing is concatenated, copied whole or reallocated per step. TensorRT wants every
I/O address 256-byte aligned, the empty past of a prefill included: an empty past is bound at its
tensor's (aligned) base, and new rows whose address is not aligned go through the staging rows.
A past view that starts at another slot is aligned when one slot's row is a multiple of 256
bytes (every MobileVLM V2: 1.7B 4 KiB, 3B 5 KiB, 7B 8 KiB in FP16); for a test model with
smaller rows the scheduler prefills a prompt in one call instead of chunks
(`DecoderPlan.chunked_prefill`), so that a view at another slot is only ever empty.

The cache starts zeroed: masked rows are weighed by an exact zero, which must not meet a NaN.

The executors: ONNX Runtime binds host memory through IOBinding (ort_backend), TensorRT device
memory through set_tensor_address (trt_backend). Both run this module's arithmetic, so the
suite tests it for real on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


@dataclass(frozen=True)
class Copy2D:
    """`height` runs of `width` bytes, `src_pitch` apart at the source and `dst_pitch` apart at the
    destination (cudaMemcpy2D's arguments): one sequence's rows between a staging area and its slot."""

    dst: int
    dst_pitch: int
    src: int
    src_pitch: int
    width: int
    height: int


class Executor(Protocol):
    """What a backend provides: zeroed memory it owns (addresses aligned to ADDRESS_ALIGNMENT), copies, one run."""

    def allocate(self, nbytes: int) -> int: ...  # zero-filled

    def write(self, address: int, array: np.ndarray) -> None: ...  # host -> block

    def read(self, binding: Binding) -> np.ndarray: ...  # block -> a new host array (never a view)

    def copy_2d(self, copies: Sequence[Copy2D]) -> None: ...  # within the block

    def execute(self, profile: int, inputs: dict[str, Binding], outputs: dict[str, Binding]) -> None: ...


def choose_profile(rows: int, seq: int, past: int) -> int:
    """The decoder engine's profile for a call of `rows` sequences of `seq` tokens after pasts of at
    most `past` (engine/plan.py builds them): a prefill (or a chunk of one) is one sequence; a decode
    step is one token for each of up to max-batch sequences."""
    if rows == 1 and (seq > 1 or past == 0):
        return PREFILL_PROFILE
    if seq == 1:
        return DECODE_PROFILE
    raise InternalError(f"decoder call with {rows} rows of {seq} tokens: no profile takes it")


def _output_dtype(manifest: Manifest, graph: str, name: str) -> np.dtype:
    for item in manifest.graphs[graph]["outputs"]:
        if item["name"] == name:
            return np.dtype(item["dtype"])
    raise ArtifactError(f"{MANIFEST_NAME}: graph {graph!r} has no output {name!r}")


@dataclass(frozen=True)
class DecoderPlan:
    """Where each decoder tensor lives in one block (offsets in bytes from its aligned base)."""

    layers: int
    slots: int  # sequences the cache holds at once: the largest batch of a decode step
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    context: int  # positions of each slot: the longest prompt + generated tokens
    max_prompt: int  # the most tokens of one prefill call
    embeds_dtype: np.dtype
    kv_dtype: np.dtype
    logits_dtype: np.dtype

    @classmethod
    def from_manifest(cls, manifest: Manifest, limits: TokenLimits, slots: int = 1) -> DecoderPlan:
        model = manifest.model
        layers = int(model["num_layers"])
        names = [item["name"] for item in manifest.graphs["decoder"]["inputs"]]
        if names != contract.decoder_input_names(layers):
            raise ArtifactError(
                f"{MANIFEST_NAME}: the decoder's inputs {names[:4]}... are not this version's contract "
                f"{contract.decoder_input_names(layers)[:4]}... (an export before the in-place KV cache): re-export"
            )
        if not 1 <= slots <= limits.max_batch:
            raise InternalError(f"{slots} cache slots: the decoder takes 1 to {limits.max_batch} ({limits.source})")
        plan = cls(
            layers=layers,
            slots=slots,
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
                f"the decoder's KV cache for {slots} sequence(s), preallocated at a context of {plan.context} tokens "
                f"({limits.source}), needs {plan.total_bytes / 2**30:.1f} GiB, more than this machine's "
                f"{memory / 2**30:.1f} GiB of memory (lower --max-batch or the context)"
            )
        return plan

    @property
    def slot_bytes(self) -> int:
        """One token's keys (or values) of one layer, one sequence."""
        return self.kv_heads * self.head_dim * self.kv_dtype.itemsize

    def sequence_bytes(self, tokens: int) -> int:
        """`tokens` positions of one sequence's keys and values, every layer (what a slot holds of it)."""
        return 2 * self.layers * tokens * self.slot_bytes

    @property
    def row_bytes(self) -> int:
        """One position's keys (or values) of one layer, all slots."""
        return self.slots * self.slot_bytes

    @property
    def chunked_prefill(self) -> bool:
        """Whether a past view may start at any slot (its address stays aligned): then a prompt may
        be prefilled in chunks after a past; else in one call, whose past is empty."""
        return self.slots == 1 or self.slot_bytes % ADDRESS_ALIGNMENT == 0

    @property
    def max_tokens(self) -> int:
        """Tokens of the largest call: a prefill of one sequence, or a decode step of every slot."""
        return max(self.max_prompt, self.slots)

    @property
    def cache_tensor_bytes(self) -> int:
        return align(self.context * self.row_bytes)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.layers * self.cache_tensor_bytes

    def cache_tensor(self, layer: int, kind: int) -> int:
        """Offset of layer `layer`'s keys (kind 0) or values (kind 1)."""
        return (2 * layer + kind) * self.cache_tensor_bytes

    def cell(self, layer: int, kind: int, position: int, slot: int) -> int:
        """Offset of one sequence's keys (or values) at one position."""
        return self.cache_tensor(layer, kind) + (position * self.slots + slot) * self.slot_bytes

    # The small tensors after the cache, each at an aligned offset.
    @property
    def embeds(self) -> int:
        return self.cache_bytes

    @property
    def positions(self) -> int:
        return self.embeds + align(self.max_tokens * self.hidden * self.embeds_dtype.itemsize)

    @property
    def logits_index(self) -> int:
        return self.positions + align(self.max_tokens * 8)

    @property
    def logits(self) -> int:
        return self.logits_index + ADDRESS_ALIGNMENT

    @property
    def staging_bytes(self) -> int:
        return align(self.max_tokens * self.slot_bytes)

    def staging(self, layer: int, kind: int) -> int:
        base = self.logits + align(self.slots * self.vocab * self.logits_dtype.itemsize)
        return base + (2 * layer + kind) * self.staging_bytes

    @property
    def total_bytes(self) -> int:
        return self.staging(self.layers, 0)

    def new_rows_in_place(self, first: int, pasts: Sequence[int], seq: int) -> bool:
        """Whether the call's new rows [seq, n] are one aligned run of the cache: every row at the same
        past, and either one token each (the slots of a position are adjacent) or one slot in all."""
        same = all(p == pasts[0] for p in pasts)
        contiguous = seq == 1 or self.slots == 1
        return same and contiguous and (self.cell(0, 0, pasts[0], first) % ADDRESS_ALIGNMENT == 0)

    def bindings(
        self, base: int, first: int, pasts: Sequence[int], seq: int
    ) -> tuple[dict[str, Binding], dict[str, Binding]]:
        """The decoder's inputs and outputs for `seq` tokens of each of the slots first, first + 1, ...
        after their pasts, in the block at `base`."""
        rows, past = len(pasts), max(pasts)
        kv = (self.kv_heads, self.head_dim)
        inputs = {
            contract.DECODER_EMBEDS: Binding(base + self.embeds, (rows, seq, self.hidden), self.embeds_dtype),
            contract.DECODER_POSITIONS: Binding(base + self.positions, (rows, seq), np.dtype(np.int64)),
            contract.DECODER_LOGITS_INDEX: Binding(base + self.logits_index, (1,), np.dtype(np.int64)),
        }
        outputs = {
            contract.DECODER_LOGITS: Binding(base + self.logits, (rows, 1, self.vocab), self.logits_dtype),
        }
        in_place = self.new_rows_in_place(first, pasts, seq)
        for layer in range(self.layers):
            for kind, (past_name, new_name) in enumerate(zip(contract.past_names(layer), contract.new_kv_names(layer))):
                # Row b reads slot first + b: the view keeps the cache's pitch of `slots` per position.
                # An empty past (a prefill's first call) is bound at the tensor's base: aligned, non-null.
                view = self.cell(layer, kind, 0, first if past else 0)
                inputs[past_name] = Binding(base + view, (past, self.slots, *kv), self.kv_dtype)
                at = self.cell(layer, kind, pasts[0], first) if in_place else self.staging(layer, kind)
                outputs[new_name] = Binding(base + at, (seq, rows, *kv), self.kv_dtype)
        return inputs, outputs

    def scatter(self, base: int, first: int, pasts: Sequence[int], seq: int) -> list[Copy2D]:
        """The copies that move staged new rows [seq, rows] to each row's offset in its own slot."""
        copies = []
        rows, sb = len(pasts), self.slot_bytes
        for layer in range(self.layers):
            for kind in (0, 1):
                staged = base + self.staging(layer, kind)
                for b, past in enumerate(pasts):
                    copies.append(
                        Copy2D(
                            dst=base + self.cell(layer, kind, past, first + b),
                            dst_pitch=self.row_bytes,
                            src=staged + b * sb,
                            src_pitch=rows * sb,
                            width=sb,
                            height=seq,
                        )
                    )
        return copies


class DecoderLoop:
    """Steps of sequences held in the plan's slots, over its block in an executor's memory."""

    def __init__(self, executor: Executor, plan: DecoderPlan) -> None:
        self.executor, self.plan = executor, plan
        self.base = executor.allocate(plan.total_bytes)
        if self.base == 0 or self.base % ADDRESS_ALIGNMENT:
            raise InternalError(f"decoder block at {self.base:#x} is not a non-null {ADDRESS_ALIGNMENT}-byte address")
        self.lengths = [0] * plan.slots  # tokens each slot's sequence holds

    def step(self, first: int, embeds: np.ndarray) -> np.ndarray:
        """Logits [rows, vocab] (float32, each row's last token) for `embeds` [rows, seq, hidden], row b
        continuing the sequence in slot first + b; a slot of length 0 starts a new sequence."""
        plan = self.plan
        rows, seq = embeds.shape[:2]
        slots = range(first, first + rows)
        if first < 0 or first + rows > plan.slots or (rows > 1 and seq > 1):
            raise InternalError(
                f"decoder call of {rows} rows x {seq} tokens at slot {first}: the plan has {plan.slots}"
            )
        pasts = [self.lengths[s] for s in slots]
        if seq > plan.max_prompt or max(pasts) + seq > plan.context:
            raise InternalError(
                f"decoder call of {seq} tokens after {max(pasts)} exceeds the plan "
                f"(prefill {plan.max_prompt}, context {plan.context}): the limits are checked before"
            )
        if max(pasts) and first and not plan.chunked_prefill:
            raise InternalError(f"a past view at slot {first} would be unaligned: prefill in one call")
        profile = choose_profile(rows, seq, max(pasts))
        inputs, outputs = plan.bindings(self.base, first, pasts, seq)
        positions = np.asarray(pasts, np.int64)[:, None] + np.arange(seq, dtype=np.int64)
        self.executor.write(inputs[contract.DECODER_EMBEDS].address, embeds.astype(plan.embeds_dtype, copy=False))
        self.executor.write(inputs[contract.DECODER_POSITIONS].address, positions)
        self.executor.write(inputs[contract.DECODER_LOGITS_INDEX].address, np.array([seq - 1], np.int64))
        self.executor.execute(profile, inputs, outputs)
        if not plan.new_rows_in_place(first, pasts, seq):
            self.executor.copy_2d(plan.scatter(self.base, first, pasts, seq))
        for s in slots:
            self.lengths[s] += seq
        logits = self.executor.read(outputs[contract.DECODER_LOGITS])
        return logits[:, 0].astype(np.float32, copy=False)

    def clear(self, slot: int) -> None:
        """Forget a slot's sequence: its next step is a prefill."""
        self.lengths[slot] = 0

    def reset(self) -> None:
        """Forget every sequence."""
        self.lengths = [0] * self.plan.slots

    def move(self, src: int, dst: int) -> None:
        """Move the sequence in slot `src` to the free slot `dst` (its rows, per layer; `src` is then free)."""
        plan, length = self.plan, self.lengths[src]
        if length:
            self.executor.copy_2d(
                [
                    Copy2D(
                        dst=self.base + plan.cell(layer, kind, 0, dst),
                        dst_pitch=plan.row_bytes,
                        src=self.base + plan.cell(layer, kind, 0, src),
                        src_pitch=plan.row_bytes,
                        width=plan.slot_bytes,
                        height=length,
                    )
                    for layer in range(plan.layers)
                    for kind in (0, 1)
                ]
            )
        self.lengths[dst], self.lengths[src] = length, 0

    def cache(self, slot: int = 0) -> list[np.ndarray]:
        """Host copies of a slot's cache (per layer key, value: [length, 1, kv_heads, head_dim]); for tests."""
        plan, length = self.plan, self.lengths[slot]
        out = []
        for layer in range(plan.layers):
            for kind in (0, 1):
                whole = self.executor.read(
                    Binding(
                        self.base + plan.cache_tensor(layer, kind),
                        (length, plan.slots, plan.kv_heads, plan.head_dim),
                        plan.kv_dtype,
                    )
                )
                out.append(whole[:, slot : slot + 1].copy())
        return out


def describe(plan: DecoderPlan) -> dict[str, Any]:
    """The plan in numbers (for bench's report and the tests)."""
    return {
        "slots": plan.slots,
        "cache_bytes": plan.cache_bytes,
        "slot_row_bytes": plan.slot_bytes,
        "chunked_prefill": plan.chunked_prefill,
        "block_bytes": plan.total_bytes,
    }
