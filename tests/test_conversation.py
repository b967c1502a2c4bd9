"""Conversations (Session.chat, Session.conversation) and prefix reuse (runtime/prefix_cache.py).

The prefix cache is checked twice: byte for byte on a decoder block filled with random rows (what a
restore copies into a slot is what a store copied out, for the positions whose keys match, and the
least recently used sequences go first), and end to end on the embedded model, where answers with
reuse must equal answers without it, token for token, over a 3-turn conversation, beside other
conversations in the batch's slots, and after an earlier turn was edited."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_kv_cache import _plan

from mvlm_compile import Session
from mvlm_compile.errors import MvlmError
from mvlm_compile.model.config import IMAGE_TOKEN_INDEX
from mvlm_compile.model.prompt import SYSTEM_V1, Dialogue
from mvlm_compile.runtime.kv_cache import DecoderLoop
from mvlm_compile.runtime.ort_backend import OrtExecutor
from mvlm_compile.runtime.prefix_cache import PrefixCache
from mvlm_compile.tinytask.scenes import draw_scene, sample_scene

IMAGE = Path(__file__).resolve().parents[1] / "golden" / "tiny-shapes" / "image.png"
QUESTIONS = ["Describe the image in one sentence.", "How many shapes are there?", "What shape is on the left?"]
IMAGE_TOKENS = 144


# -- the prefix cache on a block of random rows --

PAGE = 16


def _loop(slots: int = 3) -> DecoderLoop:
    """A decoder block of 2 layers x 3 slots with 256-byte rows, its cache filled with random bytes."""
    plan = _plan(layers=2, slots=slots, kv_heads=2, head_dim=64, hidden=8, vocab=16, context=96, max_prompt=64)
    loop = DecoderLoop(OrtExecutor(None), plan)
    rng = np.random.default_rng(0)
    loop.executor.write(loop.base, rng.integers(0, 256, plan.cache_bytes, dtype=np.uint8))
    return loop


def _rows(loop: DecoderLoop, slot: int, length: int) -> list[np.ndarray]:
    """Each layer's K and V of a slot's first `length` positions, read straight from the block."""
    plan = loop.plan
    whole = np.frombuffer(loop.executor._rows(loop.base, 1, plan.cache_bytes, 1)[0].tobytes(), np.float16)
    per_tensor = plan.cache_tensor_bytes // 2
    out = []
    for tensor in range(2 * plan.layers):
        cells = whole[tensor * per_tensor : tensor * per_tensor + plan.context * plan.slots * 128]
        out.append(cells.reshape(plan.context, plan.slots, 128)[:length, slot].copy())
    return out


def _cache(loop: DecoderLoop, pages: int) -> PrefixCache:
    page_bytes = 2 * loop.plan.layers * PAGE * loop.plan.slot_bytes
    return PrefixCache(loop, pages * page_bytes, PAGE)


def test_a_restored_prefix_is_the_stored_rows_up_to_the_first_key_that_differs():
    loop = _loop()
    cache = _cache(loop, 8)
    keys = list(range(100, 140))  # 40 positions: two full pages and a partial one
    loop.lengths[0] = 40
    cache.store(0, keys + [999])  # keys beyond the slot's length (the last token drawn) are not kept
    assert cache.info().pages_used == 3

    # A prompt that extends the sequence reuses all of it; one that parts at position 21 reuses 21
    # (inside the second page); the same prompt again all but its last position (it gives the logits).
    for slot, prompt, reused in ((1, keys + [7, 8], 40), (2, keys[:21] + [5] * 10, 21), (1, keys, 39)):
        loop.clear(slot)
        assert cache.restore(slot, prompt) == reused == loop.lengths[slot]
        for restored, original in zip(_rows(loop, slot, reused), _rows(loop, 0, reused)):
            np.testing.assert_array_equal(restored, original)
    assert cache.restore(1, [1, 2, 3] + keys) == 0  # content, not position: nothing in common at position 0
    assert cache.info().hits == 3 and cache.info().lookups == 4 and cache.info().reused_tokens == 40 + 21 + 39


def test_shared_prefixes_share_pages_and_the_least_recently_used_sequence_is_evicted_first():
    loop = _loop()
    cache = _cache(loop, 6)
    a, b, c = list(range(100, 148)), list(range(200, 248)), list(range(300, 348))  # 3 full pages each
    for slot, keys in ((0, a), (1, b)):
        loop.lengths[slot] = 48
        cache.store(slot, keys)
    assert cache.info().pages_used == 6
    assert cache.restore(2, a + [1]) == 48  # a is used now: b is the least recently used
    cache.store(2, c)  # three pages for c: b's, leaf first (its tail, then the pages before it)
    assert cache.info().pages_used == 6
    for slot, keys, reused in ((0, a, 48), (1, b, 0), (2, c, 48)):
        loop.clear(slot)
        assert cache.restore(slot, keys + [1]) == reused, keys[0]

    # Two sequences that share a first page keep it once.
    shared = _cache(_loop(), 4)
    loop2 = shared.loop
    loop2.lengths[0] = loop2.lengths[1] = 32
    shared.store(0, a[:32])
    shared.store(1, a[:16] + b[:16])
    assert shared.info().pages_used == 3


# -- conversations on the embedded model --


@pytest.fixture(scope="module")
def reuse(shapes_int4):
    with Session(shapes_int4, max_batch=4, prefill_chunk=32) as session:
        yield session


@pytest.fixture(scope="module")
def no_reuse(shapes_int4):
    with Session(shapes_int4, max_batch=1, prefix_cache_mib=0) as session:
        yield session


def _turns(questions: list[str], answers: list[str]) -> list[dict[str, str]]:
    messages = []
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def _expanded(ids: list[int]) -> list[int]:
    out: list[int] = []
    for token in ids:
        out.extend([token] * IMAGE_TOKENS if token == IMAGE_TOKEN_INDEX else [token])
    return out


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _overwrite_the_slots(session: Session) -> None:
    """Another image's question in every slot at once: no row a conversation left in a slot survives."""
    other = draw_scene(sample_scene((9001,)))
    streams = [session.generate(other, "What is in the image?", max_tokens=2, stream=True) for _ in range(4)]
    for stream in streams:
        list(stream)


