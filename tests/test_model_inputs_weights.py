"""Bad weights in a checkpoint: each one a one-line input error naming the tensor and its file.

The `golden` command is the first one to load a checkpoint; through the CLI every case must end
with exit status 2, one `error:` line and nothing written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mvlm_compile.cli import cli
from mvlm_compile.errors import EXIT_INPUT_ERROR, CheckpointError
from mvlm_compile.model.loader import load_checkpoint

PEG = "model.mm_projector.peg.peg.0.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(checkpoint: Path, change) -> None:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` with its size, mtime and mode: what 'nothing on disk changed' compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns, info.st_mode)
    return out


def assert_one_line_input_error(args: list, match: str, root: Path) -> str:
    """`mvlm-compile ARGS` exits 2 with one `error:` line matching `match`, and leaves `root` as it was."""
    before = snapshot(root)
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == EXIT_INPUT_ERROR, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert re.search(match, lines[0]), lines[0]
    assert snapshot(root) == before
    return lines[0]


@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.int64, "int64"), (torch.bool, "bool"), (torch.float64, "float64"), (torch.int8, "int8")]
)
def test_a_tensor_of_a_non_float_dtype_is_named(tiny_checkpoint, tmp_path, dtype, name):
    broken = _copy(tiny_checkpoint, tmp_path / "ck")
    _rewrite(broken, lambda t: t.__setitem__(DOWN, t[DOWN].to(dtype)))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(broken)
    message = str(info.value)
    assert f"{DOWN} is {name} (model.safetensors)" in message
    assert "float32/float16/bfloat16" in message
    assert "missing" not in message  # reported once, as a dtype problem


def test_dtype_error_through_the_cli_changes_nothing(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path / "ck")
    _rewrite(broken, lambda t: t.__setitem__(PEG, t[PEG].to(torch.int32)))
    assert_one_line_input_error(
        ["golden", "--checkpoint", broken, "--out", tmp_path / "golden"],
        rf"{PEG} is int32 \(model\.safetensors\)",
        tmp_path,
    )
    assert not (tmp_path / "golden").exists()


@pytest.mark.parametrize(
    ("value", "counts"),
    [(float("nan"), "2 NaN and 0 Inf"), (float("inf"), "0 NaN and 2 Inf"), (float("-inf"), "0 NaN and 2 Inf")],
)
def test_nan_or_inf_weight_is_named_with_its_file(tiny_checkpoint, tmp_path, value, counts):
    broken = _copy(tiny_checkpoint, tmp_path / "ck")

    def poison(t):
        t[DOWN][-1, -2:] = value

    _rewrite(broken, poison)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(broken)
    assert str(info.value) == (
        f"{broken / 'model.safetensors'}: tensor {DOWN} holds {counts} values (of {192 * 64}); "
        "the checkpoint is corrupt"
    )


def test_nan_in_a_separate_clip_directory_names_that_file(tiny_separate, tmp_path):
    checkpoint, clip_dir = tiny_separate
    clip = _copy(clip_dir, tmp_path / "clip")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"

    def poison(t):
        t[key][3, 3] = float("nan")

    _rewrite(clip, poison)
    with pytest.raises(CheckpointError, match=rf"^{clip / 'model.safetensors'}: tensor {key} holds 1 NaN"):
        load_checkpoint(checkpoint, vision_tower=clip)


def test_a_value_beyond_float16_is_refused_when_loading_in_fp16(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint, tmp_path / "ck")

    def huge(t):
        t[DOWN][0, 0] = 1e6  # float16's largest finite value is 65504

    _rewrite(broken, huge)
    assert torch.isfinite(load_checkpoint(broken).model.state_dict()["language_model." + DOWN]).all()
    with pytest.raises(CheckpointError, match=rf"tensor {DOWN} has values up to 1e\+06, beyond the range of float16"):
        load_checkpoint(broken, dtype=torch.float16)


def test_legacy_non_zip_pytorch_bin_loads(tiny_checkpoint, tmp_path):
    as_bin = _copy(tiny_checkpoint, tmp_path / "bin")
    tensors = load_file(str(as_bin / "model.safetensors"))
    (as_bin / "model.safetensors").unlink()
    torch.save(tensors, as_bin / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert (as_bin / "pytorch_model.bin").read_bytes()[:2] != b"PK"  # really the legacy format
    state = load_checkpoint(as_bin).model.state_dict()
    reference = load_checkpoint(tiny_checkpoint).model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_pytorch_bin_that_is_not_a_state_dict(tiny_checkpoint, tmp_path):
    as_bin = _copy(tiny_checkpoint, tmp_path / "bin")
    (as_bin / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], as_bin / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a state dict"):
        load_checkpoint(as_bin)


def test_pytorch_bin_with_a_pickled_object_is_refused(tiny_checkpoint, tmp_path):
    as_bin = _copy(tiny_checkpoint, tmp_path / "bin")
    (as_bin / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2), "x": Path("/etc")}, as_bin / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(as_bin)
    assert "pytorch_model.bin: cannot be read as a weights-only PyTorch file (UnpicklingError" in str(info.value)
    assert "\n" not in str(info.value)


def test_zero_byte_weight_files(tiny_checkpoint, tmp_path):
    empty = _copy(tiny_checkpoint, tmp_path / "st")
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        load_checkpoint(empty)
    (empty / "model.safetensors").unlink()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be read as a weights-only PyTorch file"):
        load_checkpoint(empty)


def test_a_tensor_stored_in_two_shards_is_refused(tiny_checkpoint, tmp_path):
    sharded = _copy(tiny_checkpoint, tmp_path / "ck")
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    first = {k: tensors[k] for k in names[: len(names) // 2]}
    second = {k: tensors[k] for k in names[len(names) // 2 :]}
    second[names[0]] = tensors[names[0]]  # also in the first shard
    save_file(first, str(sharded / "a.safetensors"))
    save_file(second, str(sharded / "b.safetensors"))
    with pytest.raises(
        CheckpointError, match=rf"tensors stored twice 1: {names[0]} \(a\.safetensors, b\.safetensors\)"
    ):
        load_checkpoint(sharded)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", 7])
def test_index_names_only_files_of_the_checkpoint(tiny_checkpoint, tmp_path, name):
    ck = _copy(tiny_checkpoint, tmp_path / "ck")
    (tmp_path / "outside.safetensors").write_bytes((ck / "model.safetensors").read_bytes())
    keys = load_file(str(ck / "model.safetensors")).keys()
    weight_map = dict.fromkeys(keys, "model.safetensors") | {DOWN: name}
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json: weight_map names .*, expected a file name"
    ):
        load_checkpoint(ck)


def test_index_naming_a_missing_shard(tiny_checkpoint, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path / "ck")
    keys = load_file(str(ck / "model.safetensors")).keys()
    weight_map = dict.fromkeys(keys, "model.safetensors") | {DOWN: "model-00002-of-00002.safetensors"}
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError,
        match=r"model-00002-of-00002\.safetensors: weight file missing \(listed by model\.safetensors\.index\.json\)",
    ):
        load_checkpoint(ck)
