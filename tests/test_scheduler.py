"""In-flight batching (runtime/scheduler.py through Session) on the embedded shapes model, deployed
form (INT4 decoder, int8 activations as serve and run use them).

Each request's answer beside others must be its answer alone: at temperature 0 token for token,
and a seeded sampled request the same text, with different images and prompt lengths, requests
joining mid-generation, more requests than slots, and one cancelled midway."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from mvlm_compile import Session
from mvlm_compile.runtime.scheduler import StepInfo
from mvlm_compile.tinytask.scenes import draw_scene, sample_scene

IMAGE = Path(__file__).resolve().parents[1] / "golden" / "tiny-shapes" / "image.png"

# Prompts of different lengths; the descriptions are the model's longest answers (about 20 tokens),
# so several are decoded at once.
QUESTIONS = [
    "Describe the image in one sentence.",
    "Describe the image.",
    "Please describe the image in one sentence.",
    "Describe this picture in one sentence, please.",
    "How many shapes are there?",
    "What is in the image? Describe it in one sentence.",
]


def _images() -> list[Image.Image]:
    golden = Image.open(IMAGE).convert("RGB")
    scenes = [draw_scene(sample_scene((9000 + i,))) for i in range(3)]
    return [golden, golden.transpose(Image.Transpose.FLIP_LEFT_RIGHT), *scenes]


@pytest.fixture(scope="module")
def requests() -> list[tuple[Image.Image, str]]:
    images = _images()
    return [(images[i % len(images)], QUESTIONS[i]) for i in range(len(QUESTIONS))]


@pytest.fixture(scope="module")
def alone(shapes_int4, requests) -> list[tuple[str, int, str]]:
    """Each request answered with nothing beside it: (text, tokens, finish_reason)."""
    with Session(shapes_int4, max_batch=1, prefill_chunk=32) as session:
        answers = [session.generate(image, q, max_tokens=40) for image, q in requests]
    return [(a.text, a.completion_tokens, a.finish_reason) for a in answers]


def test_a_batch_answers_each_request_as_alone_while_requests_join_and_one_is_cancelled(shapes_int4, requests, alone):
    steps: list[StepInfo] = []
    with Session(shapes_int4, max_batch=4, prefill_chunk=32) as session:
        for image, _ in requests:  # encoded now, so that the requests below are queued at once
            session.generate(image, "Hi", max_tokens=1)
        session.add_step_listener(steps.append)
        # Four start together and take the four slots in order; once the first has made tokens, the
        # other two join (waiting for a slot: six requests, four slots), and a seventh, a copy of the
        # first, is cancelled after 2 pieces.
        first = [session.generate(image, q, max_tokens=40, stream=True) for image, q in requests[:4]]
        pieces = [[next(first[0]), next(first[0]), next(first[0])]]
        later = [session.generate(image, q, max_tokens=40, stream=True) for image, q in requests[4:]]
        doomed = session.generate(*requests[0], max_tokens=40, stream=True)
        next(doomed), next(doomed)
        doomed.cancel()
        list(doomed)
        streams = first + later
        pieces[0] += list(first[0])
        pieces += [list(s) for s in streams[1:]]

    for stream, got, (text, tokens, reason) in zip(streams, pieces, alone):
        assert ("".join(got), stream.generation.completion_tokens, stream.generation.finish_reason) == (
            text,
            tokens,
            reason,
        )
        assert len(got) > 1  # streamed
    assert doomed.generation.finish_reason == "cancelled" and alone[0][0].startswith(doomed.generation.text)
    assert doomed.generation.completion_tokens < alone[0][1]

    # The first four are queued before the first step, so the schedule is set by their prompts and
    # answers: the fourth starts decoding before the first ends.
    decode_rows = [s.decode_rows for s in steps if s.decode_rows]
    assert max(decode_rows) == 4  # the slots were shared, never more than --max-batch
    assert any(s.decode_rows and s.prefill_tokens for s in steps)  # a prompt was prefilled between decode rows
    assert max(s.prefill_tokens for s in steps) <= 32  # in chunks: never a whole prompt at once
    assert max(s.slots_in_use for s in steps) <= 4


def test_concurrent_threads_get_the_answers_they_get_alone(shapes_int4, requests, alone):
    answers: dict[int, tuple[str, int, str]] = {}
    with Session(shapes_int4, max_batch=3, prefill_chunk=32) as session:

        def ask(i: int) -> None:
            a = session.generate(*requests[i], max_tokens=40)
            answers[i] = (a.text, a.completion_tokens, a.finish_reason)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert [answers[i] for i in range(len(requests))] == alone


def test_a_seeded_sampled_request_gives_the_same_text_whatever_runs_beside_it(shapes_int4, requests):
    image, question = requests[0]
    options = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=11)
    with Session(shapes_int4, max_batch=1, prefill_chunk=32) as session:
        by_itself = session.generate(image, question, **options).text
    with Session(shapes_int4, max_batch=4, prefill_chunk=32) as session:
        beside = [session.generate(i, q, max_tokens=40, stream=True) for i, q in requests[1:4]]
        sampled = session.generate(image, question, **options).text
        for stream in beside:
            stream.cancel()
        greedy = session.generate(image, question, max_tokens=40).text
    assert sampled == by_itself and sampled != greedy


def test_a_step_that_fails_fails_its_requests_and_the_session_goes_on(shapes_int4, requests, monkeypatch):
    from mvlm_compile.runtime.kv_cache import DecoderLoop

    with Session(shapes_int4, max_batch=2, prefill_chunk=32) as session:
        step = DecoderLoop.step
        calls = [0]

        def failing(self, first, embeds):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("device lost")
            return step(self, first, embeds)

        monkeypatch.setattr(DecoderLoop, "step", failing)
        stream = session.generate(*requests[0], max_tokens=40, stream=True)
        with pytest.raises(RuntimeError, match="device lost"):
            list(stream)
        assert stream.generation.finish_reason == "error" and session.slots_in_use == 0
        monkeypatch.setattr(DecoderLoop, "step", step)
        assert session.generate(*requests[1], max_tokens=4).completion_tokens >= 1


@pytest.mark.parametrize("max_batch", [0, 65, 2.5])
def test_max_batch_out_of_range_is_a_usage_error(shapes_int4, max_batch):
    from mvlm_compile.errors import MvlmError

    with pytest.raises(MvlmError, match=f"--max-batch {max_batch}: expected 1 to 64"):
        Session(shapes_int4, max_batch=max_batch)


def test_a_draw_does_not_depend_on_the_order_rounding_gives_near_equal_tokens():
    """At temperature 100 every token is near-equally likely: logits that differ in their last bits
    (another prefill chunk, a reused prefix, another batch) must give the same token for the same draw."""
    import numpy as np

    from mvlm_compile.runtime.pipeline import Sampling, next_token

    logits = np.random.default_rng(0).normal(0, 1, 512).astype(np.float32)
    rounded = logits + np.random.default_rng(1).normal(0, 1e-3, 512).astype(np.float32)
    for top_p in (1.0, 0.9):
        sampling = Sampling(temperature=100, top_p=top_p, seed=0)
        tokens = [next_token(logits, sampling, np.random.default_rng(seed)) for seed in range(200)]
        again = [next_token(rounded, sampling, np.random.default_rng(seed)) for seed in range(200)]
        assert tokens == again
        assert len(set(tokens)) > 100  # near uniform: the draws spread over the vocabulary


def test_a_seeded_request_gives_the_same_text_however_its_prompt_was_prefilled(shapes_int4):
    """The same seeded request at temperature 100 (every token near-equally likely), its prompt
    prefilled whole without prefix reuse, in chunks of 32, and all but its last token from a kept
    prefix. With fp32 activations: int8's are quantized per call, so another chunk rounds them anew."""
    question = QUESTIONS[0]
    options = dict(max_tokens=120, temperature=100, seed=1)
    with Session(shapes_int4, int4_activations="fp32", prefix_cache_mib=0) as session:
        whole = session.generate(IMAGE, question, **options)
    with Session(shapes_int4, int4_activations="fp32", prefill_chunk=32) as session:
        chunked = session.generate(IMAGE, question, **options)
        reused = session.generate(IMAGE, question, **options)
    assert (whole.cached_tokens, chunked.cached_tokens, reused.cached_tokens) == (0, 0, whole.prompt_tokens - 1)
    assert whole.completion_tokens > 20  # long enough to tell answers apart
    assert chunked.text == whole.text and reused.text == whole.text