@pytest.fixture(scope="module")
def three_turns(no_reuse) -> list:
    """The 3-turn conversation answered with no reuse, each turn from scratch: the reference."""
    answers = []
    for i in range(3):
        answers.append(no_reuse.chat(_turns(QUESTIONS[: i + 1], [a.text for a in answers]), IMAGE, max_tokens=40))
    assert all(a.cached_tokens == 0 for a in answers)
    return answers


def test_a_conversation_with_prefix_reuse_answers_as_without_it(reuse, no_reuse, three_turns):
    chat = reuse.conversation(image=IMAGE)
    got = []
    for question in QUESTIONS:
        got.append(chat.ask(question, max_tokens=40))
        _overwrite_the_slots(reuse)  # the next turn's prefix must come from the prefix cache
    assert [(g.text, g.completion_tokens, g.prompt_tokens) for g in got] == [
        (a.text, a.completion_tokens, a.prompt_tokens) for a in three_turns
    ]
    assert chat.messages == _turns(QUESTIONS, [a.text for a in three_turns])
    # Each later turn reuses at least what its prompt has in common with the turn before's prompt
    # (the rest of that turn's cache, its answer, is reused as far as it tokenizes the same way).
    for before, after in zip(got, got[1:]):
        assert _common(_expanded(before.prompt_ids), _expanded(after.prompt_ids)) <= after.cached_tokens
        assert after.cached_tokens < after.prompt_tokens
    assert got[1].cached_tokens > got[0].prompt_tokens  # the first answer's tokens too
    # The template as written: the image in the first user turn, each answer closed by EOS.
    ids = got[2].prompt_ids
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(2) == 2 and ids.index(IMAGE_TOKEN_INDEX) < ids.index(2)


def test_an_edited_earlier_turn_reuses_nothing_after_the_edit(reuse, no_reuse, three_turns):
    answers = [a.text for a in three_turns]
    reuse.chat(_turns(QUESTIONS, answers[:2]), IMAGE, max_tokens=40)  # the conversation is kept
    _overwrite_the_slots(reuse)
    edited = [answers[0].replace("yellow", "green", 1), answers[1]]
    assert edited[0] != answers[0]
    got = reuse.chat(_turns(QUESTIONS, edited), IMAGE, max_tokens=40)
    expected = no_reuse.chat(_turns(QUESTIONS, edited), IMAGE, max_tokens=40)
    assert (got.text, got.completion_tokens) == (expected.text, expected.completion_tokens)
    kept = reuse._chat.prompt_ids(Dialogue.from_messages(_turns(QUESTIONS, answers[:2]), image=True))
    assert got.cached_tokens == _common(_expanded(kept), _expanded(got.prompt_ids))  # exactly up to the edit
    assert got.cached_tokens < got.prompt_tokens - 20


def test_another_question_about_the_same_image_reuses_the_system_prompt_and_the_image(reuse):
    reuse.chat(_turns(["Where is the red shape?"], []), IMAGE, max_tokens=8)
    got = reuse.chat(_turns(["Where is the blue shape?"], []), IMAGE, max_tokens=8)
    at_image = got.prompt_ids.index(IMAGE_TOKEN_INDEX)
    assert got.cached_tokens >= at_image + IMAGE_TOKENS
    other = Image.open(IMAGE).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped = reuse.chat(_turns(["Where is the blue shape?"], []), other, max_tokens=8)
    assert flipped.cached_tokens == at_image  # the same text before the image, another image


