"""MobileVLM V2's config.json, validated. Torch-free: the Jetson side reads it too."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvlm_compile.errors import CheckpointError, collapse_whitespace

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

# The longest context a config may claim (MobileVLM V2's is 2048): a larger one is refused before any
# work, as its float spelling (1e12) is, rather than sizing caches and profiles from it.
MAX_CONTEXT = 2**20

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


# config.json, index and tokenizer_config files are a few kB to a few MB; a larger one (or
# /dev/zero behind a symlink) is not one of them, and must not be read into memory.
MAX_JSON_BYTES = 64 << 20


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or a one-line CheckpointError that says missing, unreadable or not valid JSON."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise CheckpointError(f"{path}: unreadable ({what}): {kind}")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if path.is_symlink() else ""
        raise CheckpointError(f"{path}: missing ({what}){broken}") from None
    except OSError as e:  # permission denied, a symlink loop, an I/O error...
        raise CheckpointError(f"{path}: unreadable ({what}): {e.strerror or e}") from None
    if len(data) > MAX_JSON_BYTES:
        limit = f"{MAX_JSON_BYTES >> 20} MiB" if MAX_JSON_BYTES >= 1 << 20 else f"{MAX_JSON_BYTES} bytes"
        raise CheckpointError(f"{path}: not valid JSON ({what}): larger than {limit}")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({what}): {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON ({what}): nested too deeply") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, found {_json_kind(parsed)}")
    return parsed


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as `Type: message` on one line (library messages span lines and run long)."""
    text = f"{type(e).__name__}: " + collapse_whitespace(str(e))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_readable(path: Path, what: str) -> None:
    """Say 'missing' or 'unreadable' before a parser reports either as a corrupt file."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except OSError as e:  # permission denied, a directory, a symlink loop...
        raise CheckpointError(f"{path}: unreadable ({what}): {e.strerror or e}") from None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {list: "a list", str: "a string", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _positive_int(value: Any, key: str, path: Path) -> int:
    # bool is an int in Python; `true` is not a size.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: {key} is {value!r}, expected a positive integer")
    return value


def _positive_number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise CheckpointError(f"{path}: {key} is {value!r}, expected a positive number")
    return float(value)


VISION_INT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)


def validate_vision_config(vision: Any, path: Path) -> dict[str, Any]:
    """A CLIP vision config (config.json's vision_config or a CLIP checkpoint's) with sane geometry.

    Returns the keys the reference needs; hidden_act and layer_norm_eps default to CLIP's.
    """
    if not isinstance(vision, dict):
        raise CheckpointError(f"{path}: the vision config is {type(vision).__name__}, expected an object")
    missing = [k for k in VISION_INT_KEYS if k not in vision]
    if missing:
        raise CheckpointError(f"{path}: vision config lacks {missing}")
    out: dict[str, Any] = {k: _positive_int(vision[k], f"vision {k}", path) for k in VISION_INT_KEYS}
    if out["hidden_size"] % out["num_attention_heads"]:
        raise CheckpointError(
            f"{path}: vision hidden_size {out['hidden_size']} is not a multiple of num_attention_heads "
            f"{out['num_attention_heads']}"
        )
    act = vision.get("hidden_act", "quick_gelu")
    if act not in _CLIP_ACTIVATIONS:
        raise CheckpointError(f"{path}: vision hidden_act is {act!r}, expected one of {sorted(_CLIP_ACTIVATIONS)}")
    out["hidden_act"] = act
    out["layer_norm_eps"] = _positive_number(vision.get("layer_norm_eps", 1e-5), "vision layer_norm_eps", path)
    if "projection_dim" in vision:
        out["projection_dim"] = _positive_int(vision["projection_dim"], "vision projection_dim", path)
    return out


# The activations CLIP checkpoints use, by transformers' names (an unknown name would fail only at golden).
_CLIP_ACTIVATIONS = {"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"}


def load_mobilevlm_config(checkpoint_dir: Path) -> MobileVLMConfig:
    """Read and validate `checkpoint_dir/config.json` as a MobileVLM V2 config."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "config.json"
    if not checkpoint_dir.is_dir():
        what = "not a directory" if checkpoint_dir.exists() else "does not exist"
        raise CheckpointError(f"{checkpoint_dir}: {what} (expected a MobileVLM V2 checkpoint directory)")
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
    _check_text_geometry(raw, path)
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

    tower = raw.get("mm_vision_tower", "")
    if not isinstance(tower, str):
        raise CheckpointError(f"{path}: mm_vision_tower is {tower!r}, expected a hub name or a directory")
    vision = raw.get("vision_config")
    if vision is not None:
        vision = validate_vision_config(vision, path)
    else:
        vision = KNOWN_VISION_TOWERS.get(tower)
    mm_hidden = _positive_int(raw.get("mm_hidden_size", 1024), "mm_hidden_size", path)
    select_layer = raw.get("mm_vision_select_layer", -2)
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        raise CheckpointError(f"{path}: mm_vision_select_layer is {select_layer!r}, expected an integer")
    text = {k: raw[k] for k in raw if k not in _NON_TEXT_KEYS}
    return MobileVLMConfig(
        path=path,
        raw=raw,
        text=text,
        mm_hidden_size=mm_hidden,
        mm_vision_select_layer=select_layer,
        mm_vision_tower=tower,
        vision=dict(vision) if vision is not None else None,
    )


def _check_text_geometry(raw: dict[str, Any], path: Path) -> None:
    """The LLaMA sizes are positive integers that fit together (else the reference fails to build)."""
    for key in _REQUIRED_TEXT_KEYS:
        if key == "rms_norm_eps":
            _positive_number(raw[key], key, path)
        else:
            _positive_int(raw[key], key, path)
    if raw["max_position_embeddings"] > MAX_CONTEXT:
        raise CheckpointError(
            f"{path}: max_position_embeddings is {raw['max_position_embeddings']}, expected at most {MAX_CONTEXT}"
        )
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    _positive_int(kv_heads, "num_key_value_heads", path)
    if raw.get("head_dim") is not None:
        _positive_int(raw["head_dim"], "head_dim", path)
    elif raw["hidden_size"] % heads:
        raise CheckpointError(
            f"{path}: hidden_size {raw['hidden_size']} is not a multiple of num_attention_heads {heads}"
        )
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    # Optional LLaMA keys that change the numbers without changing any shape: a bad value would
    # only show as NaN golden tensors or a failure deep inside transformers.
    if raw.get("rope_theta") is not None:
        _positive_number(raw["rope_theta"], "rope_theta", path)
    if "hidden_act" in raw and not isinstance(raw["hidden_act"], str):
        raise CheckpointError(f"{path}: hidden_act is {raw['hidden_act']!r}, expected an activation name")
    if "tie_word_embeddings" in raw and not isinstance(raw["tie_word_embeddings"], bool):
        raise CheckpointError(f"{path}: tie_word_embeddings is {raw['tie_word_embeddings']!r}, expected true or false")


# Keys of config.json that are not LlamaConfig keys.
_NON_TEXT_KEYS = {
    "model_type",
    "architectures",
    "vision_config",
    "transformers_version",
    "auto_map",
    "mvlm_compile_synthetic",
}
