"""A checkpoint with LLaMA's SentencePiece tokenizer files encodes as the authors' code does, BOS first,
and the exported tokenizer.json (the only tokenizer on the Jetson, through `tokenizers`) gives the same ids.

The authors load the tokenizer with `AutoTokenizer.from_pretrained(path, use_fast=False)`: transformers
4's SentencePiece LlamaTokenizer. `authors_encode` below re-implements that algorithm on top of
SentencePiece itself (split out the special tokens, SentencePiece on each piece, BOS first; with
legacy false, no dummy prefix after a special token); it is the independent reference. The
SentencePiece model is trained here with LLaMA's trainer settings (BPE, byte fallback, identity
normalisation, ids 0 <unk>, 1 <s>, 2 </s>).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from test_model_inputs_weights import assert_one_line_input_error
from tokenizers import Tokenizer

from mvlm_compile.errors import CheckpointError
from mvlm_compile.model.prompt import IMAGE_PLACEHOLDER, build_prompt, tokenize_with_image
from mvlm_compile.model.tokenizer import load_tokenizer

TRAINING_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: The image shows a red car next to a green tree.",
    "Describe the picture in detail. There are three cups, two plates and a bowl on the table.",
    "How many people are walking on the beach at sunset? About 12 people, maybe 15.",
    "Read the text on the sign: OPEN 24 HOURS. The quick brown fox jumps over the lazy dog.",
]
# MobileVLM V2's tokenizer_config.json as published (the keys that change encoding).
MOBILEVLM_V2_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False},
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False},
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False},
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}
QUESTIONS = [
    "What is in the image? Describe it in detail.",
    "How  many cups?\tCount them:\n1, 2, 3... ünïcode — 😀 ▁x",
    "Zyx qwv 9876543210 !!",
]
PLAIN_TEXTS = [
    *[chunk for q in QUESTIONS for chunk in build_prompt(q).split(IMAGE_PLACEHOLDER)],
    "What is in the image?",
    "two  spaces and a trailing one ",
    "",
]
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
TEXTS_WITH_SPECIALS = ["the end</s>USER: more", "a </s> b", "<s>hello", "x<unk>y</s>"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sentencepiece")
    (root / "corpus.txt").write_text("\n".join(TRAINING_TEXT * 3) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "llama-like"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return root / "llama-like.model"


def authors_encode(model_file: Path, text: str, legacy: bool, add_bos: bool = True) -> list[int]:
    """transformers 4's SentencePiece LlamaTokenizer (the authors' `use_fast=False`) on one text."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if legacy:
        encode = sp
    else:  # legacy false: SentencePiece without its dummy prefix; "▁" put in front of the text once
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        encode = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        text = "▁" + text.replace("▁", " ") if text else text
    unk_length = len(encode.encode("<unk>", out_type=str))
    pieces: list[str] = []
    for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if not part:
            continue
        if part in SPECIALS:
            pieces.append(part)
        elif legacy or not part.startswith(("▁", " ")):
            pieces += encode.encode(part, out_type=str)
        else:  # the authors' trick to keep a leading "▁" without a dummy prefix
            pieces += encode.encode("<unk>" + part, out_type=str)[unk_length:]
    if not legacy and len(pieces) > 1 and pieces[0] == "▁" and pieces[1] in SPECIALS:
        pieces = pieces[1:]
    ids = [SPECIALS[p] if p in SPECIALS else sp.piece_to_id(p) for p in pieces]
    return ([1] if add_bos else []) + ids