def test_conversations_in_the_batch_slots_answer_as_alone(reuse, no_reuse):
    """Four conversations at once, on four slots, each turn waiting for the one before: every turn
    equals the same conversation answered alone without reuse."""
    images = [Image.open(IMAGE).convert("RGB"), Image.open(IMAGE).convert("RGB").transpose(Image.Transpose.ROTATE_90)]
    plans = [(images[i % 2], [QUESTIONS[(i + k) % 3] for k in range(3)]) for i in range(4)]
    expected = []
    for image, questions in plans:
        chat = no_reuse.conversation(image=image)
        expected.append([chat.ask(q, max_tokens=24).text for q in questions])
    got: dict[int, list[str]] = {}
    cached: dict[int, list[int]] = {}

    def talk(i: int) -> None:
        image, questions = plans[i]
        chat = reuse.conversation(image=image)
        answers = [chat.ask(q, max_tokens=24) for q in questions]
        got[i], cached[i] = [a.text for a in answers], [a.cached_tokens for a in answers]

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got[i] for i in range(4)] == expected
    assert all(c[1] > 0 and c[2] > 0 for c in cached.values())


def test_a_text_only_conversation_and_a_system_prompt(reuse, no_reuse):
    messages = [{"role": "system", "content": "You answer in one word."}, *_turns(["Hello, who are you?"], [])]
    got = reuse.chat(messages, max_tokens=8)
    expected = no_reuse.chat(messages, max_tokens=8)
    assert got.text == expected.text and IMAGE_TOKEN_INDEX not in got.prompt_ids
    default = reuse.chat(messages[1:], max_tokens=8)
    tokenizer = reuse._chat.tokenizer
    difference = len(tokenizer.encode(SYSTEM_V1).ids) - len(tokenizer.encode("You answer in one word.").ids)
    assert default.prompt_tokens - got.prompt_tokens == difference
    assert got.prompt_tokens == len(got.prompt_ids)  # no image: every id is one position


def test_a_stopped_answer_stays_as_its_text_so_far(reuse):
    chat = reuse.conversation(image=IMAGE)
    stream = chat.ask(QUESTIONS[0], stream=True, max_tokens=40)
    first = next(stream)
    with pytest.raises(MvlmError, match="still being generated"):
        chat.ask(QUESTIONS[1])
    stream.cancel()
    assert stream.wait(timeout=60).finish_reason == "cancelled"  # ended, though not read to the end
    rest = "".join(stream)
    chat.ask(QUESTIONS[1], max_tokens=8)
    assert chat.messages[1] == {"role": "assistant", "content": first + rest}
    chat.reset()
    assert chat.messages == [] and chat.image == IMAGE


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], r"^messages: no user turn"),
        ([{"role": "assistant", "content": "Hi"}], r"^messages\[0\]: an assistant turn first; expected user and"),
        (_turns(["a", "b"], [])[:1] * 2, r"^messages\[1\]: a user turn after a user turn; expected user and assistant"),
        (_turns(["a"], ["b"]), r"^messages\[1\]: the conversation ends with an assistant turn; expected a user turn"),
        (
            [*_turns(["a"], []), {"role": "system", "content": "x"}],
            r"^messages\[1\]: a system message after the conversation started",
        ),
        ([{"role": "tool", "content": "x"}], r"^messages\[0\]\.role 'tool': expected 'system', 'user' or"),
        ([{"role": "user", "content": "  "}], r"^messages\[0\]\.content: is empty"),
        ([{"role": "user", "content": "see <image>"}], r"^messages\[0\]\.content: must not contain <image>"),
        ([{"role": "user", "content": ["parts"]}], r"^messages\[0\]\.content: a list; expected text"),
        ("What?", r"^messages: a str; expected a list"),
    ],
)
def test_a_bad_conversation_is_refused_naming_the_message(reuse, messages, message):
    with pytest.raises(MvlmError, match=message):
        reuse.chat(messages, IMAGE)


def test_a_conversation_longer_than_the_context_is_refused(reuse):
    turn = "Describe the image in one sentence, please."
    messages = _turns([turn], [])
    while len(_expanded(reuse._chat.prompt_ids(Dialogue.from_messages(messages, image=True)))) + 8 <= 512:
        messages = _turns([turn] * (len(messages) // 2 + 2), [turn] * (len(messages) // 2 + 1))
    tokens = len(_expanded(reuse._chat.prompt_ids(Dialogue.from_messages(messages, image=True))))
    with pytest.raises(
        MvlmError, match=rf"^messages: {tokens} prompt tokens \(with the image\) \+ --max-new-tokens 8 "
    ):
        reuse.chat(messages, IMAGE, max_tokens=8)
    # Text only: its prompt has no image's tokens to count, and the message does not say it has.
    with pytest.raises(MvlmError, match=r"^messages: \d+ prompt tokens \+ --max-new-tokens 400 exceed the context"):
        reuse.chat(messages, max_tokens=400)


def test_with_chunked_prefill_only_the_context_bounds_a_prompt(reuse):
    """An engine's longest single prefill (max_prompt, 1024 of the 1.7B's 2048) bounds a prompt only
    when it is prefilled in one call: the scheduler prefills in chunks, so a conversation may grow
    to the context."""
    limits = dataclasses.replace(reuse.limits, max_prompt=384, context=512)
    limits.check(500, 12, "messages", chunked_prefill=True)
    with pytest.raises(
        MvlmError, match=r"^messages: 500 prompt tokens \(with the image\) exceed the longest prompt of 384"
    ):
        limits.check(500, 12, "messages")
    assert reuse._chat.chunked_prefill and reuse._chat.max_prompt_tokens == reuse.limits.context - 1
