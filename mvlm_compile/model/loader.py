"""Load a MobileVLM V2 checkpoint in the published layout into the PyTorch reference.

Layout (see ../shared/model-facts.md): config.json, weights in safetensors (single or
sharded with an index) or pytorch_model*.bin, tokenizer files. Vision weights come from the
checkpoint (model.vision_tower.vision_tower.vision_model.*) when present, otherwise from a
CLIP ViT-L/14-336 checkpoint directory (--vision-tower, or mm_vision_tower when local).
Every tensor is checked by name and shape before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.initialization import no_init_weights

from mvlm_compile.errors import CheckpointError
from mvlm_compile.model.config import MobileVLMConfig, load_mobilevlm_config, read_json
from mvlm_compile.model.reference import MobileVLMReference

EMBEDDED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_VISION_PREFIX = "vision_model."  # in a CLIP checkpoint directory
PROJECTOR_PREFIX = "model.mm_projector."
# Tensors a published checkpoint may carry that the reference recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_CLIP_NON_VISION_PREFIXES = ("text_model.", "visual_projection", "text_projection", "logit_scale")
_REQUIRED_VISION_GEOMETRY = {"image_size": 336, "patch_size": 14}


@dataclass
class WeightFile:
    """One weight file and the tensors it holds (name -> shape), read without loading data."""

    path: Path
    shapes: dict[str, tuple[int, ...]]

    def tensors(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.path.suffix == ".safetensors":
            with safe_open(self.path, framework="pt") as f:
                for name in self.shapes:
                    if name in names:
                        yield name, f.get_tensor(name)
        else:
            state = _torch_load(self.path)
            for name in self.shapes:
                if name in names:
                    yield name, state[name]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: never unpickle arbitrary objects from a checkpoint.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch file ({type(e).__name__}: {e})"
        ) from None


def _scan(path: Path) -> WeightFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file listed by the index is missing")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None
    else:
        shapes = {k: tuple(v.shape) for k, v in _torch_load(path).items()}
    return WeightFile(path, shapes)


def find_weight_files(directory: Path) -> list[WeightFile]:
    """Weight files of a HF-style directory: sharded index, single file or loose files."""
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.exists():
            index = read_json(index_path, "weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
            return [_scan(directory / name) for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory}: no weights (expected *.safetensors or pytorch_model*.bin)")
    return [_scan(p) for p in files]


@dataclass
class VisionSource:
    """Where the vision tower's weights and config come from."""

    description: str  # "checkpoint" or the CLIP directory
    config: dict
    files: list[WeightFile]  # the CLIP directory's files; empty when embedded in the checkpoint

    @property
    def from_clip_dir(self) -> bool:
        return bool(self.files)


def _clip_vision_config(clip_dir: Path) -> dict:
    raw = read_json(clip_dir / "config.json", "CLIP checkpoint config")
    if raw.get("model_type") == "clip":
        vision = raw.get("vision_config") or {}
    elif raw.get("model_type") == "clip_vision_model":
        vision = raw
    else:
        raise CheckpointError(
            f"{clip_dir / 'config.json'}: model_type is {raw.get('model_type')!r}; expected a CLIP checkpoint "
            "('clip' or 'clip_vision_model')"
        )
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    missing = [k for k in keys if k not in vision]
    if missing:
        raise CheckpointError(f"{clip_dir / 'config.json'}: vision config lacks {missing}")
    out = {k: vision[k] for k in keys}
    out["hidden_act"] = vision.get("hidden_act", "quick_gelu")
    out["layer_norm_eps"] = vision.get("layer_norm_eps", 1e-5)
    return out


def _vision_source(cfg: MobileVLMConfig, files: list[WeightFile], vision_tower: Path | None) -> VisionSource:
    embedded = any(k.startswith(EMBEDDED_VISION_PREFIX) for f in files for k in f.shapes)
    if embedded:
        if cfg.vision is None:
            raise CheckpointError(
                f"{cfg.path}: unknown vision tower {cfg.mm_vision_tower!r}: its architecture is not known "
                "(known: openai/clip-vit-large-patch14-336, or a 'vision_config' in config.json)"
            )
        _check_vision_width(cfg, cfg.vision, "checkpoint")
        return VisionSource("checkpoint", cfg.vision, [])
    clip_dir = vision_tower
    if clip_dir is None and cfg.mm_vision_tower and Path(cfg.mm_vision_tower).is_dir():
        clip_dir = Path(cfg.mm_vision_tower)
    if clip_dir is None:
        raise CheckpointError(
            f"{cfg.path.parent}: the checkpoint has no vision weights ({EMBEDDED_VISION_PREFIX}*) "
            f"and mm_vision_tower {cfg.mm_vision_tower!r} is not a local directory; pass --vision-tower DIR "
            "(a CLIP ViT-L/14-336 checkpoint)"
        )
    vision = _clip_vision_config(Path(clip_dir))
    for key, value in _REQUIRED_VISION_GEOMETRY.items():
        if int(vision[key]) != value:
            raise CheckpointError(f"{clip_dir}: vision tower has {key} {vision[key]}, MobileVLM V2 needs {value}")
    _check_vision_width(cfg, vision, str(clip_dir))
    return VisionSource(str(clip_dir), vision, find_weight_files(Path(clip_dir)))


