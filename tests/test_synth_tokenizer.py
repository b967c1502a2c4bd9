"""A synthetic checkpoint's tokenizer has a piece for every id of its model, so whatever a
random-weight model emits decodes to text, and a streamed answer grows with every token."""

from __future__ import annotations

import json
import random

import pytest

from mvlm_compile.fileio import write_json
from mvlm_compile.model.prompt import IMAGE_PLACEHOLDER, build_prompt
from mvlm_compile.model.synth import PRESETS, mobilevlm_config_json, write_preset_tokenizer
from mvlm_compile.model.tokenizer import load_tokenizer, synthetic_tokenizer

# The models' vocabularies: MobileLLaMA's LLaMA tokenizer (32000) and the tiny preset's.
VOCAB = {"tiny": 512, "mobilevlm-v2-1.7b": 32000, "mobilevlm-v2-3b": 32000}
# The decoder strips the space of SentencePiece's dummy prefix, so these decode to "" alone and to
# a space after other text, as LLaMA's "▁" does.
WHITESPACE = {"▁", "<0x20>"}


@pytest.mark.parametrize("preset", sorted(VOCAB))
def test_every_id_of_the_model_decodes_to_text(tmp_path, preset: str) -> None:
    # With config.json beside it, load_tokenizer also checks the tokenizer against vocab_size.
    write_json(tmp_path / "config.json", mobilevlm_config_json(PRESETS[preset], embed_vision_config=True))
    write_preset_tokenizer(preset, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    size = VOCAB[preset]
    assert len(vocab) == size and sorted(vocab.values()) == list(range(size))
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"]) == (0, 1, 2)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)

    pieces = {i: piece for piece, i in vocab.items()}
    sample = random.Random(0).sample(range(3, size), min(2000, size - 3)) + [size - 1]
    for i in sample:
        if pieces[i] in WHITESPACE:
            assert tokenizer.decode([*tokenizer.encode_plain("red"), i]) == "red "
        else:
            assert tokenizer.decode([i]) != "", (i, pieces[i])

    # Token by token, as the runtime streams an answer: every new id adds text after the old. Not
    # byte pieces: a run of them decodes as one UTF-8 string (each byte a U+FFFD until it is valid
    # text), so their text is final only with the run, as with LLaMA's.
    words = [i for i in range(3, size) if not pieces[i].startswith("<0x") and pieces[i] not in WHITESPACE]
    ids = random.Random(1).choices(words, k=64)
    texts = [tokenizer.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert texts[0] != ""
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before) and len(after) > len(before), (before, after)


def test_filler_pieces_are_a_tail_that_encodes_to_itself_and_leaves_other_text_alone() -> None:
    full = synthetic_tokenizer(32000)
    spec = json.loads(full.to_str())
    pairs = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    vocab = full.get_vocab()
    pieces = {i: piece for piece, i in vocab.items()}
    greek = set("βγδζθκλμνξπρστφχψαεηιουω")
    # What training made: specials, byte pieces, the corpus's characters and its merges; then the fillers.
    first_filler = min(i for i, piece in pieces.items() if set(piece) & greek)
    assert all(set(pieces[i]) <= greek | {"▁"} for i in range(first_filler, 32000))
    assert 300 < first_filler < 2000
    # Each filler is a merge of two pieces before it: text made of whole filler words, a random
    # model's answer, encodes back to the same ids (a conversation's next turn re-encodes it).
    merged = {left + right: (vocab[left], vocab[right]) for left, right in pairs}
    for i in range(first_filler, 32000):
        if len(pieces[i]) > 1:
            assert max(merged[pieces[i]]) < i, pieces[i]
    words = [i for i in range(first_filler, 32000) if pieces[i].startswith("▁")]
    answer = random.Random(0).choices(words, k=200)
    assert full.encode(full.decode(answer), add_special_tokens=False).ids == answer
    # Text without Greek letters encodes as with a vocabulary too small for fillers, none among its ids.
    smaller = synthetic_tokenizer(2000)
    for text in build_prompt("What is in the image? ünïcode 😀.").split(IMAGE_PLACEHOLDER):
        ids = full.encode(text).ids
        assert max(ids) < first_filler and ids == smaller.encode(text).ids
