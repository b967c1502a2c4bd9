"""Tokenizers: the LLaMA tokenizer of a checkpoint, and a small one made locally for synthetic checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mvlm_compile.errors import CheckpointError
from mvlm_compile.model.prompt import SYSTEM_V1

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


def write_synthetic_tokenizer(directory: Path, vocab_size: int) -> None:
    """A LLaMA-style (SentencePiece-like BPE with byte fallback) tokenizer trained on a fixed corpus.

    Special tokens as LLaMA: 0 <unk>, 1 <s>, 2 </s>; BOS is added to every encoding.
    """
    from transformers import PreTrainedTokenizerFast  # host-only dependency

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # The trainer registers the byte tokens as special (so decoding would drop them); like
    # LLaMA's, they must be ordinary vocabulary entries that ByteFallback decodes.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    wrapped.save_pretrained(str(directory))


def load_tokenizer(checkpoint_dir: Path):
    """The checkpoint's tokenizer (tokenizer.json or SentencePiece tokenizer.model), via transformers."""
    from transformers import AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    if not any((checkpoint_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{checkpoint_dir}: no tokenizer (expected tokenizer.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{checkpoint_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
