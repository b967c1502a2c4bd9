"""Checkpoint files that cannot be read, or are not what they claim: one line that says which.

"unreadable" when the file cannot be read (permissions, a symlink loop, a directory, a FIFO);
"missing" when it is not there; "not valid JSON" only when its bytes were read and are not JSON.
The tests run as root here, and root reads a chmod 000 file anyway: the permission cases drop
the effective user to `nobody` (seteuid) around the call under test, in a directory tree that
`nobody` may traverse, and first check that `nobody` can read the same file when its mode allows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sentencepiece.sentencepiece_model_pb2  # noqa: F401  (imported before dropping privileges)
from test_model_inputs_weights import assert_one_line_input_error

import mvlm_compile.model.golden  # noqa: F401  (the golden command's lazy imports, loaded as root)
import mvlm_compile.verify.golden_io  # noqa: F401
from mvlm_compile.errors import CheckpointError
from mvlm_compile.model import config as config_module
from mvlm_compile.model.config import load_mobilevlm_config, read_json
from mvlm_compile.model.loader import load_checkpoint
from mvlm_compile.model.tokenizer import load_tokenizer

NOBODY = 65534


@contextmanager
def as_unprivileged_user() -> Iterator[None]:
    """Run the block with the file permissions of `nobody` (a no-op when not root)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
    except PermissionError:  # root without CAP_SETUID (some containers)
        os.setegid(0)
        pytest.skip("cannot drop privileges to test file permissions")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_checkpoint(tiny_checkpoint) -> Iterator[Path]:
    """A copy of the tiny checkpoint that `nobody` can traverse and read (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="mvlm-perm-"))
    try:
        root.chmod(0o755)
        ck = Path(shutil.copytree(tiny_checkpoint, root / "ck"))
        ck.chmod(0o755)
        for path in ck.iterdir():
            path.chmod(0o644)
        yield ck
    finally:
        shutil.rmtree(root)


def _config(ck: Path) -> dict:
    return json.loads((ck / "config.json").read_text())


@pytest.fixture
def ck(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))


def test_unreadable_config_says_unreadable(shared_checkpoint):
    config = shared_checkpoint / "config.json"
    with as_unprivileged_user():
        assert load_mobilevlm_config(shared_checkpoint).hidden_size == 64  # readable when the mode allows
    config.chmod(0o000)
    with as_unprivileged_user(), pytest.raises(CheckpointError) as info:
        load_mobilevlm_config(shared_checkpoint)
    assert str(info.value) == f"{config}: unreadable (MobileVLM V2 config): Permission denied"


def test_unreadable_config_through_the_cli(shared_checkpoint):
    (shared_checkpoint / "config.json").chmod(0o000)
    out = shared_checkpoint / "golden"
    with as_unprivileged_user():
        assert_one_line_input_error(
            ["golden", "--checkpoint", shared_checkpoint, "--out", out],
            r"config\.json: unreadable \(MobileVLM V2 config\): Permission denied$",
            shared_checkpoint,
        )
    assert not out.exists()


def test_unreadable_weights_and_tokenizer_say_unreadable(shared_checkpoint):
    weights = shared_checkpoint / "model.safetensors"
    weights.chmod(0o000)
    with as_unprivileged_user(), pytest.raises(CheckpointError) as info:
        load_checkpoint(shared_checkpoint)
    assert str(info.value) == f"{weights}: unreadable (weight file): Permission denied"

    tokenizer = shared_checkpoint / "tokenizer.json"
    tokenizer.chmod(0o000)
    with as_unprivileged_user(), pytest.raises(CheckpointError, match=rf"^{tokenizer}: unreadable"):
        load_tokenizer(shared_checkpoint)


def test_permission_error_mapping_without_root(ck, monkeypatch):
    """The same mapping as a unit test, for machines where seteuid is not available."""

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(ck / "config.json"))

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable \(MobileVLM V2 config\): Permission denied$"):
        load_mobilevlm_config(ck)


def test_config_symlink_loop(ck, tmp_path):
    (ck / "config.json").unlink()
    os.symlink("loop-b.json", ck / "config.json")
    os.symlink("config.json", ck / "loop-b.json")
    assert_one_line_input_error(
        ["golden", "--checkpoint", ck, "--out", tmp_path / "golden"],
        r"config\.json: unreadable \(MobileVLM V2 config\): Too many levels of symbolic links$",
        tmp_path,
    )


def test_config_broken_symlink_is_missing(ck):
    (ck / "config.json").unlink()
    os.symlink("nowhere.json", ck / "config.json")
    with pytest.raises(
        CheckpointError, match=r"config\.json: missing \(MobileVLM V2 config\) \(a broken symbolic link\)$"
    ):
        load_mobilevlm_config(ck)


def test_config_that_is_a_directory_or_a_fifo(ck):
    (ck / "config.json").unlink()
    (ck / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable \(MobileVLM V2 config\): a directory$"):
        load_mobilevlm_config(ck)
    (ck / "config.json").rmdir()
    os.mkfifo(ck / "config.json")  # reading it would block forever
    with pytest.raises(CheckpointError, match=r"unreadable \(MobileVLM V2 config\): not a regular file$"):
        load_mobilevlm_config(ck)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"model_type": "mobilevlm",', r"not valid JSON \(MobileVLM V2 config\): Expecting"),
        (b"", r"not valid JSON \(MobileVLM V2 config\): Expecting value"),
        (b"\xff\xfe{}", r"not valid JSON \(MobileVLM V2 config\): 'utf-8' codec"),
        (b"[" * 100_000, r"not valid JSON \(MobileVLM V2 config\): nested too deeply"),
        (b'[{"model_type": "mobilevlm"}]', r"MobileVLM V2 config must be a JSON object, found a list$"),
        (b'"mobilevlm"', r"MobileVLM V2 config must be a JSON object, found a string$"),
        (b"null", r"MobileVLM V2 config must be a JSON object, found null$"),
    ],
)
def test_config_that_is_not_a_json_object(ck, tmp_path, content, message):
    (ck / "config.json").write_bytes(content)
    line = assert_one_line_input_error(["golden", "--checkpoint", ck, "--out", tmp_path / "golden"], message, tmp_path)
    assert "unreadable" not in line


def test_oversized_json_is_not_read_into_memory(ck, monkeypatch):
    monkeypatch.setattr(config_module, "MAX_JSON_BYTES", 64)
    with pytest.raises(
        CheckpointError, match=r"config\.json: not valid JSON \(MobileVLM V2 config\): larger than 64 bytes"
    ):
        read_json(ck / "config.json", "MobileVLM V2 config")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, r"missing LLaMA keys \['hidden_size'\]"),
        ({"vocab_size": None, "rms_norm_eps": None}, r"missing LLaMA keys \['rms_norm_eps', 'vocab_size'\]"),
        ({"hidden_size": "64"}, r"hidden_size is '64', expected a positive integer"),
        ({"num_hidden_layers": True}, r"num_hidden_layers is True, expected a positive integer"),
        ({"num_attention_heads": 0}, r"num_attention_heads is 0, expected a positive integer"),
        ({"intermediate_size": -192}, r"intermediate_size is -192, expected a positive integer"),
        ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps is '1e-6', expected a positive number"),
        ({"num_attention_heads": 5}, r"hidden_size 64 is not a multiple of num_attention_heads 5"),
        ({"num_key_value_heads": 3}, r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"mm_hidden_size": 64.5}, r"mm_hidden_size is 64\.5, expected a positive integer"),
        ({"mm_vision_select_layer": "-2"}, r"mm_vision_select_layer is '-2', expected an integer"),
        ({"mm_vision_select_layer": -9}, r"mm_vision_select_layer -9 is outside a 2-layer tower"),
        ({"mm_vision_tower": ["a"]}, r"mm_vision_tower is \['a'\], expected a hub name or a directory"),
        ({"vision_config": [1]}, r"the vision config is list, expected an object"),
        ({"vision_config": {"hidden_size": 64}}, r"vision config lacks \['intermediate_size'"),
        ({"rope_theta": 0}, r"rope_theta is 0, expected a positive number"),
        ({"hidden_act": "silly"}, r"cannot build the model from this config \(KeyError"),
        ({"tie_word_embeddings": "no"}, r"tie_word_embeddings is 'no', expected true or false"),
        # Absurd but well-typed sizes: a shape mismatch with the files, never a 4 TB allocation.
        ({"vocab_size": 10**12}, r"lm_head\.weight is \[512, 64\], expected \[1000000000000, 64\]"),
        ({"max_position_embeddings": 10**12}, r"max_position_embeddings is 1000000000000, expected at most 1048576"),
        (
            {"max_position_embeddings": 1e12},
            r"max_position_embeddings is 1000000000000\.0, expected a positive integer",
        ),
    ],
)
def test_config_with_missing_or_mistyped_keys(ck, tmp_path, change, message):
    config = _config(ck)
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (ck / "config.json").write_text(json.dumps(config))
    assert_one_line_input_error(["golden", "--checkpoint", ck, "--out", tmp_path / "golden"], message, tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 224}, r"vision tower has image_size 224, MobileVLM V2 needs 336"),
        ({"num_attention_heads": 3}, r"vision hidden_size 64 is not a multiple of num_attention_heads 3"),
        ({"hidden_act": "swish"}, r"vision hidden_act is 'swish'"),
        ({"layer_norm_eps": 0}, r"vision layer_norm_eps is 0, expected a positive number"),
    ],
)
def test_embedded_vision_config_is_checked(ck, change, message):
    config = _config(ck)
    config["vision_config"].update(change)
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ck)


def test_checkpoint_path_that_does_not_exist_or_is_a_file(tmp_path):
    assert_one_line_input_error(
        ["golden", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "golden"],
        r"nothing: does not exist \(expected a MobileVLM V2 checkpoint directory\)$",
        tmp_path,
    )
    (tmp_path / "file").write_text("x")
    assert_one_line_input_error(
        ["golden", "--checkpoint", tmp_path / "file", "--out", tmp_path / "golden"],
        r"file: not a directory \(expected a MobileVLM V2 checkpoint directory\)$",
        tmp_path,
    )


def test_damaged_config_is_always_a_checkpoint_error(ck):
    """config.json with characters replaced by JSON punctuation (fixed seed, bounded): valid, or one line."""
    import random

    good = (ck / "config.json").read_bytes()
    rng = random.Random(5)
    for _ in range(200):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.choice(b'{}[]":,0-.eE tfn\\')
        (ck / "config.json").write_bytes(bytes(data))
        try:
            load_mobilevlm_config(ck)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{ck / 'config.json'}: ")
