"""The 'v1' conversation template and the <image> token splice, torch-free.

The authors build every prompt, one question or a conversation, with LLaVA's `conv_vicuna_v1`
(SeparatorStyle.TWO: roles USER and ASSISTANT, separators " " after a user turn and "</s>" after
an assistant turn), the image placed before the first user turn's text:

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

and tokenize the whole string with the LLaMA tokenizer, where each template "</s>" is the EOS
token. Here the string is cut at those separators and each piece is encoded as the tokenizer
encodes the text after a special token, the EOS id between them: the same ids (the tokenizer
splits its input at special tokens first), while a user's own "</s>" stays text and cannot end a
turn (the authors' tokenizer would read it as the end of the turn).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mvlm_compile.errors import MvlmError
from mvlm_compile.model.config import IMAGE_TOKEN_INDEX

SYSTEM_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"user": "USER", "assistant": "ASSISTANT"}
SEP, SEP2 = " ", "</s>"


def build_prompt(question: str) -> str:
    """'v1' template for one user turn with an image, ready for the assistant's answer."""
    return Dialogue.question(question).text


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Dialogue:
    """What the model is asked: user and assistant turns in turn (the last one the user's), an
    optional system prompt in place of the template's, and whether the first user turn shows the image."""

    turns: tuple[Turn, ...]
    system: str = SYSTEM_V1
    image: bool = True

    @classmethod
    def question(cls, text: str, system: str = SYSTEM_V1, image: bool = True) -> Dialogue:
        """One user turn (about the image, unless `image` is False)."""
        return cls((Turn("user", text),), system, image)

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping[str, str]], image: bool) -> Dialogue:
        """OpenAI-style messages ({"role", "content"}; an optional system message first, then user
        and assistant turns in turn ending with the user's) checked; errors name messages[i]."""
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise MvlmError(f"messages: a {type(messages).__name__}; expected a list of {{role, content}} messages")
        system, turns = SYSTEM_V1, []
        for i, message in enumerate(messages):
            role, content = _role_and_content(message, i)
            if role in ("system", "developer"):
                if i:
                    raise MvlmError(
                        f"messages[{i}]: {article(role)} message after the conversation started; expected it first "
                        "(it replaces the template's system prompt)"
                    )
                system = content
                continue
            expected = "user" if not turns or turns[-1].role == "assistant" else "assistant"
            if role != expected:
                after = f"after {article(turns[-1].role)} turn" if turns else "first"
                raise MvlmError(
                    f"messages[{i}]: {article(role)} turn {after}; expected user and assistant turns in turn, "
                    "starting with the user"
                )
            if not content.strip():
                raise MvlmError(f"messages[{i}].content: is empty; expected the {role}'s text")
            turns.append(Turn(role, content))
        if not turns:
            raise MvlmError("messages: no user turn; expected at least one user message to answer")
        if turns[-1].role != "user":
            raise MvlmError(
                f"messages[{len(messages) - 1}]: the conversation ends with an assistant turn; expected a user turn "
                "last (the one answered)"
            )
        return cls(tuple(turns), system, image)

    @property
    def segments(self) -> list[str]:
        return conversation_segments(self.system, self.turns, self.image)

    @property
    def text(self) -> str:
        """The prompt as the authors' template writes it."""
        return SEP2.join(self.segments)


def article(role: str) -> str:
    """A role with its article, for messages: a user, an assistant, a system, a developer."""
    return f"an {role}" if role == "assistant" else f"a {role}"


def _role_and_content(message: object, i: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise MvlmError(f"messages[{i}]: a {type(message).__name__}; expected a {{role, content}} mapping")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise MvlmError(f"messages[{i}].role {role!r}: expected 'system', 'user' or 'assistant'")
    if not isinstance(content, str):
        raise MvlmError(f"messages[{i}].content: a {type(content).__name__}; expected text")
    if IMAGE_PLACEHOLDER in content:
        raise MvlmError(
            f"messages[{i}].content: must not contain {IMAGE_PLACEHOLDER} (the template places the image itself)"
        )
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise MvlmError(f"messages[{i}].content: is not valid UTF-8 text") from None
    return role, content


def conversation_segments(system: str, turns: Sequence[Turn], image: bool) -> list[str]:
    """The prompt cut at the template's "</s>" separators (each an EOS token), ready for the answer."""
    segments, text = [], system + SEP
    for i, turn in enumerate(turns):
        message = f"{IMAGE_PLACEHOLDER}\n{turn.text}" if i == 0 and image else turn.text
        text += f"{ROLES[turn.role]}: {message}"
        if turn.role == "assistant":
            segments.append(text)
            text = ""
        else:
            text += SEP
    segments.append(text + f"{ROLES['assistant']}:")
    return segments


def tokenize_with_image(prompt: str, encode: Callable[[str], Sequence[int]], bos_token_id: int) -> list[int]:
    """The authors' tokenizer_image_token: ids with IMAGE_TOKEN_INDEX where `<image>` was.

    `encode(text)` must add the BOS token like the LLaMA tokenizer does; BOS is kept only
    once, at the start.
    """
    chunks = [list(encode(chunk)) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == bos_token_id:
        offset = 1
        ids.append(bos_token_id)
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def tokenize_conversation(
    conversation: Dialogue,
    encode: Callable[[str], Sequence[int]],
    encode_after_eos: Callable[[str], Sequence[int]],
    bos_token_id: int,
    eos_token_id: int,
) -> list[int]:
    """The conversation's prompt ids: the first segment as tokenize_with_image (the image is in the
    first user turn; `encode` adds BOS as there), then EOS and each later segment as the tokenizer
    encodes the text that follows a special token (`encode_after_eos`: LLaMA's SentencePiece gives
    it the dummy prefix "▁" when legacy, not otherwise)."""
    first, *rest = conversation.segments
    ids = tokenize_with_image(first, encode, bos_token_id)
    for segment in rest:
        ids.append(eos_token_id)
        ids.extend(encode_after_eos(segment))
    return ids
