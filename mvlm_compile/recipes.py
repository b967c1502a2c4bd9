"""Recipes (recipes/*.yaml: architecture, precision per component, defaults) and target
profiles (recipes/targets/targets.yaml: SM, memory, bandwidth, TensorRT builder). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.manifest import MANIFEST_NAME, Manifest
from mvlm_compile.model.config import MobileVLMConfig
from mvlm_compile.resources import RECIPES_DIR
from mvlm_compile.trt_env import FLAVOURS, Flavour, sm_text

TARGETS_FILE = RECIPES_DIR / "targets" / "targets.yaml"


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: dict[str, Any]
    precision: dict[str, Any]
    defaults: dict[str, Any]
    path: Path
    tolerances: dict[str, dict[str, Any]]  # by precision; verify's defaults fill the gaps
    calibration: dict[str, Any] = field(default_factory=dict)  # AWQ's data: e.g. {task: shapes, samples: 32}


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "jetson", "x86" or "rtx"
    sm: int
    memory_gb: float
    memory_budget_gb: float
    bandwidth_gbs: float
    min_tensorrt: str  # of the target's builder flavour
    defaults: dict[str, Any]
    builder: str = "tensorrt"  # mvlm_compile.trt_env.FLAVOURS: "tensorrt" (on the target) or "tensorrt-rtx"

    @property
    def flavour(self) -> Flavour:
        return FLAVOURS[self.builder]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MvlmError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise MvlmError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise MvlmError(f"{path}: expected a mapping")
    return data


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (recipes/<name>.yaml) or by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise MvlmError(f"unknown recipe {str(name_or_path)!r}; choose one of {recipe_names()} or give a path")
    data = _read_yaml(path)
    missing = [k for k in ("name", "architecture", "precision", "defaults") if k not in data]
    if missing:
        raise MvlmError(f"{path}: recipe lacks {missing}")
    _check_architecture(path, data["architecture"])
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict):
        raise MvlmError(f"{path}: 'calibration' must be a mapping (e.g. {{task: shapes, samples: 32}})")
    return Recipe(
        data["name"],
        data["architecture"],
        data["precision"],
        data["defaults"],
        path,
        data.get("tolerances", {}),
        calibration,
    )


def manifest_recipe(manifest: Manifest, where: Path | str = MANIFEST_NAME) -> Recipe | None:
    """The recipe an artifacts manifest names (`model.recipe`, written by export), or None.

    Only a recipe name of this installation (recipes/<name>.yaml) is taken: the manifest may come
    from another machine, and a path there would make us read a file outside the bundle. `where`
    (the manifest's path) goes into the message."""
    name = manifest.model.get("recipe")
    if not name:
        return None
    if not isinstance(name, str) or name not in recipe_names():
        raise ArtifactError(
            f"{where}: model.recipe {name!r} is not a recipe name (one of {recipe_names()}); "
            "a manifest never names a recipe file: pass --recipe NAME|PATH"
        )
    return load_recipe(name)


# The geometry a recipe names (its model's), as config.json spells it; a build checks the
# checkpoint or the artifacts against it, and plans memory from it.
ARCHITECTURE_KEYS = {
    "decoder": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
    "vision": ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "select_layer"),
}


def _check_architecture(path: Path, architecture: Any) -> None:
    for part, keys in ARCHITECTURE_KEYS.items():
        values = architecture.get(part) if isinstance(architecture, dict) else None
        if not isinstance(values, dict):
            raise MvlmError(f"{path}: architecture.{part} must be a mapping of {', '.join(keys)}")
        bad = [k for k in keys if isinstance(values.get(k), bool) or not isinstance(values.get(k), int)]
        if bad:
            raise MvlmError(f"{path}: architecture.{part} lacks integer {', '.join(bad)}")


