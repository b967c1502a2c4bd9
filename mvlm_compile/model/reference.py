"""The PyTorch reference for MobileVLM V2: every later stage is judged against it.

CLIP vision tower (transformers CLIPVisionModel) -> hidden_states[select_layer] without CLS
-> LDPv2 -> image embeddings spliced into the text embeddings -> LlamaForCausalLM.
Eager attention everywhere: plain, reproducible math for golden tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, DynamicCache, LlamaConfig, LlamaForCausalLM

from mvlm_compile.model.config import IMAGE_TOKEN_INDEX, MobileVLMConfig
from mvlm_compile.model.ldpv2 import LDPNetV2Projector

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value), [B, kv_heads, past, head_dim]


def llama_config(cfg: MobileVLMConfig) -> LlamaConfig:
    text = dict(cfg.text)
    text.pop("torch_dtype", None)
    text.pop("dtype", None)
    return LlamaConfig(**text, attn_implementation="eager")


def clip_vision_config(vision: dict[str, Any]) -> CLIPVisionConfig:
    return CLIPVisionConfig(**vision, attn_implementation="eager")


class MobileVLMReference(nn.Module):
    def __init__(self, cfg: MobileVLMConfig, vision: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionModel(clip_vision_config(vision))
        self.mm_projector = LDPNetV2Projector(cfg.mm_hidden_size, cfg.hidden_size)
        self.language_model = LlamaForCausalLM(llama_config(cfg))
        self.select_layer = cfg.mm_vision_select_layer

    @property
    def vision_prefix(self) -> str:
        """State-dict prefix of CLIP's `vision_model.*` weights in this module.

        transformers 5 flattened CLIPVisionModel (no `vision_model` submodule); published
        checkpoints keep the `vision_model.` level.
        """
        return "vision_tower.vision_model." if hasattr(self.vision_tower, "vision_model") else "vision_tower."

    # --- components, each with the I/O of its ONNX graph -------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 336, 336] -> image_features [B, 576, mm_hidden] (patch tokens)."""
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features [B, 576, mm_hidden] -> image_embeds [B, 144, hidden]."""
        return self.mm_projector(image_features)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: KVCache,
    ) -> tuple[torch.Tensor, KVCache]:
        """One decoder call (prefill when `past` is empty, decode when seq == 1) -> logits, present."""
        cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = [(layer.keys, layer.values) for layer in out.cache.layers]
        return out.logits, present

    # --- the whole model -------------------------------------------------------------------
    def splice_image(self, input_ids: Sequence[int], image_embeds: torch.Tensor) -> torch.Tensor:
        """Token ids with one IMAGE_TOKEN_INDEX -> inputs_embeds [1, seq, hidden] with the image spliced in."""
        positions = [i for i, t in enumerate(input_ids) if t == IMAGE_TOKEN_INDEX]
        if len(positions) != 1:
            raise ValueError(f"expected exactly one image token in the prompt, found {len(positions)}")
        at = positions[0]
        before = self.embed_tokens(torch.tensor([list(input_ids[:at])]))
        after = self.embed_tokens(torch.tensor([list(input_ids[at + 1 :])]))
        return torch.cat([before, image_embeds.to(before.dtype), after], dim=1)

    @torch.no_grad()
    def greedy_generate(
        self, inputs_embeds: torch.Tensor, max_new_tokens: int, eos: int | None = None
    ) -> tuple[list[int], list[float]]:
        """Greedy tokens through prefill + KV-cache decode steps, up to and including `eos` when
        given (the golden run passes none: no early stop).

        Also returns each step's top-1 minus top-2 logit gap: how much numerical error a
        backend may make before that token can flip.
        """
        seq = inputs_embeds.shape[1]
        mask = torch.ones(1, seq, dtype=torch.int64)
        positions = torch.arange(seq, dtype=torch.int64)[None]
        logits, past = self.decode(inputs_embeds, mask, positions, [])
        tokens: list[int] = []
        margins: list[float] = []
        for step in range(max_new_tokens):
            top2 = logits[0, -1].topk(2)
            token = int(top2.indices[0])
            tokens.append(token)
            margins.append(float(top2.values[0] - top2.values[1]))
            if step + 1 == max_new_tokens or token == eos:
                break
            mask = torch.ones(1, seq + step + 1, dtype=torch.int64)
            positions = torch.tensor([[seq + step]], dtype=torch.int64)
            logits, past = self.decode(self.embed_tokens(torch.tensor([[token]])), mask, positions, past)
        return tokens, margins