def _sentencepiece_checkpoint(tiny_checkpoint: Path, sp_model: Path, out: Path, config: dict | None) -> Path:
    """The tiny checkpoint with LLaMA-style tokenizer files: tokenizer.model (+ tokenizer_config.json)."""
    ck = Path(shutil.copytree(tiny_checkpoint, out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ck / name).unlink(missing_ok=True)
    shutil.copy(sp_model, ck / "tokenizer.model")
    if config is not None:
        (ck / "tokenizer_config.json").write_text(json.dumps(config))
    return ck


CONFIGS = {
    "sentencepiece only": None,
    "mobilevlm v2 (legacy false)": MOBILEVLM_V2_TOKENIZER_CONFIG,
    "legacy true": {**MOBILEVLM_V2_TOKENIZER_CONFIG, "legacy": True},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_plain_text_encodes_as_sentencepiece_with_bos_first(tiny_checkpoint, sp_model, tmp_path, name):
    config = CONFIGS[name]
    legacy = True if config is None else config["legacy"]
    tokenizer = load_tokenizer(_sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", config))
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    for text in PLAIN_TEXTS:
        expected = [1] + sp.encode(text)
        assert authors_encode(sp_model, text, legacy) == expected, text  # the reference agrees with itself
        assert tokenizer.encode(text) == expected, text
    # The 'v1' prompt as golden and the runtime build it: BOS once, first, then the image placeholder.
    for question in QUESTIONS:
        ids = tokenize_with_image(build_prompt(question), tokenizer.encode, tokenizer.bos_token_id)
        assert ids[0] == 1 and ids.count(1) == 1 and ids.count(-200) == 1


@pytest.mark.parametrize("legacy", [True, False])
def test_special_tokens_in_text_follow_the_legacy_flag(tiny_checkpoint, sp_model, tmp_path, legacy):
    config = {**MOBILEVLM_V2_TOKENIZER_CONFIG, "legacy": legacy}
    tokenizer = load_tokenizer(_sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", config))
    for text in TEXTS_WITH_SPECIALS:
        assert tokenizer.encode(text) == authors_encode(sp_model, text, legacy), text
    # The two flags differ after a special token, as the authors' tokenizers do.
    assert authors_encode(sp_model, "a</s>b", True) != authors_encode(sp_model, "a</s>b", False)


def test_leading_spaces_keep_sentencepiece_dummy_prefix_when_legacy(tiny_checkpoint, sp_model, tmp_path):
    tokenizer = load_tokenizer(_sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", None))
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in (" leading", "  two leading", "▁literal"):
        assert tokenizer.encode(text) == [1] + sp.encode(text) == authors_encode(sp_model, text, True), text


def test_matches_transformers_llama_tokenizer_on_the_v1_prompt(tiny_checkpoint, sp_model, tmp_path):
    from transformers import AutoTokenizer

    ck = _sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", MOBILEVLM_V2_TOKENIZER_CONFIG)
    ours = load_tokenizer(ck)
    theirs = AutoTokenizer.from_pretrained(str(ck), use_fast=False, local_files_only=True)
    for question in QUESTIONS:
        prompt = build_prompt(question)
        assert tokenize_with_image(prompt, ours.encode, 1) == tokenize_with_image(
            prompt, lambda text: theirs(text).input_ids, theirs.bos_token_id
        )


def test_add_bos_and_eos_flags(tiny_checkpoint, sp_model, tmp_path):
    config = {**MOBILEVLM_V2_TOKENIZER_CONFIG, "add_bos_token": False, "add_eos_token": True}
    tokenizer = load_tokenizer(_sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", config))
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tokenizer.encode("What is in the image?") == sp.encode("What is in the image?") + [2]


@pytest.mark.parametrize("name", ["sentencepiece only", "mobilevlm v2 (legacy false)"])
def test_export_and_golden_of_a_sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path, name):
    """The exported tokenizer.json, read by `tokenizers` alone, gives the authors' ids; golden puts BOS first."""
    from mvlm_compile.export.exporter import export_artifacts
    from mvlm_compile.model.golden import write_golden

    config = CONFIGS[name]
    legacy = True if config is None else config["legacy"]
    ck = _sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", config)
    manifest = export_artifacts(ck, tmp_path / "artifacts")
    exported = Tokenizer.from_file(str(tmp_path / "artifacts" / manifest.files["tokenizer"]))
    assert (manifest.model["bos_token_id"], manifest.model["eos_token_id"]) == (1, 2)
    for question in QUESTIONS:
        prompt = build_prompt(question)
        expected = tokenize_with_image(prompt, lambda text: authors_encode(sp_model, text, legacy), 1)
        assert tokenize_with_image(prompt, lambda text: exported.encode(text).ids, 1) == expected
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    answer = sp.encode("The image shows 3 cups — ünïcode 😀")
    assert exported.decode(answer) == sp.decode(answer)

    golden = write_golden(ck, tmp_path / "golden", max_new_tokens=2)
    generation = json.loads((tmp_path / "golden" / "generation.json").read_text())
    expected = tokenize_with_image(build_prompt(golden["question"]), lambda t: authors_encode(sp_model, t, legacy), 1)
    assert generation["input_ids"] == expected


def _break(ck: Path, name: str, content: bytes) -> None:
    (ck / name).write_bytes(content)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer.model", b"\x0a\xff\xff\xff garbage", r"tokenizer\.model: not a SentencePiece model"),
        ("tokenizer.model", b"", r"tokenizer\.model: not a SentencePiece model"),
        ("tokenizer_config.json", b"{oops", r"tokenizer_config\.json: not valid JSON \(tokenizer config\)"),
        ("tokenizer_config.json", b'{"add_bos_token": "yes"}', r"add_bos_token is 'yes', expected true or false"),
        ("tokenizer_config.json", b'{"bos_token": "<bos>"}', r"the BOS token '<bos>' is not in the vocabulary"),
    ],
)
def test_broken_tokenizer_files_are_one_line_errors(tiny_checkpoint, sp_model, tmp_path, name, content, message):
    ck = _sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", MOBILEVLM_V2_TOKENIZER_CONFIG)
    _break(ck, name, content)
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(ck)
    assert_one_line_input_error(["golden", "--checkpoint", ck, "--out", tmp_path / "golden"], message, tmp_path)
    assert not (tmp_path / "golden").exists()


def test_a_unigram_model_is_refused(tiny_checkpoint, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(TRAINING_TEXT * 3))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "uni"), vocab_size=100, minloglevel=2
    )
    ck = _sentencepiece_checkpoint(tiny_checkpoint, tmp_path / "uni.model", tmp_path / "ck", None)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: SentencePiece model type 1, expected BPE"):
        load_tokenizer(ck)


def test_tokenizer_larger_than_the_embedding_table(tiny_checkpoint, sp_model, tmp_path):
    ck = _sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", None)
    config = json.loads((ck / "config.json").read_text())
    config["vocab_size"] = 300
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"the tokenizer has 400 tokens, more than the model's vocab_size 300"):
        load_tokenizer(ck)


