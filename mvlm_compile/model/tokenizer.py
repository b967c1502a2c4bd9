"""Tokenizers: the LLaMA tokenizer of a checkpoint, and one made locally for synthetic checkpoints.

The authors load the checkpoint's tokenizer with `AutoTokenizer.from_pretrained(path, use_fast=False)`,
i.e. transformers' SentencePiece LlamaTokenizer on tokenizer.model, which puts BOS first
(`add_bos_token`, default true). The Jetson runs the `tokenizers` library only, so the
checkpoint's tokenizer is turned into one `tokenizers.Tokenizer` here; golden tensors and the
exported tokenizer.json both use that object, and a SentencePiece model is checked against
SentencePiece itself on the 'v1' prompt before it is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mvlm_compile.errors import CheckpointError
from mvlm_compile.model.config import check_readable, one_line, read_json
from mvlm_compile.model.prompt import IMAGE_PLACEHOLDER, SYSTEM_V1, build_prompt

# A fixed English corpus: the template text plus everyday descriptions of images.
_CORPUS = [
    SYSTEM_V1,
    "USER: ASSISTANT: What is in the image? Describe the image in detail.",
    "The image shows a yellow circle on a gradient background with blue stripes at the bottom.",
    "There is a red car parked next to a green tree on a sunny street in the city.",
    "A person is walking a dog along the beach while the sun sets over the ocean.",
    "How many objects are on the table? There are three cups, two plates and a bowl.",
    "What colour is the sky? The sky is blue with a few white clouds.",
    "Read the text in the picture and answer the question about the chart.",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()-",
]

SPIECE_UNDERLINE = "▁"
# Questions whose 'v1' prompt chunks a converted SentencePiece model must encode as SentencePiece does.
_PROBE_QUESTIONS = (
    "What is in the image? Describe it in detail.",
    "How many  cups (2 or 3)?\tAnswer: ünïcode 😀 — 12345 ▁x",
)


def synthetic_tokenizer(vocab_size: int, corpus: Sequence[str] = (), split_words: bool = False) -> Tokenizer:
    """A LLaMA-style (SentencePiece-like BPE with byte fallback) tokenizer of exactly `vocab_size` ids,
    trained on a fixed corpus (the built-in one, or `corpus` when given: a model trained on a task
    gets its own words). `split_words`: merges stop at spaces, as LLaMA's SentencePiece model's do
    (one token never spans "red circle", so an unseen combination of seen words is still made of
    seen tokens).

    Special tokens as LLaMA: 0 <unk>, 1 <s>, 2 </s>; BOS is added to every encoding. When the corpus
    runs out of merges before `vocab_size`, the remaining ids are made-up words (see `_fill_vocab`).
    """
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=split_words)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus or _CORPUS) * 4, trainer=trainer)
    # The trainer registers the byte tokens as special (so decoding would drop them); like
    # LLaMA's, they must be ordinary vocabulary entries that ByteFallback decodes.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    _fill_vocab(spec["model"]["vocab"], spec["model"]["merges"], vocab_size)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


# The fillers' letters: Greek, which no corpus here uses, so no trained merge touches them.
_FILLER_CONSONANTS = "βγδζθκλμνξπρστφχψ"
_FILLER_VOWELS = "αεηιουω"


def _filler_pieces() -> Iterator[tuple[str, tuple[str, str] | None]]:
    """(piece, the merge that makes it) in an order where a merge's parts come first: the letters,
    the syllables (consonant + vowel), then word starts "▁" + 1, 2, 3... syllables, each the merge
    of the word one syllable shorter and a syllable."""
    for letter in _FILLER_CONSONANTS + _FILLER_VOWELS:
        yield letter, None
    syllables = [c + v for c in _FILLER_CONSONANTS for v in _FILLER_VOWELS]
    for syllable in syllables:
        yield syllable, (syllable[0], syllable[1])
    words = ["▁"]
    while True:
        longer = []
        for word in words:
            for syllable in syllables:
                yield word + syllable, (word, syllable)
                longer.append(word + syllable)
        words = longer


def _fill_vocab(vocab: dict[str, int], merges: list, vocab_size: int) -> None:
    """Give every id below `vocab_size` a piece: a small corpus stops merging long before a LLaMA
    vocabulary's 32000, and a random-weight model emits any id, so ids without a piece would decode
    to nothing (a streamed answer would arrive in one chunk). The pieces are made-up Greek words
    and their syllables, each with the merge that makes it, after the trained merges: like a real
    vocabulary's pieces, every one is what encoding its own text gives (a conversation's next
    turn, which re-encodes the answer's text, finds the answer's ids), while text without Greek
    letters encodes as before. The trainer numbers its pieces 0..len - 1, so the new ones continue
    from len(vocab)."""
    pieces = _filler_pieces()
    while len(vocab) < vocab_size:
        piece, merge = next(pieces)
        if piece not in vocab:
            vocab[piece] = len(vocab)
            if merge is not None:
                merges.append(list(merge))


def write_synthetic_tokenizer(
    directory: Path, vocab_size: int, corpus: Sequence[str] = (), split_words: bool = False
) -> None:
    """`synthetic_tokenizer(vocab_size, corpus, split_words)` saved in `directory` as a checkpoint
    has it (tokenizer.json and tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast  # host-only dependency

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=synthetic_tokenizer(vocab_size, corpus, split_words),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    wrapped.save_pretrained(str(directory))


@dataclass
class CheckpointTokenizer:
    """The checkpoint's tokenizer as one `tokenizers.Tokenizer`: what golden encodes with and export saves."""

    backend_tokenizer: Tokenizer
    bos_token_id: int
    eos_token_id: int
    source: Path  # tokenizer.model or tokenizer.json

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, BOS first (when the checkpoint's tokenizer adds it, as LLaMA's does)."""
        return self.backend_tokenizer.encode(text).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with no special token: a piece that continues a sequence."""
        return self.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend_tokenizer.decode(ids)


def _token_content(value: Any, default: str) -> str:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...} (AddedToken)."""
    if value is None:
        return default
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _flag(options: dict[str, Any], key: str, default: bool, path: Path) -> bool:
    value = options.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: {key} is {value!r}, expected true or false")
    return value


def _read_sentencepiece(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2  # host-only dependency

    check_readable(path, "tokenizer")
    data = path.read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError (its class depends on the protobuf implementation)
        proto.Clear()
    if not proto.pieces:
        raise CheckpointError(f"{path}: not a SentencePiece model (corrupt or empty)")
    return proto


def _bpe_from_sentencepiece(path: Path, proto: Any) -> Tokenizer:
    """A `tokenizers` BPE with SentencePiece's pieces, ids and merge order (merges ranked by piece score)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece = pb.ModelProto.SentencePiece
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise CheckpointError(
            f"{path}: SentencePiece model type {proto.trainer_spec.model_type}, expected BPE (LLaMA's tokenizer)"
        )
    if any(p.type == piece.USER_DEFINED for p in proto.pieces):
        # SentencePiece never splits user-defined pieces; LLaMA's tokenizer has none.
        raise CheckpointError(
            f"{path}: user-defined SentencePiece pieces are not supported (LLaMA's tokenizer has none)"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if len(vocab) != len(proto.pieces):
        raise CheckpointError(f"{path}: the SentencePiece model has duplicate pieces")
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == piece.NORMAL}
    # SentencePiece BPE merges the adjacent pair whose union scores best: rank every split of a
    # normal piece into two normal pieces by that piece's score (ties by id), as transformers does.
    ranked = []
    for text, (score, index) in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    unk_id = proto.trainer_spec.unk_id
    if not 0 <= unk_id < len(proto.pieces):
        raise CheckpointError(f"{path}: the SentencePiece model's unk_id {unk_id} is not a piece")
    return Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=proto.pieces[unk_id].piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
            dropout=None,
        )
    )


