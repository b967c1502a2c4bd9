"""MobileVLM V2's config.json, validated. Torch-free: the Jetson side reads it too."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvlm_compile.errors import CheckpointError

IMAGE_TOKEN_INDEX = -200  # the authors' placeholder id for <image> in token id lists
IMAGE_GRID = 24  # 336 / 14 patches per side
POOLED_GRID = 12  # LDPv2 pools the 24x24 grid to 12x12 = 144 image tokens

# Vision towers we know by name. ViT-L/14-336 is MobileVLM V2's only published tower.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    },
}

# LLaMA keys a MobileVLM config must carry for the decoder.
_REQUIRED_TEXT_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class MobileVLMConfig:
    """What the toolchain needs from config.json, after validation."""

    path: Path
    raw: dict[str, Any]
    text: dict[str, Any]  # keys for transformers.LlamaConfig
    mm_hidden_size: int
    mm_vision_select_layer: int
    mm_vision_tower: str
    # The CLIP vision config embedded in config.json ("vision_config", written by
    # `mvlm-compile synth` for non-standard widths) or the known tower's; None when the
    # tower must come from a CLIP checkpoint directory.
    vision: dict[str, Any] | None = field(default=None)

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.text["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.text.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.text.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def max_context(self) -> int:
        return int(self.text["max_position_embeddings"])


def vision_layers_used(num_layers: int, select_layer: int) -> int:
    """hidden_states[select_layer] is the output of this many encoder layers (index 0 = embeddings)."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"mm_vision_select_layer {select_layer} is outside a {num_layers}-layer tower")
    return index


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({what}): {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what})")
    return data


def load_mobilevlm_config(checkpoint_dir: Path) -> MobileVLMConfig:
    """Read and validate `checkpoint_dir/config.json` as a MobileVLM V2 config."""
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: not a directory (expected a MobileVLM V2 checkpoint)")
    raw = read_json(path, "MobileVLM V2 config")

    model_type = raw.get("model_type")
    if model_type != "mobilevlm":
        raise CheckpointError(f"{path}: model_type is {model_type!r}, expected 'mobilevlm' (a MobileVLM V2 checkpoint)")
    projector = raw.get("mm_projector_type")
    if projector == "ldpnet":
        raise CheckpointError(
            f"{path}: mm_projector_type is 'ldpnet', a MobileVLM V1 projector; only V2 ('ldpnetv2') is supported"
        )
    if projector != "ldpnetv2":
        raise CheckpointError(f"{path}: mm_projector_type is {projector!r}, expected 'ldpnetv2' (MobileVLM V2)")
    missing = [k for k in _REQUIRED_TEXT_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing LLaMA keys {missing}")
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError(
            f"{path}: mm_vision_select_feature is {raw.get('mm_vision_select_feature')!r}, expected 'patch'"
        )
    if raw.get("mm_use_im_start_end", False):
        raise CheckpointError(f"{path}: mm_use_im_start_end is true; MobileVLM V2 uses no image start/end tokens")
    if raw.get("image_aspect_ratio", "pad") != "pad":
        raise CheckpointError(f"{path}: image_aspect_ratio is {raw.get('image_aspect_ratio')!r}, expected 'pad'")
    tower_type = raw.get("vision_tower_type", "clip")
    if tower_type != "clip":
        raise CheckpointError(f"{path}: vision_tower_type is {tower_type!r}; only 'clip' is supported")

    tower = str(raw.get("mm_vision_tower", ""))
    vision = raw.get("vision_config") or KNOWN_VISION_TOWERS.get(tower)
    mm_hidden = int(raw.get("mm_hidden_size", 1024))
    text = {k: raw[k] for k in raw if k not in _NON_TEXT_KEYS}
    return MobileVLMConfig(
        path=path,
        raw=raw,
        text=text,
        mm_hidden_size=mm_hidden,
        mm_vision_select_layer=int(raw.get("mm_vision_select_layer", -2)),
        mm_vision_tower=tower,
        vision=dict(vision) if vision is not None else None,
    )


# Keys of config.json that are not LlamaConfig keys.
_NON_TEXT_KEYS = {
    "model_type",
    "architectures",
    "vision_config",
    "transformers_version",
    "auto_map",
    "mvlm_compile_synthetic",
}
