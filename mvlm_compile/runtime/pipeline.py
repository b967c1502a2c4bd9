"""MobileVLM V2 inference over a backend: image -> image embeddings -> prompt -> prefill -> decode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvlm_compile import contract
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.model.prompt import SYSTEM_V1, Dialogue, tokenize_conversation
from mvlm_compile.runtime.backend import Backend


def prefill_feed(model: dict, embeds: np.ndarray, kv_dtype: type) -> dict[str, np.ndarray]:
    """The decoder's inputs for one prefill of `embeds` [batch, seq, hidden] (row b in slot b) with
    logits at every position (quantization's calibration and accuracy; the runtime's loop asks for
    the last only), for a manifest's `model` record."""
    batch, seq = embeds.shape[:2]
    empty = np.zeros((0, batch, int(model["num_kv_heads"]), int(model["head_dim"])), kv_dtype)
    feed = {
        contract.DECODER_EMBEDS: embeds,
        contract.DECODER_POSITIONS: np.arange(seq, dtype=np.int64)[None].repeat(batch, 0),
        contract.DECODER_LOGITS_INDEX: np.arange(seq, dtype=np.int64),
    }
    feed.update((name, empty) for name in contract.decoder_input_names(int(model["num_layers"]))[3:])
    return feed


def load_embed_table(path: Path, model: dict) -> np.ndarray:
    """The token embedding table [vocab, hidden], read into memory; one-line errors for a bad file.

    Read whole, not memory-mapped: a served table must not change under the server (a file truncated
    in place would kill it with SIGBUS at the next token; one overwritten would change its answers)."""
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable embedding table (.npy without pickles: {e})") from None
    expected = (int(model["vocab_size"]), int(model["hidden_size"]))
    if not isinstance(table, np.ndarray) or table.shape != expected or table.dtype not in (np.float32, np.float16):
        raise ArtifactError(f"{path}: embedding table {getattr(table, 'shape', '?')}, expected float {list(expected)}")
    return table