def _sentencepiece_pipeline(tokenizer: Tokenizer, proto: Any, legacy: bool, add_prefix_space: bool) -> None:
    """Normalizer, pre-tokenizer and decoder that reproduce transformers' SentencePiece LlamaTokenizer.

    legacy: SentencePiece encodes every chunk between special tokens with its dummy prefix (so a
    leading space doubles the prefix). Not legacy: only the start of the text gets the prefix.
    Both give SentencePiece's ids for text without special tokens that does not start with a
    space (every chunk of the 'v1' prompt); after a special token they differ as the authors' do.
    """
    spec = proto.normalizer_spec
    steps: list[Any] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    prefix = spec.add_dummy_prefix and (legacy or add_prefix_space)
    if prefix and legacy:
        # Metaspace does not prepend to text that already starts with "▁"; SentencePiece does.
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    scheme = ("always" if legacy else "first") if prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme=scheme, split=False)
    out = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        out.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(out)


def _check_against_sentencepiece(
    path: Path, proto: Any, tokenizer: CheckpointTokenizer, add_bos: bool, add_eos: bool
) -> None:
    """The converted tokenizer must give SentencePiece's ids (plus BOS/EOS) on 'v1' prompt chunks."""
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as e:  # SentencePiece refuses a damaged model with RuntimeError or OSError
        raise CheckpointError(f"{path}: not a usable SentencePiece model ({one_line(e)})") from None
    bos = [tokenizer.bos_token_id] if add_bos else []
    eos = [tokenizer.eos_token_id] if add_eos else []
    for question in _PROBE_QUESTIONS:
        for chunk in build_prompt(question).split(IMAGE_PLACEHOLDER):
            expected = bos + processor.encode(chunk) + eos
            got = tokenizer.encode(chunk)
            if got != expected:
                raise CheckpointError(
                    f"{path}: the `tokenizers` library (used on the target) cannot reproduce this SentencePiece "
                    f"model: {chunk[:40]!r} gives {got[:8]}..., SentencePiece {expected[:8]}..."
                )