def test_no_tokenizer_files(tiny_checkpoint, tmp_path):
    ck = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    (ck / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer \(expected tokenizer\.model or tokenizer\.json\)"):
        load_tokenizer(ck)


def test_a_damaged_tokenizer_model_is_always_a_checkpoint_error(tiny_checkpoint, sp_model, tmp_path):
    """Truncated or bit-flipped copies of tokenizer.model (fixed seed, bounded): an input error or a model."""
    ck = _sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", MOBILEVLM_V2_TOKENIZER_CONFIG)
    good = sp_model.read_bytes()
    rng = random.Random(7)
    refused = 0
    for _ in range(120):
        data = bytearray(good[: rng.randrange(1, len(good) + 1)] if rng.random() < 0.25 else good)
        for _ in range(rng.randrange(1, 4)):  # a few flipped bytes still parse, into bad pieces
            data[rng.randrange(len(data))] = rng.randrange(256)
        (ck / "tokenizer.model").write_bytes(bytes(data))
        try:
            load_tokenizer(ck)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{ck / 'tokenizer.model'}: ")
            refused += 1
    assert refused > 20  # many damaged copies are refused; any other exception fails the test


def llava_v1_prompt(system: str, messages: list[tuple[str, str | None]]) -> str:
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO (conv_vicuna_v1, the authors' 'v1'):
    separators " " and "</s>", a message of None leaves the role open for the answer."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def llava_tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """llava/mm_utils.py's tokenizer_image_token, as published."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [-200] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


THREE_TURNS = [
    ("What is in the image?", "The image shows a red car next to a green tree."),
    ("How many cups are on the table?", "There are three cups, two plates and a bowl."),
    ("Read the text on the sign.", None),
]


@pytest.mark.parametrize("legacy", [False, True], ids=["mobilevlm v2 (legacy false)", "legacy true"])
@pytest.mark.parametrize("image", [True, False], ids=["image", "text only"])
def test_a_three_turn_conversation_has_the_ids_of_the_authors_template_and_tokenizer(
    tiny_checkpoint, sp_model, tmp_path, legacy, image
):
    """The runtime's prompt (exported tokenizer.json, read by `tokenizers` alone) against the authors'
    construction: LLaVA's conv_vicuna_v1 prompt string, their tokenizer_image_token, and transformers'
    SentencePiece LlamaTokenizer (use_fast=False), where each template "</s>" is the EOS token."""
    from transformers import AutoTokenizer

    from mvlm_compile.model.prompt import SYSTEM_V1, Dialogue, Turn
    from mvlm_compile.runtime.pipeline import PromptTokenizer

    config = {**MOBILEVLM_V2_TOKENIZER_CONFIG, "legacy": legacy}
    ck = _sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", config)
    theirs = AutoTokenizer.from_pretrained(str(ck), use_fast=False, local_files_only=True)
    messages: list[tuple[str, str | None]] = []
    turns: list[Turn] = []
    for i, (question, answer) in enumerate(THREE_TURNS):
        messages += [("USER", ("<image>\n" if image and i == 0 else "") + question), ("ASSISTANT", answer)]
        turns += [Turn("user", question)] + ([Turn("assistant", answer)] if answer else [])
    expected = llava_tokenizer_image_token(llava_v1_prompt(SYSTEM_V1, messages), theirs)
    assert expected.count(2) == 2 and expected.count(-200) == int(image)  # two turns ended, the image once

    path = tmp_path / "tokenizer.json"
    load_tokenizer(ck).backend_tokenizer.save(str(path))
    dialogue = Dialogue(tuple(turns), SYSTEM_V1, image)
    assert PromptTokenizer(path, 1, 2).ids(dialogue) == expected
    assert dialogue.text == llava_v1_prompt(SYSTEM_V1, messages).replace("<image>\n", "<image>\n" if image else "")
    if not legacy:  # the two settings part after a special token: the check above saw the difference
        legacy_ck = _sentencepiece_checkpoint(
            tiny_checkpoint, sp_model, tmp_path / "legacy", {**config, "legacy": True}
        )
        assert (
            llava_tokenizer_image_token(
                llava_v1_prompt(SYSTEM_V1, messages),
                AutoTokenizer.from_pretrained(str(legacy_ck), use_fast=False, local_files_only=True),
            )
            != expected
        )


def test_a_users_special_token_text_stays_text_in_a_later_turn(tiny_checkpoint, sp_model, tmp_path):
    """Unlike the authors' tokenizer, a user's "</s>" never ends a turn: only the template's do."""
    from mvlm_compile.model.prompt import Dialogue, Turn
    from mvlm_compile.runtime.pipeline import PromptTokenizer

    ck = _sentencepiece_checkpoint(tiny_checkpoint, sp_model, tmp_path / "ck", MOBILEVLM_V2_TOKENIZER_CONFIG)
    path = tmp_path / "tokenizer.json"
    load_tokenizer(ck).backend_tokenizer.save(str(path))
    turns = (Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Is </s> a tag? <s>"))
    ids = PromptTokenizer(path, 1, 2).ids(Dialogue(turns))
    assert ids.count(2) == 1 and ids.count(1) == 1 and ids[0] == 1
