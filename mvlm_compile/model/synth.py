"""Synthetic MobileVLM V2 checkpoints in exactly the published layout, with random weights.

Tests and benchmarks go through the real loading path with them. `tiny` keeps the real
geometry (336x336 image, patch 14, 576 patch tokens -> 144 image tokens) with small widths;
the 1.7B/3B presets are the full-size architectures. Weights are drawn per tensor from a
generator seeded by (seed, tensor name), so the bytes depend only on preset, seed and dtype.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from mvlm_compile.fileio import atomic_output_dir, write_json
from mvlm_compile.model.config import KNOWN_VISION_TOWERS, load_mobilevlm_config
from mvlm_compile.model.loader import CLIP_VISION_PREFIX, EMBEDDED_VISION_PREFIX, published_name
from mvlm_compile.model.reference import MobileVLMReference
from mvlm_compile.model.tokenizer import write_synthetic_tokenizer

CLIP_HUB_NAME = "openai/clip-vit-large-patch14-336"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Preset:
    text: dict[str, Any]
    vision: dict[str, Any]
    dtype: str  # default storage dtype


def _llama(hidden: int, layers: int, heads: int, mlp: int, vocab: int, context: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": mlp,
        "vocab_size": vocab,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        text=_llama(hidden=64, layers=2, heads=4, mlp=192, vocab=512, context=512),
        vision={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 336,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        dtype="fp32",
    ),
    "mobilevlm-v2-1.7b": Preset(
        text=_llama(hidden=2048, layers=24, heads=16, mlp=5632, vocab=32000, context=2048),
        vision=KNOWN_VISION_TOWERS[CLIP_HUB_NAME],
        dtype="fp16",
    ),
    "mobilevlm-v2-3b": Preset(
        text=_llama(hidden=2560, layers=32, heads=32, mlp=6912, vocab=32000, context=2048),
        vision=KNOWN_VISION_TOWERS[CLIP_HUB_NAME],
        dtype="fp16",
    ),
}


def mobilevlm_config_json(preset: Preset, embed_vision_config: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": "mobilevlm",
        "architectures": ["MobileLlamaForCausalLM"],
        **preset.text,
        "mm_projector_type": "ldpnetv2",
        "mm_hidden_size": preset.vision["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": CLIP_HUB_NAME,
        "vision_tower_type": "clip",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }
    if embed_vision_config:
        # Not in published configs: our extension for towers that are not the real ViT-L/14-336.
        cfg["vision_config"] = dict(preset.vision)
    return cfg


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) for a tensor: unit-ish activations through every layer, spread logits."""
    if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
        return (1.0, 0.05) if name.endswith("weight") else (0.0, 0.02)
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    if name.endswith("lm_head.weight"):
        return 0.0, 4.0 / np.sqrt(shape[1])  # wide logit spread: robust greedy argmax
    if name.endswith(("class_embedding", "position_embedding.weight")):
        return 0.0, 0.1
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return 0.0, 1.0 / np.sqrt(fan_in)


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    mean, std = _init_std(name, shape)
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean)
    return torch.from_numpy(values).to(dtype)


def _write_sharded(
    out: Path,
    shapes: dict[str, tuple[int, ...]],
    make: Callable[[str], torch.Tensor],
    bytes_per_value: int,
    max_shard_bytes: int,
) -> list[str]:
    """Write model.safetensors, or model-0000i-of-0000n.safetensors + index when it is large."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * bytes_per_value
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file_name, keys in zip(names, shards):
        save_file({k: make(k) for k in keys}, str(out / file_name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * bytes_per_value for s in shapes.values())
        weight_map = {k: file_name for file_name, keys in zip(names, shards) for k in keys}
        write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def _published_shapes(checkpoint_dir: Path, vision: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Published tensor names and shapes of the reference built from the config just written."""
    with torch.device("meta"):
        model = MobileVLMReference(load_mobilevlm_config(checkpoint_dir), vision)
    return {published_name(k, model.vision_prefix): tuple(v.shape) for k, v in model.state_dict().items()}


def write_synthetic_checkpoint(
    preset_name: str,
    out: Path,
    seed: int = 0,
    dtype: str | None = None,
    clip_out: Path | None = None,
    max_shard_bytes: int = 2 << 30,
    progress: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Write a random-weight checkpoint to `out`.

    With `clip_out`, the vision tower goes to a separate CLIP checkpoint directory (the
    openai/clip-vit-large-patch14-336 layout, `vision_model.*` keys) and the MobileVLM
    checkpoint holds no vision weights, like llama.cpp's conversion expects; otherwise the
    vision weights sit in the checkpoint under model.vision_tower.vision_tower.vision_model.*.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    torch_dtype = DTYPES[dtype or preset.dtype]
    bytes_per_value = torch.finfo(torch_dtype).bits // 8
    separate = clip_out is not None
    is_real_tower = preset.vision == KNOWN_VISION_TOWERS[CLIP_HUB_NAME]
    config = mobilevlm_config_json(preset, embed_vision_config=not separate and not is_real_tower)
    config["mvlm_compile_synthetic"] = {"preset": preset_name, "seed": seed}
    config["torch_dtype"] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[
        torch_dtype
    ]

    with atomic_output_dir(out, "checkpoint") as tmp:
        write_json(tmp / "config.json", config)
        shapes = _published_shapes(tmp, preset.vision)
        # The CLIP directory names its tensors vision_model.* like openai/clip-vit-large-patch14-336.
        vision_shapes = {
            CLIP_VISION_PREFIX + k[len(EMBEDDED_VISION_PREFIX) :]: s
            for k, s in shapes.items()
            if k.startswith(EMBEDDED_VISION_PREFIX)
        }
        main_shapes = {k: s for k, s in shapes.items() if not (separate and k.startswith(EMBEDDED_VISION_PREFIX))}

        def make(name: str) -> torch.Tensor:
            # Embedded and separate vision weights share names after the prefix, so both
            # layouts of one seed hold the same model.
            progress(name)
            shape = main_shapes[name] if name in main_shapes else vision_shapes[name]
            seed_name = name.replace(EMBEDDED_VISION_PREFIX, CLIP_VISION_PREFIX, 1)
            return _random_tensor(seed_name, shape, seed, torch_dtype)

        _write_sharded(tmp, main_shapes, make, bytes_per_value, max_shard_bytes)
        write_preset_tokenizer(preset_name, tmp)
    if separate:
        with atomic_output_dir(clip_out, "checkpoint", inputs=[out], option="--clip-out") as tmp:
            write_json(tmp / "config.json", _clip_config_json(preset.vision))
            _write_sharded(tmp, vision_shapes, make, bytes_per_value, max_shard_bytes)
    return out


def write_preset_tokenizer(preset_name: str, directory: Path) -> None:
    """Write the tokenizer of a preset's checkpoint (tokenizer.json, tokenizer_config.json) to
    `directory` without its weights: one piece for each of the model's vocab_size ids."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    write_synthetic_tokenizer(directory, vocab_size=PRESETS[preset_name].text["vocab_size"])


def _clip_config_json(vision: dict[str, Any]) -> dict[str, Any]:
    """A CLIP checkpoint config as openai/clip-vit-large-patch14-336 has it (vision part used)."""
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": vision.get("projection_dim", 768),
        "vision_config": {"model_type": "clip_vision_model", **vision},
        "text_config": {"model_type": "clip_text_model"},
    }
