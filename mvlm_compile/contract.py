"""The ONNX I/O contract shared by golden tensors, the exported graphs, engines and the runtime.

Torch-free. The README's "ONNX I/O contract" section describes the same names.
"""

from __future__ import annotations

VISION_INPUT = "pixel_values"  # float [batch, 3, 336, 336]
VISION_OUTPUT = "image_features"  # [batch, 576, mm_hidden]
PROJECTOR_INPUT = VISION_OUTPUT
PROJECTOR_OUTPUT = "image_embeds"  # [batch, 144, hidden]

DECODER_EMBEDS = "inputs_embeds"  # [batch, seq, hidden]
DECODER_MASK = "attention_mask"  # int64 [batch, past + seq]
DECODER_POSITIONS = "position_ids"  # int64 [batch, seq]
DECODER_LOGITS = "logits"  # [batch, seq, vocab]

COMPONENTS = ("vision", "projector", "decoder_prefill", "decoder_decode")


def past_names(layer: int) -> tuple[str, str]:
    """Decoder inputs: [batch, kv_heads, past, head_dim]."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """Decoder outputs: [batch, kv_heads, past + seq, head_dim]."""
    return f"present.{layer}.key", f"present.{layer}.value"


def decoder_input_names(num_layers: int) -> list[str]:
    names = [DECODER_EMBEDS, DECODER_MASK, DECODER_POSITIONS]
    for layer in range(num_layers):
        names.extend(past_names(layer))
    return names


def decoder_output_names(num_layers: int) -> list[str]:
    names = [DECODER_LOGITS]
    for layer in range(num_layers):
        names.extend(present_names(layer))
    return names
