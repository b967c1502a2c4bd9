"""Load a MobileVLM V2 checkpoint in the published layout into the PyTorch reference.

Layout (see ../shared/model-facts.md): config.json, weights in safetensors (single or
sharded with an index) or pytorch_model*.bin, tokenizer files. Vision weights come from the
checkpoint (model.vision_tower.vision_tower.vision_model.*) when present, otherwise from a
CLIP ViT-L/14-336 checkpoint directory (--vision-tower, or mm_vision_tower when local), whose
keys may carry the `vision_model.` prefix or not (transformers 5's CLIPVisionModel). A local
tower directory also gives the tower's geometry (its config.json) when the weights are embedded.
Every tensor is checked by name, shape and dtype before anything is loaded, and for NaN/Inf
as it is loaded; each problem is a one-line CheckpointError naming the tensor and its file.
"""

from __future__ import annotations

import contextlib
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.initialization import no_init_weights

from mvlm_compile.errors import CheckpointError
from mvlm_compile.model.config import (
    VISION_INT_KEYS,
    MobileVLMConfig,
    check_readable,
    load_mobilevlm_config,
    one_line,
    read_json,
    validate_vision_config,
    vision_layers_used,
)
from mvlm_compile.model.reference import MobileVLMReference

EMBEDDED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_VISION_PREFIX = "vision_model."  # in a CLIP checkpoint directory
PROJECTOR_PREFIX = "model.mm_projector."
# Tensors a published checkpoint may carry that the reference recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_CLIP_NON_VISION_PREFIXES = ("text_model.", "visual_projection", "text_projection", "logit_scale")
_REQUIRED_VISION_GEOMETRY = {"image_size": 336, "patch_size": 14}


# What a weight may be stored as: the reference casts these exactly (fp16/bf16 -> fp32) or
# rounds them as the user asked (--dtype). Integers, booleans and float64 are not MobileVLM
# weights: a cast would silently change or truncate them.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass
class WeightFile:
    """One weight file and the tensors it holds (name -> shape, dtype), read without loading data."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # torch's names: float32, bfloat16, int64...

    def tensors(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.path.suffix == ".safetensors":
            try:
                with safe_open(self.path, framework="pt") as f:
                    for name in self.shapes:
                        if name in names:
                            yield name, f.get_tensor(name)
            except (SafetensorError, OSError) as e:  # changed or truncated since it was scanned
                raise CheckpointError(f"{self.path}: corrupt safetensors file ({one_line(e)})") from None
        else:
            state = _torch_load(self.path)
            for name in self.shapes:
                if name in names:
                    yield name, state[name]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    check_readable(path, "weight file")
    # Memory-map zip-format files (torch.save's default since 1.6) to keep peak memory at one
    # tensor; the legacy format (_use_new_zipfile_serialization=False) cannot be mapped.
    mmap = zipfile.is_zipfile(path)
    try:
        # weights_only: never unpickle arbitrary objects from a checkpoint.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch file ({one_line(e)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensor names to tensors)")
    return state


def _scan(path: Path, listed_by: Path | None = None) -> WeightFile:
    if not path.exists() and not path.is_symlink():  # a looping or broken link is reported as unreadable
        where = f" (listed by {listed_by.name})" if listed_by else ""
        raise CheckpointError(f"{path}: weight file missing{where}")
    check_readable(path, "weight file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
                dtypes = {k: _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()) for k, s in slices.items()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({one_line(e)})") from None
    else:
        state = _torch_load(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}
    return WeightFile(path, shapes, dtypes)


def find_weight_files(directory: Path) -> list[WeightFile]:
    """Weight files of a HF-style directory: sharded index, single file or loose files."""
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.exists() or index_path.is_symlink():
            index = read_json(index_path, "weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
            names = set(weight_map.values())
            for name in sorted(names, key=str):
                # A shard is a file of this directory: no absolute path, no '..', no sub-folder tricks.
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise CheckpointError(f"{index_path}: weight_map names {name!r}, expected a file name")
            return [_scan(directory / name, index_path) for name in sorted(names)]
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory}: no weights (expected *.safetensors or pytorch_model*.bin)")
    return [_scan(p) for p in files]


@dataclass
class VisionSource:
    """Where the vision tower's weights and geometry come from."""

    description: str  # "checkpoint" or the CLIP directory the weights come from
    config: dict
    files: list[WeightFile]  # the CLIP directory's files; empty when embedded in the checkpoint
    # Prefix of the vision weights in the CLIP directory: "vision_model." (openai's CLIPModel
    # checkpoints, transformers 4) or "" (a CLIPVisionModel saved by transformers 5).
    clip_prefix: str = CLIP_VISION_PREFIX

    @property
    def from_clip_dir(self) -> bool:
        return bool(self.files)


