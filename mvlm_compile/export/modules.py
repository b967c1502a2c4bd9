"""Export-ready views of the reference: each takes and returns exactly the graph's I/O (contract.py)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mvlm_compile.errors import MvlmError
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


class _Attention(nn.Module):
    """LLaMA self-attention over a cache kept outside the graph, without concatenating K/V.

    The past (keys and values [past, slots, kv_heads, head_dim], contract.past_names) is read
    where the runtime keeps it: row b of the call reads slot b of the bound view (slots >= batch;
    the runtime binds the view at the call's first slot), and only its own first
    `position_ids[b, 0]` past rows count: the rest of the bound past (rows a shorter sequence has
    not reached yet) is masked out. So one call advances rows whose past lengths differ. The
    rows of this call's tokens are returned as new outputs (contract.new_kv_names) for the
    runtime to write after each row's past. Scores against the past and against the new rows
    (causal) form one softmax; its two blocks weigh the past values and the new values, and the
    two sums are added. Plain Slice/MatMul/Softmax: what TensorRT 10.3 builds. The permutes of
    the past fold into the MatMuls (ONNX Runtime: FusedMatMul with transposed batch strides).
    """

    def __init__(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

    def forward(self, hidden, cos, sin, past_key, past_value, past_masked):
        batch, seq = hidden.shape[:2]
        past_len = past_key.shape[0]  # of the input: its dimension stays foldable for shape inference
        past_key, past_value = past_key[:, :batch], past_value[:, :batch]  # row b <- slot b
        query = self.q_proj(hidden).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)  # [batch, heads, seq, head_dim]

        scores_past = torch.matmul(query, past_key.permute(1, 2, 3, 0)) * self.scaling  # [b, h, seq, past]
        scores_past = scores_past.masked_fill(past_masked, torch.finfo(scores_past.dtype).min)
        scores_new = torch.matmul(query, key.transpose(2, 3)) * self.scaling  # [b, h, seq, seq]
        steps = torch.arange(seq, device=hidden.device)
        future = steps[None, :] > steps[:, None]  # a new token sees the past and the new tokens up to itself
        scores_new = scores_new.masked_fill(future, torch.finfo(scores_new.dtype).min)
        # One softmax over both blocks (in FP32, as the reference's eager attention does).
        probs = torch.softmax(torch.cat([scores_past, scores_new], dim=-1), dim=-1, dtype=torch.float32)
        probs = probs.to(query.dtype)
        out = torch.matmul(probs[..., :past_len], past_value.permute(1, 2, 0, 3))
        out = out + torch.matmul(probs[..., past_len:], value)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        new_key, new_value = key.permute(2, 0, 1, 3), value.permute(2, 0, 1, 3)  # [seq, batch, kv_heads, head_dim]
        return self.o_proj(out), new_key, new_value


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = _Attention(layer.self_attn, num_heads, num_kv_heads)
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp

    def forward(self, hidden, cos, sin, past_key, past_value, past_masked):
        attn, new_key, new_value = self.self_attn(
            self.input_layernorm(hidden), cos, sin, past_key, past_value, past_masked
        )
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), new_key, new_value


class _Model(nn.Module):
    def __init__(self, model: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.rotary_emb = model.rotary_emb
        self.layers = nn.ModuleList(_Layer(layer, num_heads, num_kv_heads) for layer in model.layers)
        self.norm = model.norm

    def forward(self, inputs_embeds, position_ids, logits_index, past):
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        # A row's tokens continue its sequence, so its first position is its own past length:
        # past rows at or beyond it belong to no token of this row. [batch, 1, 1, past]
        past_rows = torch.arange(past[0].shape[0], device=inputs_embeds.device)
        past_masked = (past_rows[None, :] >= position_ids[:, :1])[:, None, None, :]
        hidden = inputs_embeds
        new = []
        for i, layer in enumerate(self.layers):
            hidden, new_key, new_value = layer(hidden, cos, sin, past[2 * i], past[2 * i + 1], past_masked)
            new.extend((new_key, new_value))
        # Only the asked positions go through the final norm and lm_head (the runtime asks for the last).
        return self.norm(torch.index_select(hidden, 1, logits_index)), new


class _LanguageModel(nn.Module):
    """The same module names as transformers' LlamaForCausalLM (language_model/model/layers.N/...),
    so that the graph's node names carry the module paths quantize and verify look for."""

    def __init__(self, lm: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.model = _Model(lm.model, num_heads, num_kv_heads)
        self.lm_head = lm.lm_head

    def forward(self, inputs_embeds, position_ids, logits_index, past):
        hidden, new = self.model(inputs_embeds, position_ids, logits_index, past)
        return self.lm_head(hidden), new


class Decoder(nn.Module):
    """(inputs_embeds, position_ids, logits_index, *past k/v) -> (logits, *new k/v): contract.py's decoder."""

    def __init__(self, model: MobileVLMReference) -> None:
        super().__init__()
        cfg = model.config
        if cfg.num_kv_heads != cfg.num_heads:
            raise MvlmError(
                f"{cfg.path}: num_key_value_heads {cfg.num_kv_heads} != num_attention_heads {cfg.num_heads}: "
                "grouped-query attention is not supported by the decoder export (MobileVLM V2 has none)"
            )
        self.language_model = _LanguageModel(model.language_model, cfg.num_heads, cfg.num_kv_heads)

    def forward(self, inputs_embeds, position_ids, logits_index, *past):
        logits, new = self.language_model(inputs_embeds, position_ids, logits_index, past)
        return (logits, *new)
