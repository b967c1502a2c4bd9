"""The training script's pieces: its vision path is the reference's, its first turn is the
runtime's prompt, its dense labels sit on the shapes' pixels, and two runs give the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHAPES_MODEL

from mvlm_compile.model.config import load_mobilevlm_config
from mvlm_compile.model.prompt import build_prompt, tokenize_with_image
from mvlm_compile.model.reference import MobileVLMReference
from mvlm_compile.model.tokenizer import load_tokenizer
from mvlm_compile.tinytask import dataset, train
from mvlm_compile.tinytask.scenes import draw_scene


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHAPES_MODEL)


def _fresh_model(seed: int = 0) -> MobileVLMReference:
    torch.manual_seed(seed)
    return MobileVLMReference(load_mobilevlm_config(SHAPES_MODEL), train.VISION)


def test_the_training_vision_path_is_the_reference_encoder():
    model = _fresh_model().eval()
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        np.testing.assert_allclose(
            train.vision_features(model, pixels).numpy(), model.encode_images(pixels).numpy(), rtol=0, atol=1e-5
        )


def test_the_first_turn_is_the_runtime_prompt_and_only_answers_are_learned(tokenizer):
    sample = dataset.train_sample(5)
    before, after, labels = train.sample_sequence(tokenizer, sample)
    runtime = tokenize_with_image(build_prompt(sample.turns[0].question), tokenizer.encode, tokenizer.bos_token_id)
    first_answer = len(runtime) - len(before) - 1
    assert before + [-200] + after[:first_answer] == runtime
    learned = [t for t, label in zip(after, labels) if label != -100]
    assert [t for t, label in zip(after, labels) if label != -100] == [t for t in labels if t != -100]
    texts = tokenizer.backend_tokenizer.decode(learned, skip_special_tokens=False).split("</s>")
    assert [t.strip() for t in texts[:-1]] == [turn.answer for turn in sample.turns]
    assert learned.count(tokenizer.eos_token_id) == len(sample.turns) == 2 + 3 * len(sample.scene.shapes)


def test_dense_labels_sit_on_the_shapes_pixels():
    for index in range(12):
        scene = dataset.train_sample(index).scene
        rgb = np.asarray(draw_scene(scene), np.float32) / 255
        coloured = (rgb.max(-1) - rgb.min(-1) > 0.3).reshape(12, 28, 12, 28).mean(axis=(1, 3)).ravel()
        kinds = train.dense_labels(scene)[0]
        assert np.all(coloured[kinds > 0] > 0.15), index  # labelled cells are mostly shape pixels
        assert np.all(kinds[coloured > 0.5] > 0), index  # and every mostly-coloured cell is labelled


def test_training_is_deterministic(tokenizer):
    settings = train.TrainSettings(steps=2, batch=2, vision_steps=2, vision_batch=2, warmup=1, log_every=1)
    states = []
    for _ in range(2):
        model = _fresh_model()
        record = train.train(model, tokenizer, settings, log=lambda m: None)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert record["final_loss"] > 0 and len(record["vision"]["curve"]) == len(record["joint"]["curve"]) == 2
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(
        states[0]["mm_projector.mlp.mlp.0.weight"], _fresh_model().state_dict()["mm_projector.mlp.mlp.0.weight"]
    )