def load_targets(path: Path = TARGETS_FILE) -> dict[str, Target]:
    data = _read_yaml(path)
    targets = {
        name: Target(
            name=name,
            kind=spec["kind"],
            sm=int(spec["sm"]),
            memory_gb=float(spec["memory_gb"]),
            memory_budget_gb=float(spec["memory_budget_gb"]),
            bandwidth_gbs=float(spec["bandwidth_gbs"]),
            min_tensorrt=str(spec["min_tensorrt"]),
            defaults=dict(spec.get("defaults", {})),
            builder=str(spec.get("builder", "tensorrt")),
        )
        for name, spec in data.items()
    }
    for target in targets.values():
        _check_builder(path, target)
    return targets


def _check_builder(path: Path, target: Target) -> None:
    """The builder exists and, when it builds ahead of time, knows the target's compute capability."""
    if target.builder not in FLAVOURS:
        raise MvlmError(f"{path}: {target.name}: builder {target.builder!r}, expected one of {', '.join(FLAVOURS)}")
    flavour = target.flavour
    if flavour.ahead_of_time and target.sm not in flavour.sms:
        known = ", ".join(sm_text(sm) for sm in flavour.sms)
        raise MvlmError(
            f"{path}: {target.name}: {flavour.name} cannot build for compute capability {sm_text(target.sm)} "
            f"(it knows {known})"
        )


def load_target(name: str) -> Target:
    targets = load_targets()
    if name not in targets:
        raise MvlmError(f"unknown target {name!r}; choose one of {sorted(targets)}")
    return targets[name]


def architecture_mismatches(recipe: Recipe, cfg: MobileVLMConfig) -> list[str]:
    """Differences between the recipe's expected architecture and a checkpoint's config."""
    found = {
        "decoder": {k: cfg.text.get(k) for k in recipe.architecture["decoder"]},
        "vision": {
            **{k: (cfg.vision or {}).get(k) for k in recipe.architecture["vision"] if k != "select_layer"},
            "select_layer": cfg.mm_vision_select_layer,
        },
    }
    problems = []
    for part, values in found.items():
        for key, value in values.items():
            expected = recipe.architecture[part][key]
            if part == "vision" and value is None and key != "select_layer":
                continue  # tower architecture comes from a separate CLIP directory: checked when loading
            if value != expected:
                problems.append(f"{part}.{key} is {value}, recipe {recipe.name} expects {expected}")
    return problems


def check_recipe_fits_checkpoint(recipe: Recipe, cfg: MobileVLMConfig) -> None:
    """A recipe names a model's geometry: another model's checkpoint is refused (exit 2)."""
    problems = architecture_mismatches(recipe, cfg)
    if problems:
        raise MvlmError(
            f"--recipe {recipe.name}: does not fit the checkpoint {cfg.path.parent} ({'; '.join(problems)})"
        )


# The recipe's geometry as an artifacts manifest records it (manifest.json "model").
_MANIFEST_GEOMETRY = {
    ("decoder", "hidden_size"): "hidden_size",
    ("decoder", "num_hidden_layers"): "num_layers",
    ("decoder", "num_attention_heads"): "num_heads",
    ("decoder", "vocab_size"): "vocab_size",
    ("vision", "hidden_size"): "mm_hidden_size",
}


def check_recipe_fits_artifacts(recipe: Recipe, model: dict[str, Any], manifest_path: Path) -> None:
    """The recipe's geometry against an artifacts manifest's model record: another model's recipe is refused."""
    problems = [
        f"{part}.{key} is {model.get(field)}, recipe {recipe.name} expects {recipe.architecture[part][key]}"
        for (part, key), field in _MANIFEST_GEOMETRY.items()
        if model.get(field) != recipe.architecture[part][key]
    ]
    if problems:
        raise MvlmError(f"--recipe {recipe.name}: does not fit {manifest_path} ({'; '.join(problems)})")


def recipe_for(cfg: MobileVLMConfig) -> Recipe:
    """The recipe whose architecture matches the checkpoint."""
    for name in recipe_names():
        recipe = load_recipe(name)
        if not architecture_mismatches(recipe, cfg):
            return recipe
    raise MvlmError(
        f"{cfg.path}: no recipe matches this architecture (hidden {cfg.hidden_size}, {cfg.num_layers} layers); "
        f"known recipes: {recipe_names()}; pass --recipe PATH"
    )
