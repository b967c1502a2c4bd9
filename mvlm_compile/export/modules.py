"""Export-ready views of the reference: each takes and returns exactly the graph's I/O (contract.py)."""

from __future__ import annotations

import torch
from torch import nn

from mvlm_compile.model.config import vision_layers_used
from mvlm_compile.model.reference import MobileVLMReference


class VisionEncoder(nn.Module):
    """pixel_values -> image_features: only the layers up to the selected one, no post-layernorm."""

    def __init__(self, model: MobileVLMReference) -> None:
        super().__init__()
        tower = model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # transformers 4 kept a vision_model level
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        used = vision_layers_used(len(tower.encoder.layers), model.select_layer)
        self.layers = nn.ModuleList(tower.encoder.layers[:used])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden[:, 1:]


class Projector(nn.Module):
    def __init__(self, model: MobileVLMReference) -> None:
        super().__init__()
        self.projector = model.mm_projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)


class Decoder(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, *past k/v) -> (logits, *present k/v)."""

    def __init__(self, model: MobileVLMReference) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, present = self.model.decode(inputs_embeds, attention_mask, position_ids, pairs)
        return (logits, *[t for pair in present for t in pair])
