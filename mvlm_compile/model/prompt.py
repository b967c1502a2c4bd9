"""The 'v1' conversation template and the <image> token splice, torch-free."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mvlm_compile.model.config import IMAGE_TOKEN_INDEX

SYSTEM_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"


def build_prompt(question: str) -> str:
    """'v1' template for one user turn with an image, ready for the assistant's answer."""
    return f"{SYSTEM_V1} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


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