def _special_id(tokenizer: Tokenizer, content: str, what: str, path: Path) -> int:
    # tokenizers' templates read "$..." as a sequence and ":" as a type id separator.
    if not content or content.startswith("$") or ":" in content or content != "".join(content.split()):
        raise CheckpointError(f"{path}: unsupported {what} token {content!r}")
    token_id = tokenizer.token_to_id(content)
    if token_id is None:
        raise CheckpointError(f"{path}: the {what} token {content!r} is not in the vocabulary")
    return token_id


def load_tokenizer(checkpoint_dir: Path) -> CheckpointTokenizer:
    """The checkpoint's tokenizer, encoding as the authors' code does (BOS first unless add_bos_token is false).

    tokenizer.model (SentencePiece) is used when present, as the authors' `use_fast=False` does,
    with tokenizer_config.json's legacy / add_bos_token / add_eos_token / add_prefix_space and
    LlamaTokenizer's defaults for what it does not say; otherwise tokenizer.json. Its ids must
    fit config.json's vocab_size.
    """
    checkpoint_dir = Path(checkpoint_dir)
    model_path, json_path = checkpoint_dir / "tokenizer.model", checkpoint_dir / "tokenizer.json"
    config_path = checkpoint_dir / "tokenizer_config.json"
    options = read_json(config_path, "tokenizer config") if config_path.exists() else {}
    add_bos = _flag(options, "add_bos_token", True, config_path)
    add_eos = _flag(options, "add_eos_token", False, config_path)
    legacy = _flag(options, "legacy", True, config_path)  # transformers' default when the config does not say
    add_prefix_space = _flag(options, "add_prefix_space", True, config_path)
    bos = _token_content(options.get("bos_token"), "<s>")
    eos = _token_content(options.get("eos_token"), "</s>")
    unk = _token_content(options.get("unk_token"), "<unk>")

    proto = None
    if model_path.exists() or model_path.is_symlink():  # a broken link is reported, not skipped
        source = model_path
        proto = _read_sentencepiece(model_path)
        try:
            backend = _bpe_from_sentencepiece(model_path, proto)
            _sentencepiece_pipeline(backend, proto, legacy, add_prefix_space)
            # The authors' tokenizer splits its special tokens out of the text before SentencePiece sees it.
            control = [p.piece for p in proto.pieces if p.type == p.CONTROL]
            vocab = backend.get_vocab()
            specials = [t for t in dict.fromkeys([unk, bos, eos, *control]) if t in vocab]
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        except CheckpointError:
            raise
        except Exception as e:  # a damaged model that still parses: tokenizers/protobuf raise many types
            raise CheckpointError(f"{model_path}: not a usable SentencePiece model ({one_line(e)})") from None
    elif json_path.exists() or json_path.is_symlink():
        source = json_path
        check_readable(json_path, "tokenizer")
        try:
            backend = Tokenizer.from_file(str(json_path))
        except Exception as e:  # tokenizers raises its own exception type for bad files
            raise CheckpointError(f"{json_path}: not a valid tokenizer.json ({one_line(e)})") from None
    else:
        raise CheckpointError(f"{checkpoint_dir}: no tokenizer (expected tokenizer.model or tokenizer.json)")

    bos_id = _special_id(backend, bos, "BOS", source)
    eos_id = _special_id(backend, eos, "EOS", source)
    # BOS/EOS as LlamaTokenizer's add_bos_token/add_eos_token say, whatever tokenizer.json carried.
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    try:
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(bos, bos_id), (eos, eos_id)]
        )
    except Exception as e:  # a special token that a template cannot name (tokenizers' own exception)
        raise CheckpointError(f"{config_path}: unusable BOS/EOS tokens {bos!r}/{eos!r} ({one_line(e)})") from None
    tokenizer = CheckpointTokenizer(backend, bos_id, eos_id, source)
    if proto is not None:
        _check_against_sentencepiece(source, proto, tokenizer, add_bos, add_eos)
    _check_vocab_size(checkpoint_dir, backend, source)
    return tokenizer


def _check_vocab_size(checkpoint_dir: Path, backend: Tokenizer, source: Path) -> None:
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        return
    vocab_size = read_json(config_path, "MobileVLM V2 config").get("vocab_size")
    size = backend.get_vocab_size(with_added_tokens=True)
    if isinstance(vocab_size, int) and size > vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {size} tokens, more than the model's vocab_size {vocab_size} ({config_path})"
        )
