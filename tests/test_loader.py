"""The checkpoint loader on synthetic checkpoints in the published layout, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mvlm_compile.errors import CheckpointError
from mvlm_compile.model.loader import load_checkpoint
from mvlm_compile.model.synth import write_synthetic_checkpoint


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _published_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_embedded_layout_loads_every_tensor_unchanged(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    state = loaded.model.state_dict()
    published = _published_tensors(tiny_checkpoint)
    assert loaded.vision_source == "checkpoint"
    vision_keys = [k for k in published if k.startswith("model.vision_tower.vision_tower.vision_model.")]
    assert vision_keys, "the embedded layout must carry the vision tower"
    for key, tensor in published.items():
        if key.startswith("model.vision_tower.vision_tower.vision_model."):
            model_key = loaded.model.vision_prefix + key.removeprefix("model.vision_tower.vision_tower.vision_model.")
        elif key.startswith("model.mm_projector."):
            model_key = "mm_projector." + key.removeprefix("model.mm_projector.")
        else:
            model_key = "language_model." + key
        assert torch.equal(state[model_key], tensor), key
    assert len(published) == len(state)


def test_separate_clip_directory_gives_the_same_model(tiny_checkpoint, tiny_separate):
    checkpoint, clip_dir = tiny_separate
    assert not any(k.startswith("model.vision_tower") for k in _published_tensors(checkpoint))
    separate = load_checkpoint(checkpoint, vision_tower=clip_dir)
    embedded = load_checkpoint(tiny_checkpoint)
    assert separate.vision_source == str(clip_dir)
    a, b = separate.model.state_dict(), embedded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mm_vision_tower_may_be_a_local_path(tiny_separate, tmp_path):
    checkpoint, clip_dir = tiny_separate
    local = _copy(checkpoint, tmp_path / "ckpt")
    config = json.loads((local / "config.json").read_text())
    config["mm_vision_tower"] = str(clip_dir)
    (local / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(local).vision_source == str(clip_dir)


def test_without_vision_weights_the_error_asks_for_vision_tower(tiny_separate):
    checkpoint, _ = tiny_separate
    with pytest.raises(CheckpointError, match=r"no vision weights .* pass --vision-tower DIR"):
        load_checkpoint(checkpoint)


def test_sharded_fp16_checkpoint_with_index(tmp_path, tiny_checkpoint):
    sharded = write_synthetic_checkpoint("tiny", tmp_path / "sharded", seed=0, dtype="fp16", max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    fp16 = load_checkpoint(sharded, dtype=torch.float32).model.state_dict()
    fp32 = load_checkpoint(tiny_checkpoint).model.state_dict()
    for key in fp32:
        assert torch.equal(fp16[key], fp32[key].half().float()), key


def test_bf16_and_pytorch_bin_checkpoints(tmp_path, tiny_checkpoint):
    bf16 = write_synthetic_checkpoint("tiny", tmp_path / "bf16", seed=0, dtype="bf16")
    as_bin = _copy(bf16, tmp_path / "bin")
    tensors = load_file(str(as_bin / "model.safetensors"))
    (as_bin / "model.safetensors").unlink()
    torch.save(tensors, as_bin / "pytorch_model.bin")
    from_bin = load_checkpoint(as_bin).model.state_dict()
    reference = load_checkpoint(tiny_checkpoint).model.state_dict()
    for key in reference:
        assert torch.equal(from_bin[key], reference[key].bfloat16().float()), key


def _rewrite_weights(checkpoint: Path, change) -> None:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path / "missing")
    _rewrite_weights(broken, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors 1: model\.layers\.1\.mlp\.down_proj\.weight"):
        load_checkpoint(broken)


def test_wrong_shape_is_named_with_both_shapes(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path / "shape")

    def transpose_peg(t):
        t["model.mm_projector.peg.peg.0.weight"] = t["model.mm_projector.peg.peg.0.weight"].reshape(64, 9, 1, 1)

    _rewrite_weights(broken, transpose_peg)
    with pytest.raises(
        CheckpointError, match=r"model\.mm_projector\.peg\.peg\.0\.weight is \[64, 9, 1, 1\], expected \[64, 1, 3, 3\]"
    ):
        load_checkpoint(broken)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path / "extra")
    _rewrite_weights(broken, lambda t: t.__setitem__("model.mm_projector.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors 1: model\.mm_projector\.extra\.weight"):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mm_projector_type": "ldpnet"}, r"'ldpnet', a MobileVLM V1 projector"),
        ({"model_type": "llava"}, r"model_type is 'llava', expected 'mobilevlm'"),
        ({"vision_tower_type": "siglip"}, r"vision_tower_type is 'siglip'"),
        ({"mm_hidden_size": 1024}, r"mm_hidden_size 1024 does not match the vision tower's hidden_size 64"),
    ],
)
def test_config_errors(tiny_checkpoint, tmp_path, change, message):
    broken = _copy(tiny_checkpoint, tmp_path / "config")
    config = json.loads((broken / "config.json").read_text())
    config.update(change)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(broken)


def test_unknown_vision_tower_with_embedded_weights(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path / "tower")
    config = json.loads((broken / "config.json").read_text())
    del config["vision_config"]
    config["mm_vision_tower"] = "someone/clip-vit-base-patch16"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown vision tower 'someone/clip-vit-base-patch16'"):
        load_checkpoint(broken)


def test_corrupt_safetensors_file(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path / "corrupt")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        load_checkpoint(broken)


def test_clip_directory_with_wrong_geometry(tiny_separate, tmp_path):
    checkpoint, clip_dir = tiny_separate
    wrong = _copy(clip_dir, tmp_path / "clip224")
    config = json.loads((wrong / "config.json").read_text())
    config["vision_config"]["image_size"] = 224
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"image_size 224, MobileVLM V2 needs 336"):
        load_checkpoint(checkpoint, vision_tower=wrong)