def _check_vision_width(cfg: MobileVLMConfig, vision: dict, source: str) -> None:
    if int(vision["hidden_size"]) != cfg.mm_hidden_size:
        raise CheckpointError(
            f"{cfg.path}: mm_hidden_size {cfg.mm_hidden_size} does not match the vision tower's hidden_size "
            f"{vision['hidden_size']} ({source})"
        )


def _checkpoint_key(key: str, vision_prefix: str) -> str:
    """Key in the MobileVLM checkpoint -> reference key."""
    if key.startswith(EMBEDDED_VISION_PREFIX):
        return vision_prefix + key[len(EMBEDDED_VISION_PREFIX) :]
    if key.startswith(PROJECTOR_PREFIX):
        return "mm_projector." + key[len(PROJECTOR_PREFIX) :]
    return "language_model." + key


def published_name(model_key: str, vision_prefix: str, clip_dir: str | None = None) -> str:
    """Reference key -> the name in the published files (the CLIP directory's when `clip_dir`)."""
    if model_key.startswith(vision_prefix):
        inner = model_key[len(vision_prefix) :]
        return f"{CLIP_VISION_PREFIX}{inner} ({clip_dir})" if clip_dir else EMBEDDED_VISION_PREFIX + inner
    if model_key.startswith("mm_projector."):
        return PROJECTOR_PREFIX + model_key[len("mm_projector.") :]
    return model_key[len("language_model.") :]


def _sources(
    files: list[WeightFile], vision: VisionSource, vision_prefix: str
) -> Iterator[tuple[WeightFile, str, str]]:
    """(weight file, file key, reference key) for every tensor found, ignored ones left out."""
    for f in files:
        for key in f.shapes:
            if not key.endswith(_IGNORED_SUFFIXES):
                yield f, key, _checkpoint_key(key, vision_prefix)
    for f in vision.files:
        for key in f.shapes:
            if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_CLIP_NON_VISION_PREFIXES):
                continue
            inner = (
                key[len(CLIP_VISION_PREFIX) :]
                if key.startswith(CLIP_VISION_PREFIX)
                else f"<outside vision_model>.{key}"
            )
            yield f, key, vision_prefix + inner


def _summarise(kind: str, names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{kind} {len(names)}: {shown}{more}"


@dataclass
class LoadedCheckpoint:
    config: MobileVLMConfig
    model: MobileVLMReference
    vision_source: str
    weight_files: list[Path]


def load_checkpoint(
    checkpoint_dir: Path,
    vision_tower: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedCheckpoint:
    """Validate every tensor by name and shape, then load the reference in `dtype` (eval mode)."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = load_mobilevlm_config(checkpoint_dir)
    files = find_weight_files(checkpoint_dir)
    vision = _vision_source(cfg, files, vision_tower)

    with no_init_weights():
        model = MobileVLMReference(cfg, vision.config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    plan: dict[str, tuple[WeightFile, str]] = {}
    unexpected, misshaped = [], []
    for f, key, model_key in _sources(files, vision, model.vision_prefix):
        if model_key not in expected:
            unexpected.append(f"{key} ({f.path.name})")
        elif f.shapes[key] != expected[model_key]:
            misshaped.append(f"{key} is {list(f.shapes[key])}, expected {list(expected[model_key])} ({f.path.name})")
        else:
            plan[model_key] = (f, key)
    missing = [k for k in expected if k not in plan]
    problems = []
    if missing:
        clip_dir = vision.description if vision.from_clip_dir else None
        problems.append(
            _summarise("missing tensors", [published_name(k, model.vision_prefix, clip_dir) for k in missing])
        )
    if misshaped:
        problems.append(_summarise("mis-shaped tensors", misshaped))
    if unexpected:
        problems.append(_summarise("unexpected tensors", unexpected))
    if problems:
        raise CheckpointError(f"{checkpoint_dir}: " + "; ".join(problems))

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, tuple[WeightFile, dict[str, str]]] = {}
    for model_key, (f, key) in plan.items():
        by_file.setdefault(f.path, (f, {}))[1][key] = model_key
    for f, names in by_file.values():
        for key, tensor in f.tensors(set(names)):
            state[names[key]] = tensor.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(dtype).eval()
    return LoadedCheckpoint(cfg, model, vision.description, [f.path for f in files + vision.files])
