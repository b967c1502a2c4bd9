"""The vision tower from a CLIP directory: transformers 5's key layout, geometry from its config.json,
and `--vision-tower` paths that are not directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_inputs_weights import assert_one_line_input_error

from mvlm_compile.errors import CheckpointError
from mvlm_compile.model.loader import load_checkpoint


def _state(loaded) -> dict[str, torch.Tensor]:
    return loaded.model.state_dict()


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def transformers5_clip_dir(tiny_separate, tmp_path_factory) -> Path:
    """The tiny tower saved by transformers' own CLIPVisionModel.save_pretrained (no `vision_model.` prefix)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _, clip_dir = tiny_separate
    vision = json.loads((clip_dir / "config.json").read_text())["vision_config"]
    model = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"}))
    published = load_file(str(clip_dir / "model.safetensors"))
    own = model.state_dict()
    weights = {k: published["vision_model." + k] for k in own if "vision_model." + k in published}
    assert weights.keys() == own.keys() - {k for k in own if k.endswith("position_ids")}
    model.load_state_dict(weights, strict=False)
    out = tmp_path_factory.mktemp("clip-t5") / "clip"
    model.save_pretrained(str(out))
    return out


def test_clip_directory_without_vision_model_prefix(tiny_separate, transformers5_clip_dir):
    checkpoint, clip_dir = tiny_separate
    saved = load_file(str(transformers5_clip_dir / "model.safetensors"))
    assert saved and not any(k.startswith("vision_model.") for k in saved)  # what transformers 5 writes
    assert json.loads((transformers5_clip_dir / "config.json").read_text())["model_type"] == "clip_vision_model"
    loaded = load_checkpoint(checkpoint, vision_tower=transformers5_clip_dir)
    assert loaded.vision_source == str(transformers5_clip_dir)
    _assert_same_model(_state(loaded), _state(load_checkpoint(checkpoint, vision_tower=clip_dir)))


def test_missing_tensor_of_an_unprefixed_clip_directory_is_named_as_stored(
    tiny_separate, transformers5_clip_dir, tmp_path
):
    checkpoint, _ = tiny_separate
    clip = Path(shutil.copytree(transformers5_clip_dir, tmp_path / "clip"))
    tensors = load_file(str(clip / "model.safetensors"))
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    save_file(tensors, str(clip / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing tensors 1: encoder\.layers\.1\.mlp\.fc2\.bias \({clip}\)"):
        load_checkpoint(checkpoint, vision_tower=clip)


def _embedded_without_geometry(tiny_checkpoint: Path, out: Path) -> Path:
    """Embedded vision weights, config.json as published: a hub name for the tower and no vision_config."""
    ck = Path(shutil.copytree(tiny_checkpoint, out))
    config = json.loads((ck / "config.json").read_text())
    del config["vision_config"]
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ck / "config.json").write_text(json.dumps(config))
    return ck


def _config_only(clip_dir: Path, out: Path, **change) -> Path:
    out.mkdir()
    config = json.loads((clip_dir / "config.json").read_text())
    config["vision_config"].update(change)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_embedded_weights_take_the_geometry_of_a_local_tower_directory(tiny_checkpoint, tiny_separate, tmp_path):
    _, clip_dir = tiny_separate
    ck = _embedded_without_geometry(tiny_checkpoint, tmp_path / "ck")
    # The hub name's geometry (ViT-L: 1024 wide) is not this checkpoint's.
    with pytest.raises(CheckpointError, match=r"mm_hidden_size 64 does not match the vision tower's hidden_size 1024"):
        load_checkpoint(ck)
    tower = _config_only(clip_dir, tmp_path / "tower", layer_norm_eps=1e-3)  # config.json only, no weights
    loaded = load_checkpoint(ck, vision_tower=tower)
    assert loaded.vision_source == "checkpoint"  # the weights still come from the checkpoint
    assert loaded.model.vision_tower.config.layer_norm_eps == 1e-3  # the geometry from the directory
    reference = _state(load_checkpoint(tiny_checkpoint))
    _assert_same_model(_state(loaded), reference)

    # The same through mm_vision_tower naming a local directory.
    config = json.loads((ck / "config.json").read_text())
    config["mm_vision_tower"] = str(tower)
    (ck / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(ck).model.vision_tower.config.layer_norm_eps == 1e-3


def test_tower_directory_that_contradicts_the_embedded_vision_config(tiny_checkpoint, tiny_separate, tmp_path):
    _, clip_dir = tiny_separate
    tower = _config_only(clip_dir, tmp_path / "tower", layer_norm_eps=1e-3)
    with pytest.raises(
        CheckpointError, match=r"vision_config disagrees with .*tower/config\.json on \['layer_norm_eps'\]"
    ):
        load_checkpoint(tiny_checkpoint, vision_tower=tower)


def test_tower_directory_of_another_width_names_both(tiny_checkpoint, tiny_separate, tmp_path):
    _, clip_dir = tiny_separate
    ck = _embedded_without_geometry(tiny_checkpoint, tmp_path / "ck")
    tower = _config_only(clip_dir, tmp_path / "tower", hidden_size=128)
    with pytest.raises(CheckpointError, match=rf"hidden_size 128 \({tower / 'config.json'}\)"):
        load_checkpoint(ck, vision_tower=tower)


@pytest.mark.parametrize("embedded", [True, False])
def test_vision_tower_option_that_is_not_a_directory(tiny_checkpoint, tiny_separate, tmp_path, embedded):
    checkpoint = tiny_checkpoint if embedded else tiny_separate[0]
    out = tmp_path / "golden"
    assert_one_line_input_error(
        ["golden", "--checkpoint", checkpoint, "--vision-tower", tmp_path / "nothing", "--out", out],
        r"--vision-tower .*nothing: does not exist \(expected a CLIP checkpoint directory\)$",
        tmp_path,
    )
    (tmp_path / "file").write_text("{}")
    assert_one_line_input_error(
        ["golden", "--checkpoint", checkpoint, "--vision-tower", tmp_path / "file", "--out", out],
        r"--vision-tower .*file: not a directory \(expected a CLIP checkpoint directory\)$",
        tmp_path,
    )
    (tmp_path / "empty").mkdir()
    assert_one_line_input_error(
        ["golden", "--checkpoint", checkpoint, "--vision-tower", tmp_path / "empty", "--out", out],
        r"empty/config\.json: missing \(CLIP checkpoint config\)$",
        tmp_path,
    )
    assert not out.exists()