class Pipeline:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        model = backend.manifest.model
        self.num_layers = int(model["num_layers"])
        self.image_token_index = int(model["image_token_index"])
        self.embed_table = load_embed_table(backend.manifest.file_path(backend.artifacts, "embed_tokens"), model)

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        features = self.backend.run("vision", {contract.VISION_INPUT: pixel_values})[contract.VISION_OUTPUT]
        return self.backend.run("projector", {contract.PROJECTOR_INPUT: features})[contract.PROJECTOR_OUTPUT]

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.embed_table[np.asarray(token_ids, dtype=np.int64)])[None]

    def splice(self, input_ids: Sequence[int], image_embeds: np.ndarray) -> np.ndarray:
        """[1, seq, hidden] with the image embeddings where the prompt has the image token."""
        at = list(input_ids).index(self.image_token_index)
        parts = [
            self.embed(input_ids[:at]),
            image_embeds.astype(self.embed_table.dtype),
            self.embed(input_ids[at + 1 :]),
        ]
        return np.concatenate(parts, axis=1)

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Start one sequence (in the cache's first slot, in one call): logits [1, vocab] of the
        prompt's last position; the cache holds the prompt."""
        decoder = self.backend.decoder()
        decoder.reset()
        return decoder.step(0, inputs_embeds)

    def decode(self, token: int) -> np.ndarray:
        """One token after the sequence `prefill` started: its logits [1, vocab]; the cache grows by one row."""
        return self.backend.decoder().step(0, self.embed([token]))

    def greedy(self, inputs_embeds: np.ndarray, max_new_tokens: int, eos: int | None = None) -> list[int]:
        """Greedy tokens for one sequence, up to and including `eos` when given (the golden run
        has no stop: it passes none)."""
        if max_new_tokens < 1:
            return []
        logits = self.prefill(inputs_embeds)
        tokens: list[int] = []
        while True:
            tokens.append(int(logits[0].argmax()))
            if len(tokens) == max_new_tokens or tokens[-1] == eos:
                return tokens
            logits = self.decode(tokens[-1])


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


@dataclass
class Sampling:
    """Greedy when temperature == 0; else temperature + nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # NaN slips through comparisons, and below 0.01 exp(logits / T) overflows float64.
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise MvlmError(
                f"--temperature {self.temperature}: expected 0 (greedy) or {MIN_TEMPERATURE} to {MAX_TEMPERATURE}"
            )
        if not 0 < self.top_p <= 1:
            raise MvlmError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if self.seed < 0:
            raise MvlmError(f"--seed {self.seed}: expected a non-negative integer")


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    # The nucleus is chosen by probability, but drawn from in vocabulary order: drawn in the order of
    # probability, near-equal ones (a high temperature makes them all near-equal) swap places under
    # the last bits of rounding (a prompt prefilled in other chunks, a reused prefix, another batch),
    # and the same draw would pick another token; in vocabulary order it picks the same one.
    keep = np.sort(order[: int(np.searchsorted(np.cumsum(probs[order]), sampling.top_p) + 1)])
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


@dataclass
class Generation:
    """One answer's accounting, filled in as its tokens are made (OpenAI's `usage` and `finish_reason`)."""

    prompt_ids: list[int] = field(repr=False)  # the image token once, where the image goes (if any)
    prompt_tokens: int  # the image's tokens included
    cached_tokens: int = 0  # prompt tokens whose K/V a kept prefix gave (not prefilled)
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" (max tokens) or "cancelled"
    max_new_tokens: int = 0  # as asked, or what the context leaves when none was asked


class AnswerText:
    """An answer's text as its tokens come: EOS, a stop string or the token limit end it (the
    generation's finish_reason), and `add` returns each token's new text, the piece a stream shows."""

    def __init__(self, generation: Generation, tokenizer: Any, eos: int, max_new_tokens: int, stop: Sequence[str]):
        self.generation, self.tokenizer, self.eos = generation, tokenizer, eos
        self.max_new_tokens, self.stop = max_new_tokens, tuple(stop)
        self.tokens: list[int] = []

    def add(self, token: int) -> str:
        generation = self.generation
        if token == self.eos:
            generation.finish_reason = "stop"
            return ""
        self.tokens.append(token)
        generation.completion_tokens = len(self.tokens)
        new_text = self.tokenizer.decode(self.tokens)
        hit = next((s for s in self.stop if s in new_text), None)
        if hit is not None:
            new_text = new_text[: new_text.index(hit)]
        piece, generation.text = new_text[len(generation.text) :], new_text
        if hit is not None:
            generation.finish_reason = "stop"
        elif len(self.tokens) == self.max_new_tokens:
            generation.finish_reason = "length"
        return piece


def check_question(question: str) -> None:
    """A user's one question (`--prompt`): the checks of a conversation's user turn, named for the option."""
    try:
        Dialogue.from_messages([{"role": "user", "content": question}], image=True)  # the turn's checks
    except MvlmError as e:
        raise MvlmError(str(e).replace("messages[0].content", "--prompt", 1)) from None


class PromptTokenizer:
    """The checkpoint's tokenizer as the template uses it: a prompt's ids, and an answer's text.

    Two views of one tokenizer.json: `literal` reads every string as text (a user's "</s>" or "<s>"
    is text, never the end or start of the sequence), and `recognizing` splits at special tokens,
    used only to encode a segment after the template's EOS exactly as the authors' tokenizer does
    (with or without the dummy prefix, by the tokenizer's own legacy setting)."""

    def __init__(self, path: Path, bos: int, eos: int) -> None:
        from tokenizers import Tokenizer

        try:
            self.literal = Tokenizer.from_file(str(path))
            self.recognizing = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise ArtifactError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.literal.encode_special_tokens = True
        self.bos, self.eos = bos, eos
        self.eos_text = self.literal.id_to_token(eos)
        self.special_texts = [t.content for t in self.literal.get_added_tokens_decoder().values() if t.special]

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (BOS first when the tokenizer adds it), special-token text as text."""
        return self.literal.encode(text).ids

    def encode_after_eos(self, segment: str) -> list[int]:
        """Ids of a template segment that follows an EOS, without that EOS."""
        # The segment on its own when the user's text holds special-token text (which stays text, so
        # no recognizing encoding exists for it) or when the EOS is no special token of this tokenizer.
        if not any(special in segment for special in self.special_texts):
            ids = self.recognizing.encode(self.eos_text + segment, add_special_tokens=False).ids
            if ids[:1] == [self.eos]:
                return ids[1:]
        return self.literal.encode(segment, add_special_tokens=False).ids

    def ids(self, conversation: Dialogue) -> list[int]:
        return tokenize_conversation(conversation, self.encode, self.encode_after_eos, self.bos, self.eos)


class Chat:
    """A conversation (or one question) -> prompt ids, with the checkpoint's tokenizer and the 'v1'
    template; answers are generated by the runtime's scheduler (runtime/scheduler.py), through a Session."""

    def __init__(self, pipeline: Pipeline, chunked_prefill: bool = False) -> None:
        """`chunked_prefill`: prompts are prefilled in chunks after a past, so one may be as long as
        the context allows; else one prefill call takes it whole (the backend's longest prompt)."""
        self.pipeline = pipeline
        manifest = pipeline.backend.manifest
        self.bos = int(manifest.model["bos_token_id"])
        self.eos = int(manifest.model["eos_token_id"])
        self.prompt_tokenizer = PromptTokenizer(
            manifest.file_path(pipeline.backend.artifacts, "tokenizer"), self.bos, self.eos
        )
        self.tokenizer = self.prompt_tokenizer.literal
        self.image_tokens = int(manifest.model["image_tokens"])
        self.chunked_prefill = chunked_prefill
        limits = pipeline.backend.limits
        self.max_prompt_tokens = limits.context - 1 if chunked_prefill else min(limits.max_prompt, limits.context - 1)
        # Texts longer than this cannot fit, whatever they say: each token stands for at most
        # `chars_per_token` characters (LLaMA's normalizer maps one character to one), the template
        # takes at least the tokens of one empty turn under an empty system prompt, and 2 tokens of
        # slack per text cover merges across its two ends. Checked before tokenizing, so the work a
        # request costs is bounded by the context, not by its length.
        self._chars_per_token = max(len(token) for token in self.tokenizer.get_vocab(with_added_tokens=True))
        self._template_tokens = {  # (image, the template's own system prompt): tokens of one empty turn
            (image, own_system): self.prompt_tokens(
                self.prompt_ids(Dialogue.question("", SYSTEM_V1 if own_system else "", image))
            )
            for image in (True, False)
            for own_system in (True, False)
        }
        self.max_question_chars = self._max_chars(Dialogue.question(""))

    def _max_chars(self, conversation: Dialogue) -> int:
        own_system = conversation.system == SYSTEM_V1
        template = self._template_tokens[(conversation.image, own_system and len(conversation.turns) == 1)]
        texts = len(conversation.turns) + (not own_system)
        return (max(0, self.max_prompt_tokens - template) + 2 * texts) * self._chars_per_token

    def prompt_ids(self, conversation: Dialogue | str) -> list[int]:
        """The prompt's ids as the authors' template and tokenizer make them (a question: one user turn
        about the image), the image token once where the image goes."""
        if isinstance(conversation, str):
            conversation = Dialogue.question(conversation)
        return self.prompt_tokenizer.ids(conversation)

    def prompt_tokens(self, prompt_ids: Sequence[int]) -> int:
        """Positions the prompt takes in the context: the image token stands for the image's tokens."""
        images = sum(1 for token in prompt_ids if token == self.pipeline.image_token_index)
        return len(prompt_ids) + images * (self.image_tokens - 1)

    def prepare(self, conversation: Dialogue | str, max_new_tokens: int | None, stop: Sequence[str]) -> Generation:
        """A request checked against the options' ranges and the backend's limits before any graph runs.
        A str is one question about the image (`--prompt`). `max_new_tokens` None: as many as the
        context leaves (at least 1). The conversation is tokenized once."""
        option = "messages"
        if isinstance(conversation, str):
            option = "--prompt"
            check_question(conversation)
            conversation = Dialogue.question(conversation)
        chars = len(conversation.system) * (conversation.system != SYSTEM_V1) + sum(
            len(turn.text) for turn in conversation.turns
        )
        if chars > (most := self._max_chars(conversation)):
            raise MvlmError(
                f"{option}: {chars} characters cannot fit in the context: at most {most} would "
                f"({self.pipeline.backend.limits.source})"
            )
        if max_new_tokens is not None and max_new_tokens < 1:
            raise MvlmError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
        if any(not s for s in stop):
            raise MvlmError("--stop: an empty stop string would stop before the first token")
        ids = self.prompt_ids(conversation)
        prompt_tokens = self.prompt_tokens(ids)
        limits = self.pipeline.backend.limits
        if max_new_tokens is None:
            max_new_tokens = max(1, limits.context - prompt_tokens)
        # The backend's limits: an engine's profiles may be tighter than the model's context.
        limits.check(
            prompt_tokens, max_new_tokens, option, chunked_prefill=self.chunked_prefill, image=conversation.image
        )
        return Generation(ids, prompt_tokens, max_new_tokens=max_new_tokens)

    def answer_text(self, generation: Generation, stop: Sequence[str]) -> AnswerText:
        """How the prepared `generation`'s tokens become its text (its max_new_tokens as prepared)."""
        return AnswerText(generation, self.tokenizer, self.eos, generation.max_new_tokens, stop)
