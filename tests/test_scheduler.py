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
