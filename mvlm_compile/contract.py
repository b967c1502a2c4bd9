"""The ONNX I/O contract shared by golden tensors, the exported graphs, engines and the runtime.

Torch-free. docs/reference/contracts.md ("ONNX I/O contract") describes the same names.

The decoder's KV cache lives outside the graph, in a buffer the runtime preallocates with a slot
per concurrent sequence at the engine's context. The sequence axis is the outermost one of a cache
tensor ([past, slots, kv_heads, head_dim]), so that the first `past` positions of every slot are a
prefix of the buffer: the graph reads the past through a view of that prefix (row b of a call reads
slot b; its own past is its first position_ids[b, 0] rows, the rest is masked) and returns only the
rows of its own tokens, which the runtime writes at each sequence's offset in its slot. No step
concatenates or copies the cache.
"""

from __future__ import annotations

VISION_INPUT = "pixel_values"  # float [batch, 3, 336, 336]
VISION_OUTPUT = "image_features"  # [batch, 576, mm_hidden]
PROJECTOR_INPUT = VISION_OUTPUT
PROJECTOR_OUTPUT = "image_embeds"  # [batch, 144, hidden]

DECODER_EMBEDS = "inputs_embeds"  # [batch, seq, hidden]
DECODER_POSITIONS = "position_ids"  # int64 [batch, seq]
# Which of the seq positions get logits (int64 [n], values in 0..seq-1): the runtime asks for the
# last one only; golden tensors, verification and quantization's accuracy ask for all of them.
DECODER_LOGITS_INDEX = "logits_index"
DECODER_LOGITS = "logits"  # [batch, n, vocab]

COMPONENTS = ("vision", "projector", "decoder_prefill", "decoder_decode")

# Axis of the sequence in a cache tensor (past inputs and new-row outputs).
KV_SEQ_AXIS = 0


def past_names(layer: int) -> tuple[str, str]:
    """Decoder inputs, the cache before this call: [past, slots, kv_heads, head_dim] (slots >= batch)."""
    return f"past.{layer}.key", f"past.{layer}.value"


def new_kv_names(layer: int) -> tuple[str, str]:
    """Decoder outputs, the cache rows of this call's tokens: [seq, batch, kv_heads, head_dim]."""
    return f"new.{layer}.key", f"new.{layer}.value"


def decoder_input_names(num_layers: int) -> list[str]:
    names = [DECODER_EMBEDS, DECODER_POSITIONS, DECODER_LOGITS_INDEX]
    for layer in range(num_layers):
        names.extend(past_names(layer))
    return names


def decoder_output_names(num_layers: int) -> list[str]:
    names = [DECODER_LOGITS]
    for layer in range(num_layers):
        names.extend(new_kv_names(layer))
    return names
