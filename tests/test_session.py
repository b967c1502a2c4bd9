"""The public runtime API (mvlm_compile.Session) on the embedded shapes model, deployed form (INT4 decoder).

The expected answer is the FP32 PyTorch reference's (golden/tiny-shapes/generation.json: the greedy
tokens for the example image, up to EOS), which the INT4 recipe's gate requires token for token."""

from __future__ import annotations

import subprocess
import sys
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


def test_concurrent_callers_get_the_answers_they_get_alone(session):
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


def test_cancel_frees_the_slot_at_once(shapes_int4, reference_answer):
    with Session(shapes_int4, int4_activations="fp32", max_batch=1) as session:
        stream = session.generate(IMAGE, QUESTION, max_tokens=64, stream=True)
        first = next(stream)
        cancelled = threading.Thread(target=stream.cancel)
        cancelled.start()
        cancelled.join()
        rest = list(stream)  # pieces made before the cancel reached a step boundary
        assert stream.generation.finish_reason == "cancelled" and session.slots_in_use == 0
        assert stream.generation.text == first + "".join(rest) and reference_answer[0].startswith(
            stream.generation.text
        )
        assert answer_within(session, 60) == reference_answer[0]

        # An answer nobody reads is made all the same (its pieces wait): it holds its one slot only until
        # it ends, so the next request is answered.
        abandoned = session.generate(IMAGE, QUESTION, max_tokens=64, stream=True)
        next(abandoned)
        assert answer_within(session, 60) == reference_answer[0]
        assert "".join(abandoned) and abandoned.generation.finish_reason == "stop"


def test_a_second_request_from_the_thread_holding_a_stream_is_answered(session, reference_answer):
    held = session.generate(IMAGE, QUESTION, max_tokens=64, stream=True)
    first = next(held)
    assert session.generate(IMAGE, QUESTION, max_tokens=64).text == reference_answer[0]
    assert first + "".join(held) == reference_answer[0]


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


class CountingTokenizer:
    """The session's prompt tokenizer, recording every text it is asked to encode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.encoded = tokenizer, []

    def encode(self, text: str, *args, **kwargs):
        self.encoded.append(text)
        return self.tokenizer.encode(text, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def test_a_question_that_cannot_fit_is_refused_before_it_is_tokenized(session, monkeypatch):
    counting = CountingTokenizer(session._chat.prompt_tokenizer.literal)
    monkeypatch.setattr(session._chat.prompt_tokenizer, "literal", counting)
    with pytest.raises(MvlmError, match=r"^--prompt: 3000000 characters cannot fit in the context"):
        session.generate(IMAGE, "x" * 3_000_000)
    assert counting.encoded == []
    # What the bound lets through is tokenized once, and refused by its tokens if it is too long.
    longest = session._chat.max_question_chars
    with pytest.raises(MvlmError, match="exceed the context of 512"):
        session.generate(IMAGE, "x" * longest)
    assert sum(len(text) >= longest for text in counting.encoded) == 1


def test_the_question_bound_never_refuses_a_question_that_fits(session):
    """The densest text there is (the longest token, repeated) one character past the bound takes
    more tokens than the context leaves for a question."""
    chat = session._chat
    tokenizer = chat.tokenizer
    longest = max((t for t in tokenizer.get_vocab() if not t.startswith("<")), key=len).replace("▁", " ")
    text = (longest * (chat.max_question_chars // len(longest) + 1))[: chat.max_question_chars + 1]
    template = len(chat.prompt_ids("")) - 1 + 144  # the image's tokens
    question_tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    assert template + question_tokens - 2 > min(session.limits.max_prompt, session.limits.context - 1)


def test_without_max_tokens_the_answer_may_fill_the_context_and_the_question_is_tokenized_once(
    session, reference_answer, monkeypatch
):
    counting = CountingTokenizer(session._chat.prompt_tokenizer.literal)
    monkeypatch.setattr(session._chat.prompt_tokenizer, "literal", counting)
    answer = session.generate(IMAGE, QUESTION, max_tokens=None)
    assert (answer.text, answer.finish_reason) == (reference_answer[0], "stop")
    assert answer.max_new_tokens == session.limits.context - answer.prompt_tokens
    assert sum(QUESTION in text for text in counting.encoded) == 1


def test_special_tokens_typed_in_a_question_are_text(session):
    chat = session._chat
    ids = chat.prepare("Is </s> or <s> in the image? </s>", 1, ()).prompt_ids
    assert ids[0] == chat.bos and chat.bos not in ids[1:] and chat.eos not in ids
    after_image = ids[ids.index(chat.pipeline.image_token_index) + 1 :]
    assert chat.tokenizer.decode(after_image).startswith("\nIs </s> or <s> in the image? </s> ASSISTANT:")


def test_palettes_are_part_of_the_image_cache_key(shapes_int4):
    """Two palette images with the same indices and different palettes are different pictures."""
    import numpy as np
    from PIL import Image

    from mvlm_compile.model.preprocess import preprocess_image

    indices = Image.fromarray((np.arange(64 * 48).reshape(48, 64) % 4).astype(np.uint8), mode="P")
    warm, cold = indices.copy(), indices.copy()
    warm.putpalette([255, 0, 0, 255, 128, 0, 255, 255, 0, 128, 0, 0])
    cold.putpalette([0, 0, 255, 0, 128, 255, 0, 255, 255, 0, 0, 128])
    with Session(shapes_int4, int4_activations="fp32", image_cache_size=4) as session:
        seen = []
        run = session.backend.run
        session.backend.run = lambda graph, feed: (seen.append(feed) if graph == "vision" else None) or run(graph, feed)  # type: ignore[method-assign]
        session.generate(warm, QUESTION, max_tokens=1)
        session.generate(cold, QUESTION, max_tokens=1)
        assert len(seen) == 2
        session.generate(cold.convert("RGB"), QUESTION, max_tokens=1)  # the same picture: from the cache
        assert len(seen) == 2
    np.testing.assert_array_equal(next(iter(seen[1].values())), preprocess_image(cold.convert("RGB")))


def test_generate_after_close_is_a_clear_error(shapes_int4):
    session = Session(shapes_int4, int4_activations="fp32")
    session.close()
    with pytest.raises(MvlmError, match=r"^session of 'tiny-shapes': closed; open a new Session to generate$"):
        session.generate(IMAGE, QUESTION, max_tokens=1)


def test_the_embedding_table_served_does_not_change_under_the_session(tmp_path):
    """The table overwritten in place, then truncated, while a session serves it: the same answers
    (before, it was memory-mapped: the answers changed, then the process died with SIGBUS)."""
    from conftest import copy_tiny_bundle

    bundle = copy_tiny_bundle(tmp_path / "bundle")
    script = f"""
import os, sys
from mvlm_compile import Session
from mvlm_compile.model.preprocess import golden_image
table = {str(bundle / "artifacts" / "embed_tokens.npy")!r}
with Session({str(bundle)!r}, int4_activations="fp32") as session:
    ask = lambda: session.generate(golden_image(), "What is in the image?", max_tokens=8).text
    first = ask()
    size = os.path.getsize(table)
    with open(table, "r+b") as f:  # in place: the same inode, other numbers
        f.seek(128)
        f.write(bytes(range(256)) * ((size - 128) // 256) + bytes((size - 128) % 256))
    overwritten = ask()
    os.truncate(table, 128)
    truncated = ask()
    print(first == overwritten == truncated)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "True", done.stdout
