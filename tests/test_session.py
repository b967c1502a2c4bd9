"""The public runtime API (mvlm_compile.Session) on the embedded shapes model, deployed form (INT4 decoder).

The expected answer is the FP32 PyTorch reference's (golden/tiny-shapes/generation.json: the greedy
tokens for the example image, up to EOS), which the INT4 recipe's gate requires token for token."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import QUESTION, shapes_reference_answer

from mvlm_compile import Session
from mvlm_compile.errors import MvlmError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden" / "tiny-shapes"
IMAGE = GOLDEN / "image.png"


@pytest.fixture(scope="module")
def reference_answer() -> tuple[str, int]:
    """(text, tokens) of the FP32 reference's answer to QUESTION about IMAGE."""
    return shapes_reference_answer()


@pytest.fixture(scope="module")
def session(shapes_int4):
    with Session(shapes_int4, int4_activations="fp32") as s:
        yield s


def count_vision_runs(session: Session) -> list[int]:
    calls = [0]
    run = session.backend.run

    def counting(graph, feed):
        calls[0] += graph == "vision"
        return run(graph, feed)

    session.backend.run = counting  # type: ignore[method-assign]
    return calls


def test_answer_matches_the_reference_streamed_and_not(session, reference_answer):
    text, tokens = reference_answer
    whole = session.generate(IMAGE, QUESTION, max_tokens=64)
    assert (whole.text, whole.completion_tokens, whole.finish_reason) == (text, tokens, "stop")
    assert whole.prompt_tokens == session.prompt_tokens(QUESTION) > 144  # the image's 144 tokens included

    stream = session.generate(IMAGE.read_bytes(), QUESTION, max_tokens=64, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert (stream.generation.completion_tokens, stream.generation.finish_reason) == (tokens, "stop")


def test_max_tokens_and_stop_strings(session, reference_answer):
    text, _ = reference_answer
    short = session.generate(IMAGE, QUESTION, max_tokens=3)
    assert short.finish_reason == "length" and short.completion_tokens == 3 and text.startswith(short.text)
    word = text.split()[3]
    stopped = session.generate(IMAGE, QUESTION, max_tokens=64, stop=[word])
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(word)]


def test_same_image_runs_vision_once(shapes_int4, reference_answer):
    from PIL import Image

    with Session(shapes_int4, int4_activations="fp32", image_cache_size=1) as session:
        vision_runs = count_vision_runs(session)
        first = session.generate(IMAGE, QUESTION, max_tokens=64).text
        # The same content as bytes, then a second question: answered from the cache.
        assert session.generate(IMAGE.read_bytes(), QUESTION, max_tokens=64).text == first == reference_answer[0]
        session.generate(IMAGE, "How many shapes are there?", max_tokens=8)
        assert vision_runs[0] == 1 and session.image_cache_info().hits == 2
        other = Image.open(IMAGE).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        session.generate(other, QUESTION, max_tokens=4)  # a new image evicts the only entry
        session.generate(IMAGE, QUESTION, max_tokens=4)
        assert vision_runs[0] == 3 and session.image_cache_info().size == 1


def test_concurrent_callers_get_the_sequential_answers(session):
    questions = ["How many shapes are there?", "What shape is on the left?", QUESTION, "Where is the red shape?"]
    expected = [session.generate(IMAGE, q, max_tokens=32).text for q in questions]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = session.generate(IMAGE, questions[i % 4], max_tokens=32).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [answers[i] for i in range(8)] == expected * 2


def answer_within(session: Session, seconds: float) -> str | None:
    """The answer to QUESTION, or None when the session is still busy after `seconds`."""
    answers: list[str] = []
    asker = threading.Thread(target=lambda: answers.append(session.generate(IMAGE, QUESTION, max_tokens=64).text))
    asker.start()
    asker.join(timeout=seconds)
    return answers[0] if answers else None


def test_cancel_frees_the_session_at_once(session, reference_answer):
    stream = session.generate(IMAGE, QUESTION, max_tokens=64, stream=True)
    first = next(stream)
    cancelled = threading.Thread(target=stream.cancel)
    cancelled.start()
    cancelled.join()
    assert list(stream) == [] and stream.generation.finish_reason == "cancelled"
    assert stream.generation.text == first
    assert answer_within(session, 60) == reference_answer[0]

    abandoned = session.generate(IMAGE, QUESTION, max_tokens=64, stream=True)
    next(abandoned)
    assert answer_within(session, 1) is None  # busy: the abandoned stream holds the session...
    abandoned.close()  # ...until its client hangs up
    assert answer_within(session, 60) == reference_answer[0]


@pytest.mark.parametrize(
    "image, prompt, options, message",
    [
        (b"not an image", QUESTION, {}, "image: not an image file"),
        (b"", QUESTION, {}, "image: empty"),
        (IMAGE, "", {}, "--prompt: is empty"),
        (IMAGE, QUESTION, {"max_tokens": 0}, "--max-new-tokens 0"),
        (IMAGE, QUESTION, {"max_tokens": 10_000}, "exceed the context of 512"),
        (IMAGE, "word " * 400, {}, "exceed the context of 512"),
        (IMAGE, QUESTION, {"temperature": -1}, "--temperature -1"),
        (IMAGE, QUESTION, {"top_p": 0}, "--top-p 0"),
        (12, QUESTION, {}, "expected a file path, encoded bytes or a PIL image"),
    ],
)
def test_bad_requests_are_refused_before_running(session, image, prompt, options, message):
    vision_runs = count_vision_runs(session)
    with pytest.raises(MvlmError, match=message.replace("+", r"\+")):
        session.generate(image, prompt, **options)
    assert vision_runs[0] == 0
