"""Pre-processing against transformers' CLIP image processor; the prompt splice against the authors' rule."""

from __future__ import annotations

import numpy as np
from transformers.models.clip import CLIPImageProcessorPil

from mvlm_compile.model.config import IMAGE_TOKEN_INDEX
from mvlm_compile.model.preprocess import CLIP_MEAN, CLIP_STD, expand_to_square, golden_image, preprocess_image
from mvlm_compile.model.prompt import build_prompt, tokenize_with_image


def test_preprocess_matches_clip_image_processor_after_padding():
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    for image in (golden_image(), golden_image().rotate(90, expand=True), golden_image().resize((200, 200))):
        padded = expand_to_square(image, tuple(int(m * 255) for m in CLIP_MEAN))
        expected = processor(images=padded, return_tensors="np")["pixel_values"]
        got = preprocess_image(image)
        assert got.shape == (1, 3, 336, 336) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pad_fills_with_the_clip_mean_colour():
    image = golden_image()  # 400x300: 50 rows of padding above and below
    square = expand_to_square(image, (122, 116, 104))
    assert square.size == (400, 400)
    assert square.getpixel((0, 0)) == (122, 116, 104)
    assert square.getpixel((200, 399)) == (122, 116, 104)
    assert square.getpixel((10, 60)) == image.getpixel((10, 10))


def test_v1_prompt_and_image_splice():
    prompt = build_prompt("What is this?")
    assert prompt.endswith("USER: <image>\nWhat is this? ASSISTANT:")
    assert prompt.startswith("A chat between a curious user and an artificial intelligence assistant.")

    def encode(text: str) -> list[int]:  # BOS 1 then one id per character
        return [1] + [ord(c) for c in text]

    ids = tokenize_with_image("ab<image>cd", encode, bos_token_id=1)
    assert ids == [1, ord("a"), ord("b"), IMAGE_TOKEN_INDEX, ord("c"), ord("d")]