def _clip_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path}: does not exist (expected a CLIP checkpoint directory)")
    if not path.is_dir():
        raise CheckpointError(f"{what} {path}: not a directory (expected a CLIP checkpoint directory)")
    return path


def _clip_vision_config(clip_dir: Path) -> dict:
    """The tower's geometry from a CLIP directory's config.json (a CLIPModel's or a CLIPVisionModel's)."""
    path = clip_dir / "config.json"
    raw = read_json(path, "CLIP checkpoint config")
    if raw.get("model_type") == "clip":
        if "vision_config" not in raw:
            raise CheckpointError(f"{path}: a CLIP config without 'vision_config'")
        vision = raw["vision_config"]
    elif raw.get("model_type") == "clip_vision_model":
        vision = raw
    else:
        raise CheckpointError(
            f"{path}: model_type is {raw.get('model_type')!r}; expected a CLIP checkpoint "
            "('clip' or 'clip_vision_model')"
        )
    return validate_vision_config(vision, path)


def _vision_source(cfg: MobileVLMConfig, files: list[WeightFile], vision_tower: Path | None) -> VisionSource:
    embedded = any(k.startswith(EMBEDDED_VISION_PREFIX) for f in files for k in f.shapes)
    # A local directory that names the tower gives its geometry, whether or not the weights are embedded.
    clip_dir = None
    if vision_tower is not None:
        clip_dir = _clip_dir(vision_tower, "--vision-tower")
    elif cfg.mm_vision_tower and Path(cfg.mm_vision_tower).is_dir():
        clip_dir = Path(cfg.mm_vision_tower)
    if clip_dir is not None:
        vision = _clip_vision_config(clip_dir)
        declared = cfg.raw.get("vision_config")
        if isinstance(declared, dict):
            clash = sorted(k for k in _GEOMETRY_KEYS if k in declared and declared[k] != vision[k])
            if clash:
                raise CheckpointError(f"{cfg.path}: vision_config disagrees with {clip_dir / 'config.json'} on {clash}")
        _check_vision_geometry(cfg, vision, clip_dir / "config.json")
        if embedded:
            return VisionSource("checkpoint", vision, [])
        clip_files = find_weight_files(clip_dir)
        prefixed = any(k.startswith(CLIP_VISION_PREFIX) for f in clip_files for k in f.shapes)
        return VisionSource(str(clip_dir), vision, clip_files, CLIP_VISION_PREFIX if prefixed else "")
    if embedded:
        if cfg.vision is None:
            raise CheckpointError(
                f"{cfg.path}: unknown vision tower {cfg.mm_vision_tower!r}: its architecture is not known "
                "(known: openai/clip-vit-large-patch14-336, a 'vision_config' in config.json, or "
                "--vision-tower DIR with the tower's config.json)"
            )
        _check_vision_geometry(cfg, cfg.vision, cfg.path)
        return VisionSource("checkpoint", cfg.vision, [])
    raise CheckpointError(
        f"{cfg.path.parent}: the checkpoint has no vision weights ({EMBEDDED_VISION_PREFIX}*) "
        f"and mm_vision_tower {cfg.mm_vision_tower!r} is not a local directory; pass --vision-tower DIR "
        "(a CLIP ViT-L/14-336 checkpoint)"
    )


_GEOMETRY_KEYS = (*VISION_INT_KEYS, "hidden_act", "layer_norm_eps")


