"""Answers of the PyTorch reference to task questions (host only: torch).

Greedy decoding with the KV cache, stopping after EOS: the tokens the golden task file records
and every backend's answers are compared with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mvlm_compile.model.preprocess import preprocess_image
from mvlm_compile.model.prompt import build_prompt, tokenize_with_image
from mvlm_compile.model.reference import MobileVLMReference
from mvlm_compile.tinytask.dataset import EVAL_ITEMS, EVAL_SEED, TASK_NAME, TASK_VERSION, TRAIN_SEED, eval_items
from mvlm_compile.tinytask.scenes import Scene, draw_scene, image_digest

MAX_ANSWER_TOKENS = 32


@dataclass
class Answer:
    tokens: list[int]  # greedy tokens, EOS included when it came within the limit
    min_margin: float  # smallest top-1 minus top-2 logit gap over the steps


def prompt_ids(encode: Callable[[str], list[int]], bos: int, question: str) -> list[int]:
    return tokenize_with_image(build_prompt(question), encode, bos)


@torch.no_grad()
def greedy_answer(
    model: MobileVLMReference, input_ids: list[int], pixel_values: np.ndarray, eos: int, max_new_tokens: int
) -> Answer:
    embeds = model.splice_image(input_ids, model.project(model.encode_images(torch.from_numpy(pixel_values))))
    tokens, margins = model.greedy_generate(embeds, max_new_tokens, eos=eos)
    return Answer(tokens, min(margins))


def answer_scene(
    model: MobileVLMReference,
    encode: Callable[[str], list[int]],
    bos: int,
    eos: int,
    scene: Scene,
    question: str,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
) -> Answer:
    return greedy_answer(
        model, prompt_ids(encode, bos, question), preprocess_image(draw_scene(scene)), eos, max_new_tokens
    )


def task_golden(
    model: MobileVLMReference,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    bos: int,
    eos: int,
    count: int | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> dict:
    """The golden task file: the first `count` eval items (default all) with the FP32 reference's greedy answers."""
    count = count or EVAL_ITEMS
    items = []
    for item in eval_items(count):
        if item.index % 25 == 0:
            progress(f"task reference answers {item.index}/{count}")
        image = draw_scene(item.scene())
        answer = greedy_answer(
            model, prompt_ids(encode, bos, item.question), preprocess_image(image), eos, MAX_ANSWER_TOKENS
        )
        text = decode([t for t in answer.tokens if t != eos])
        items.append(
            {
                **item.to_json(),
                "image_sha256": image_digest(image),
                "reference_tokens": answer.tokens,
                "reference_text": text,
                "reference_min_margin": round(answer.min_margin, 4),
                "reference_correct": text == item.answer,
            }
        )
    return {
        "kind": "mvlm-compile task golden",
        "task": {"name": TASK_NAME, "version": TASK_VERSION},
        "split": f"eval (seed {EVAL_SEED}); the model was trained on the train split (seed {TRAIN_SEED})",
        "max_new_tokens": MAX_ANSWER_TOKENS,
        "eos_token_id": eos,
        "reference_runner": "pytorch-reference-fp32",
        "reference_exact_match": round(sum(i["reference_correct"] for i in items) / max(1, len(items)), 4),
        "items": items,
    }