def _check_vision_geometry(cfg: MobileVLMConfig, vision: dict, source: Path) -> None:
    """336x336 input, 14-pixel patches, the projector's input width and a select layer inside the tower.

    `source` is the config.json that gave the tower's geometry.
    """
    for key, value in _REQUIRED_VISION_GEOMETRY.items():
        if int(vision[key]) != value:
            raise CheckpointError(f"{source}: vision tower has {key} {vision[key]}, MobileVLM V2 needs {value}")
    if int(vision["hidden_size"]) != cfg.mm_hidden_size:
        raise CheckpointError(
            f"{cfg.path}: mm_hidden_size {cfg.mm_hidden_size} does not match the vision tower's hidden_size "
            f"{vision['hidden_size']} ({source})"
        )
    try:
        vision_layers_used(int(vision["num_hidden_layers"]), cfg.mm_vision_select_layer)
    except ValueError as e:
        raise CheckpointError(f"{cfg.path}: {e} (vision tower from {source})") from None


def _checkpoint_key(key: str, vision_prefix: str) -> str:
    """Key in the MobileVLM checkpoint -> reference key."""
    if key.startswith(EMBEDDED_VISION_PREFIX):
        return vision_prefix + key[len(EMBEDDED_VISION_PREFIX) :]
    if key.startswith(PROJECTOR_PREFIX):
        return "mm_projector." + key[len(PROJECTOR_PREFIX) :]
    return "language_model." + key


def published_name(
    model_key: str, vision_prefix: str, clip_dir: str | None = None, clip_prefix: str = CLIP_VISION_PREFIX
) -> str:
    """Reference key -> the name in the published files (the CLIP directory's when `clip_dir`)."""
    if model_key.startswith(vision_prefix):
        inner = model_key[len(vision_prefix) :]
        return f"{clip_prefix}{inner} ({clip_dir})" if clip_dir else EMBEDDED_VISION_PREFIX + inner
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
            if key.startswith(vision.clip_prefix):
                inner = key[len(vision.clip_prefix) :]
            else:
                inner = f"<outside {vision.clip_prefix.rstrip('.')}>.{key}"
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
    """Validate every tensor by name, shape and dtype, then load the reference in `dtype` (eval mode).

    Each tensor is checked for NaN/Inf as it is loaded (before and after the cast to `dtype`),
    so that a corrupt weight is named here rather than found by verify layers later.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cfg = load_mobilevlm_config(checkpoint_dir)
    files = find_weight_files(checkpoint_dir)
    vision = _vision_source(cfg, files, vision_tower)

    _check_layer_counts(cfg, files, vision)
    # The expected names and shapes come from a model on the meta device: a config that asks
    # for absurd sizes is then a shape mismatch with the files, not a failed allocation.
    skeleton = _build(cfg, vision.config, torch.device("meta"))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}

    plan: dict[str, tuple[WeightFile, str]] = {}
    unexpected, misshaped, wrong_dtype, duplicated = [], [], [], []
    sources = list(_sources(files, vision, skeleton.vision_prefix))
    for f, key, model_key in sources:
        if model_key not in expected:
            unexpected.append(f"{key} ({f.path.name})")
        elif f.shapes[key] != expected[model_key]:
            misshaped.append(f"{key} is {list(f.shapes[key])}, expected {list(expected[model_key])} ({f.path.name})")
        elif f.dtypes[key] not in FLOAT_DTYPES:
            wrong_dtype.append(f"{key} is {f.dtypes[key]} ({f.path.name})")
        elif model_key in plan:
            duplicated.append(f"{key} ({plan[model_key][0].path.name}, {f.path.name})")
        else:
            plan[model_key] = (f, key)
    # A tensor refused for its shape or dtype is reported as such, not also as missing.
    found = {model_key for _, _, model_key in sources}
    missing = [k for k in expected if k not in found]
    problems = []
    if missing:
        clip_dir = vision.description if vision.from_clip_dir else None
        problems.append(
            _summarise(
                "missing tensors",
                [published_name(k, skeleton.vision_prefix, clip_dir, vision.clip_prefix) for k in missing],
            )
        )
    if misshaped:
        problems.append(_summarise("mis-shaped tensors", misshaped))
    if wrong_dtype:
        problems.append(_summarise(f"tensors not {'/'.join(FLOAT_DTYPES)}", wrong_dtype))
    if duplicated:
        problems.append(_summarise("tensors stored twice", duplicated))
    if unexpected:
        problems.append(_summarise("unexpected tensors", unexpected))
    if problems:
        raise CheckpointError(f"{checkpoint_dir}: " + "; ".join(problems))

    model = _build(cfg, vision.config)  # sizes now match the files on disk
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, tuple[WeightFile, dict[str, str]]] = {}
    for model_key, (f, key) in plan.items():
        by_file.setdefault(f.path, (f, {}))[1][key] = model_key
    for f, names in by_file.values():
        for key, tensor in f.tensors(set(names)):
            state[names[key]] = _checked_cast(tensor, dtype, key, f.path)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(dtype).eval()
    return LoadedCheckpoint(cfg, model, vision.description, [f.path for f in files + vision.files])


_DECODER_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def _layers_found(keys: list[str], pattern: re.Pattern) -> set[int]:
    return {int(m.group(1)) for key in keys if (m := pattern.match(key))}


def _check_layer_counts(cfg: MobileVLMConfig, files: list[WeightFile], vision: VisionSource) -> None:
    """The layer counts of config.json (decoder and vision tower) against the layers the weight
    files' headers name, before anything is built: even on the meta device, the skeleton model is
    built layer by layer, so a small config asking for a million layers took minutes and gigabytes.
    The widths cost nothing there: the full name-and-shape check names any mismatch of theirs."""
    decoder = _layers_found([k for f in files for k in f.shapes], _DECODER_LAYER)
    if vision.from_clip_dir:
        vision_keys = [k.removeprefix(vision.clip_prefix) for f in vision.files for k in f.shapes]
    else:
        vision_keys = [
            k[len(EMBEDDED_VISION_PREFIX) :] for f in files for k in f.shapes if k.startswith(EMBEDDED_VISION_PREFIX)
        ]
    where = f"{vision.description}/config.json" if vision.from_clip_dir else str(cfg.path)
    for part, claimed, found, source in (
        ("decoder", cfg.num_layers, decoder, str(cfg.path)),
        ("vision tower", int(vision.config["num_hidden_layers"]), _layers_found(vision_keys, _VISION_LAYER), where),
    ):
        if found != set(range(claimed)):
            held = f"{len(found)} ({min(found)}..{max(found)})" if found else "none"
            raise CheckpointError(
                f"{source}: the {part}'s num_hidden_layers is {claimed}, but the weights hold {part} layers: {held}"
            )


def _build(cfg: MobileVLMConfig, vision_config: dict, device: torch.device | None = None) -> MobileVLMReference:
    try:
        with no_init_weights(), device or contextlib.nullcontext():
            return MobileVLMReference(cfg, vision_config)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # transformers' config checks, allocation
        raise CheckpointError(f"{cfg.path}: cannot build the model from this config ({one_line(e)})") from None


def _all_finite(tensor: torch.Tensor) -> bool:
    # min/max propagate NaN and are +-Inf when any value is: one pass without allocating a
    # mask, some 10x faster than isfinite().all() on a large embedding table.
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _checked_cast(tensor: torch.Tensor, dtype: torch.dtype, key: str, path: Path) -> torch.Tensor:
    """`tensor` in `dtype`, refusing NaN/Inf in the file and values the cast turns into Inf."""
    if not _all_finite(tensor):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise CheckpointError(
            f"{path}: tensor {key} holds {nan} NaN and {inf} Inf values (of {tensor.numel()}); "
            "the checkpoint is corrupt"
        )
    cast = tensor.to(dtype)
    if cast.dtype != tensor.dtype and not _all_finite(cast):
        largest = float(tensor.abs().max())
        raise CheckpointError(
            f"{path}: tensor {key} has values up to {largest:.4g}, beyond the range of "
            f"{str(dtype).removeprefix('torch.')}; export with a wider --dtype"
        )
    return cast
