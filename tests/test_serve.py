"""`mvlm-compile serve` as a client sees it: real server processes (torch and transformers blocked, as
on a Jetson) on the embedded shapes model's deployed form, queried with the official openai client
and raw HTTP.

The expected answer is the FP32 PyTorch reference's (golden/tiny-shapes/generation.json), its
prompt's length counted from the golden input ids and the vision config (LDPv2 pools 2x2); a
conversation's prompt length is counted with the model's tokenizer over the authors' template, and
its answers are a session's without prefix reuse (prefix_cache_mib=0), in this process. Two
servers per module: `server` with the defaults (and small body/image limits, short header and body
timeouts), `guarded` with an API key (from a file), no queue (--max-queue 0) and remote images
allowed; the last test stops `guarded` with SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import json
import math
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import GOLDEN_SHAPES, QUESTION, SHAPES_MODEL, cli_argv_without_torch, shapes_reference_answer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mvlm_compile.ports import free_ports

IMAGE = GOLDEN_SHAPES / "image.png"
MODEL = "tiny-shapes"  # the recipe's name: the default model id
API_KEY = "test-key-123"
MAX_BODY, MAX_IMAGE = 2 * 2**20, 2**20
HEADER_TIMEOUT = BODY_TIMEOUT = 2  # seconds
# Sampling at temperature 100 is near uniform over the vocabulary, so EOS (1 in 512) rarely ends it:
# with one of these seeds the answer runs to max_tokens, a generation long enough to hang up on.
LONG = {"temperature": 100, "max_tokens": 300}


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def ask(question: str = QUESTION, url: str | None = None) -> list[dict]:
    url = url or data_url(IMAGE.read_bytes())
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@pytest.fixture(scope="module")
def reference() -> dict:
    text, tokens = shapes_reference_answer()
    golden = json.loads((GOLDEN_SHAPES / "generation.json").read_text())
    vision = json.loads((SHAPES_MODEL / "config.json").read_text())["vision_config"]
    image_tokens = (vision["image_size"] // vision["patch_size"] // 2) ** 2
    prompt_tokens = len(golden["input_ids"]) - 1 + image_tokens  # the image token stands for the image's
    return {"text": text, "completion_tokens": tokens, "prompt_tokens": prompt_tokens}


class Server:
    """`mvlm-compile serve` in a subprocess; `statuses` are what /health answered until it was ready."""

    def __init__(self, artifacts: Path, *options: str) -> None:
        self.port = free_ports()[0]
        self.url = f"http://127.0.0.1:{self.port}"
        # fp32 activations, as verify and test_session.py: the reference's tokens on any CPU (int8's
        # rounding may differ between instruction sets).
        argv = ["serve", str(artifacts), "--port", str(self.port), "--int4-activations", "fp32", *options]
        argv = cli_argv_without_torch(argv)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stdout), daemon=True).start()
        self.statuses = self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> list[tuple[int, dict]]:
        statuses = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{''.join(self.log)}"
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(f"{self.url}/health", timeout=5)
                statuses.append((r.status_code, r.json()))
                if r.status_code == 200:
                    return statuses
            time.sleep(0.02)
        raise AssertionError(f"not ready within {timeout} s:\n{''.join(self.log)}")

    def client(self, api_key: str = "unused", **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def metrics(self) -> dict[str, float]:
        """name{label="value",...} -> value, read by prometheus_client's own parser."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(shapes_int4):
    s = Server(
        shapes_int4,
        *("--max-queue", "8", "--max-body-bytes", str(MAX_BODY), "--max-image-bytes", str(MAX_IMAGE)),
        *("--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)),
    )
    yield s
    assert s.stop() == 0, "".join(s.log)


@pytest.fixture(scope="module")
def guarded(shapes_int4, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(API_KEY + "\n")
    s = Server(
        shapes_int4, "--api-key-file", str(key_file), "--max-queue", "0", "--max-batch", "1", "--allow-remote-images"
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def long_seed(server) -> int:
    """A seed with which the LONG request runs to its max_tokens."""
    client = server.client()
    for seed in range(1, 9):
        answer = client.chat.completions.create(model=MODEL, messages=ask(), seed=seed, **LONG)
        if answer.choices[0].finish_reason == "length":
            assert answer.usage.completion_tokens == LONG["max_tokens"]
            return seed
    raise AssertionError("no seed in 1-8 gives a generation that runs to max_tokens")


def first_content(lines) -> str:
    """Read SSE lines up to the first with text."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended without text")


# Answers ---------------------------------------------------------------------------------------


def test_ready_after_loading(server):
    """/health answered 503 while the model loaded (the socket listens first), then 200."""
    assert server.statuses[-1] == (200, {"status": "ready", "model": MODEL})
    assert any(code == 503 and body["status"] == "loading" for code, body in server.statuses), server.statuses
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_answer_matches_the_reference(server, reference):
    answer = server.client().chat.completions.create(model=MODEL, messages=ask(), temperature=0)
    assert answer.choices[0].message.content == reference["text"]
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        reference["prompt_tokens"],
        reference["completion_tokens"],
        reference["prompt_tokens"] + reference["completion_tokens"],
    )


def test_streamed_answer_matches_the_reference(server, reference):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=ask(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == reference["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []  # include_usage: the last chunk carries the usage alone
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        reference["prompt_tokens"],
        reference["completion_tokens"],
    )
    assert 0 <= chunks[-1].usage.prompt_tokens_details.cached_tokens < reference["prompt_tokens"]


def test_max_tokens_and_stop(server, reference):
    client = server.client()
    short = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert reference["text"].startswith(short.choices[0].message.content)
    word = reference["text"].split()[3]
    stopped = client.chat.completions.create(model=MODEL, messages=ask(), max_completion_tokens=64, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == reference["text"][: reference["text"].index(word)]


def test_six_concurrent_clients_are_decoded_together(server, reference):
    """Four slots (the default for an artifacts directory), six clients: each gets the answer it gets
    alone, and /metrics shows decode steps of more than one sequence."""
    before = server.metrics()

    def one(i: int) -> str:
        client = server.client(timeout=120)
        if i % 2:
            return client.chat.completions.create(model=MODEL, messages=ask()).choices[0].message.content
        stream = client.chat.completions.create(model=MODEL, messages=ask(), stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(6))) == [reference["text"]] * 6
    after = server.metrics()
    steps = after["mvlm_decode_batch_size_count"] - before.get("mvlm_decode_batch_size_count", 0)
    single = after['mvlm_decode_batch_size_bucket{le="1.0"}'] - before.get('mvlm_decode_batch_size_bucket{le="1.0"}', 0)
    assert steps > single  # some steps advanced several answers at once
    rows = after["mvlm_decode_batch_size_sum"] - before.get("mvlm_decode_batch_size_sum", 0)
    assert rows == 6 * reference["completion_tokens"]  # each token after the prefill's, EOS included
    assert after["mvlm_slots"] == 4 and after["mvlm_requests_running"] == 0
    # Identical prompts: each prompt token is either prefilled or its K/V reused from a kept prefix.
    prefilled = after["mvlm_prefill_tokens_total"] - before.get("mvlm_prefill_tokens_total", 0)
    reused = after["mvlm_prefix_cache_reused_tokens_total"] - before.get("mvlm_prefix_cache_reused_tokens_total", 0)
    assert reused > 0 and prefilled + reused == 6 * reference["prompt_tokens"]


def test_the_queue_bound_counts_the_requests_beyond_the_slots():
    """--max-batch 2 --max-queue 1: two requests in the slots and one waiting are admitted; the
    fourth is refused, and a place frees when one ends."""
    import asyncio

    from mvlm_compile.serve.errors import APIError
    from mvlm_compile.serve.metrics import Metrics
    from mvlm_compile.serve.worker import Worker

    class TwoSlots:
        max_batch, slots_in_use = 2, 2

        def add_step_listener(self, listener) -> None:
            pass

        def prefix_cache_info(self) -> None:
            return None  # no prefix reuse

    async def admit() -> None:
        worker = Worker(Metrics(), max_queue=1)
        worker.attach(TwoSlots())  # type: ignore[arg-type]
        jobs = [worker.admit() for _ in range(3)]
        with pytest.raises(APIError) as refused:
            worker.admit()
        assert refused.value.status == 429 and "--max-batch" in refused.value.message
        (depth,) = worker.metrics.queue_depth.collect()[0].samples
        assert depth.value == 1  # the third waits beyond the two slots
        jobs[0].release()
        worker.admit()
        worker.shutdown()

    asyncio.run(admit())


def test_metrics_count_one_request(server, reference):
    before = server.metrics()
    server.client().chat.completions.create(model=MODEL, messages=ask())
    after = server.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('mvlm_requests_total{endpoint="/v1/chat/completions",status="200"}') == 1
    assert grew("mvlm_prompt_tokens_total") == reference["prompt_tokens"]
    assert grew("mvlm_completion_tokens_total") == reference["completion_tokens"]
    assert grew('mvlm_generations_total{finish_reason="stop"}') == 1
    assert grew("mvlm_time_to_first_token_seconds_count") == 1
    assert grew("mvlm_time_per_output_token_seconds_count") == 1
    assert 0 < grew("mvlm_time_to_first_token_seconds_sum") < 60
    assert after["mvlm_queue_depth"] == after["mvlm_requests_running"] == 0 and after["mvlm_ready"] == 1


# Conversations ---------------------------------------------------------------------------------

SYSTEM_V1 = (  # the authors' conv_vicuna_v1 system prompt, the one the template has unless a system message replaces it
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def count_prompt_tokens():
    """(system, [(role, text), ...], image) -> the prompt's tokens, the image's included: the authors'
    'v1' template ("{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"), each "</s>"
    the EOS token and each piece between them and the image encoded by the model's tokenizer (which
    adds BOS: kept at the start only)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(SHAPES_MODEL / "tokenizer.json"))
    vision = json.loads((SHAPES_MODEL / "config.json").read_text())["vision_config"]
    image_tokens = (vision["image_size"] // vision["patch_size"] // 2) ** 2

    def count(system: str, turns: list[tuple[str, str]], image: bool = True) -> int:
        text = system + " "
        for i, (role, said) in enumerate(turns):
            if role == "user":
                text += "USER: " + ("<image>\n" if i == 0 and image else "") + said + " "
            else:
                text += "ASSISTANT: " + said + "</s>"
        text += "ASSISTANT:"
        tokens = 0
        for k, segment in enumerate(text.split("</s>")):
            tokens += bool(k)  # the EOS before the segment
            for c, piece in enumerate(segment.split("<image>")):
                tokens += (image_tokens if c else 0) + len(tokenizer.encode(piece).ids) - (k > 0 or c > 0)
        return tokens

    return count


@pytest.fixture(scope="module")
def no_reuse(shapes_int4):
    """A session in this process on the same bundle with no prefix reuse: every prompt prefilled whole."""
    from mvlm_compile import Session

    with Session(shapes_int4, int4_activations="fp32", prefix_cache_mib=0) as session:
        assert session.prefix_cache_info() is None
        yield session


def test_a_conversation_reuses_its_earlier_turns(server, reference, count_prompt_tokens, no_reuse):
    """Three turns about the image through the openai client: turns 2 and 3 reuse the kept K/V of the
    turn before (its prompt and its answer's tokens, all but EOS, which is never fed back), answer
    what a session without reuse answers, and /metrics counts the reuse their usage reports."""
    client = server.client()
    image = data_url(IMAGE.read_bytes())
    questions = [QUESTION, "What shape is on the left?", "Where is the red shape?"]
    before = server.metrics()
    messages, turns, answers = [], [], []
    for n, question in enumerate(questions):
        if n == 0:
            content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]
        else:
            content = question
        messages.append({"role": "user", "content": content})
        turns.append(("user", question))
        if n < 2:
            answer = client.chat.completions.create(model=MODEL, messages=messages)
            text, usage = answer.choices[0].message.content, answer.usage
        else:  # the last turn streamed: its usage chunk reports the cached tokens too
            stream = client.chat.completions.create(
                model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
            )
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        assert usage.prompt_tokens == count_prompt_tokens(SYSTEM_V1, turns)
        expected = no_reuse.chat([{"role": r, "content": t} for r, t in turns], IMAGE)
        assert text == expected.text and usage.completion_tokens == expected.completion_tokens
        answers.append(usage)
        # The assistant's turn as text parts (n == 0) or a string.
        said = [{"type": "text", "text": text}] if n == 0 else text
        messages.append({"role": "assistant", "content": said})
        turns.append(("assistant", text))
    assert answers[0].completion_tokens == reference["completion_tokens"]
    for earlier, later in zip(answers, answers[1:]):
        assert later.prompt_tokens_details.cached_tokens == earlier.prompt_tokens + earlier.completion_tokens
    after = server.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    cached = [usage.prompt_tokens_details.cached_tokens for usage in answers]
    assert grew("mvlm_prefix_cache_hits_total") == sum(1 for c in cached if c)
    assert grew("mvlm_prefix_cache_reused_tokens_total") == sum(cached)
    prompts = sum(usage.prompt_tokens for usage in answers)
    assert grew("mvlm_prefill_tokens_total") == prompts - sum(cached)
    # The default pool holds one sequence at the model's context, in pages of 16 positions; the last
    # turn's sequence (its prompt and answer, the turns before sharing its pages) is kept whole.
    context = json.loads((SHAPES_MODEL / "config.json").read_text())["max_position_embeddings"]
    assert after["mvlm_prefix_cache_pages"] == context // 16
    kept = answers[-1].prompt_tokens + answers[-1].completion_tokens
    assert math.ceil(kept / 16) <= after["mvlm_prefix_cache_pages_used"] <= context // 16


def test_a_system_message_replaces_the_templates(server, reference, count_prompt_tokens, no_reuse):
    system = "Answer briefly."
    messages = [{"role": "system", "content": system}, *ask()]
    answer = server.client().chat.completions.create(model=MODEL, messages=messages)
    assert answer.usage.prompt_tokens == count_prompt_tokens(system, [("user", QUESTION)])
    assert answer.usage.prompt_tokens != reference["prompt_tokens"]
    expected = no_reuse.chat([{"role": "system", "content": system}, {"role": "user", "content": QUESTION}], IMAGE)
    assert answer.choices[0].message.content == expected.text
    # "developer" is OpenAI's newer name for the system role.
    developer = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": system}, *ask()]
    )
    assert developer.choices[0].message.content == expected.text
    assert developer.usage.prompt_tokens == answer.usage.prompt_tokens


def test_a_text_only_conversation_is_answered(server, count_prompt_tokens, no_reuse):
    question = "How many shapes are there?"
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 8},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == count_prompt_tokens(SYSTEM_V1, [("user", question)], image=False)
    expected = no_reuse.chat([{"role": "user", "content": question}], max_tokens=8)
    assert r.json()["choices"][0]["message"]["content"] == expected.text
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts) if len(parts) > 1 or not isinstance(parts[0], str) else parts[0]}


def assistant(content="A star.") -> dict:
    return {"role": "assistant", "content": content}


TEXT = {"type": "text", "text": QUESTION}
GOOD_IMAGE = {"type": "image_url", "image_url": {"url": data_url(IMAGE.read_bytes())}}
# name -> (messages, the error's param, words its message must hold)
BAD_CONVERSATIONS = {
    "two user turns in a row": ([user(TEXT, GOOD_IMAGE), user("And?")], "messages[1]", "a user turn after a user"),
    "an assistant turn first": ([assistant(), user(TEXT, GOOD_IMAGE)], "messages[0]", "an assistant turn first"),
    "an assistant turn last": ([user(TEXT, GOOD_IMAGE), assistant()], "messages[1]", "ends with an assistant turn"),
    "a system message not first": (
        [user(TEXT, GOOD_IMAGE), assistant(), {"role": "system", "content": "Be brief."}, user("And?")],
        "messages[2]",
        "expected it first",
    ),
    "an image in a later turn": (
        [user("Hello."), assistant("Hello."), user(TEXT, GOOD_IMAGE)],
        "messages[2].content[1]",
        "the image in the first user turn",
    ),
    "two images": ([user(TEXT, GOOD_IMAGE, GOOD_IMAGE)], "messages[0].content[2]", "at most one image"),
    "an image in an assistant turn": (
        [user(TEXT, GOOD_IMAGE), assistant([{"type": "text", "text": "A star."}, GOOD_IMAGE]), user("And?")],
        "messages[1].content[1]",
        "an image in an assistant message",
    ),
    "an image in the system message": (
        [{"role": "system", "content": [GOOD_IMAGE]}, user(TEXT)],
        "messages[0].content[0]",
        "the image in the first user turn",
    ),
    "a tool message": (
        [user(TEXT, GOOD_IMAGE), {"role": "tool", "content": "42", "tool_call_id": "x"}],
        "messages[1].role",
        "'tool'",
    ),
    "a function message": (
        [user(TEXT, GOOD_IMAGE), {"role": "function", "content": "42", "name": "f"}],
        "messages[1].role",
        "'function'",
    ),
    "an audio part": (
        [user(TEXT, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})],
        "messages[0].content[1].type",
        "'input_audio'",
    ),
    "a refusal part in an assistant turn": (
        [user(TEXT, GOOD_IMAGE), assistant([{"type": "refusal", "refusal": "No."}]), user("And?")],
        "messages[1].content[0].type",
        "expected 'text'",
    ),
    "an empty user turn": ([user(TEXT, GOOD_IMAGE), assistant(), user("  ")], "messages[2].content", "empty"),
    "an empty assistant turn": ([user(TEXT, GOOD_IMAGE), assistant(""), user("And?")], "messages[1].content", "empty"),
    "an assistant turn without content": (
        [user(TEXT, GOOD_IMAGE), assistant(None), user("And?")],
        "messages[1].content",
        "empty",
    ),
    "only a system message": ([{"role": "system", "content": "Be brief."}], "messages", "no user turn"),
    "the template's image token in a turn": (
        [user(TEXT, GOOD_IMAGE), assistant("<image>"), user("And?")],
        "messages[1].content",
        "<image>",
    ),
    # Each turn fits; together (with the image's tokens) they leave no room in the context.
    "a conversation longer than the context": (
        [user(TEXT, GOOD_IMAGE), assistant("word " * 40), user("word " * 40)],
        "messages",
        "exceed the context",
    ),
}


@pytest.mark.parametrize("name", BAD_CONVERSATIONS)
def test_bad_conversations_get_openai_errors(server, name):
    messages, param, says = BAD_CONVERSATIONS[name]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}") and says in error["message"], error


@pytest.mark.parametrize(
    "said, max_tokens_given, param, message",
    [
        ("messages[3].content: is empty; expected the user's text", False, "messages[3].content", None),
        ("messages[2]: a user turn after a user turn; expected ...", False, "messages[2]", None),
        (
            "messages: 600 prompt tokens (with the image) + --max-new-tokens 128 exceed the context of 512 (x)",
            False,
            "messages",
            "messages: 600 prompt tokens (with the image) + max_tokens 128 exceed the context of 512 (x)",
        ),
        (
            "messages: 400 prompt tokens (with the image) + --max-new-tokens 200 exceed the context",
            True,
            "max_tokens",
            "messages: 400 prompt tokens (with the image) + max_tokens 200 exceed",
        ),
        ("--temperature -1: expected 0 (greedy) or 0.01 to 100", False, "temperature", "temperature -1: expected"),
        (
            "image: not an image (x)",
            False,
            "messages[0].content[1].image_url.url",
            "messages[0].content[1].image_url.url:",
        ),
    ],
)
def test_session_errors_name_the_requests_field(said, max_tokens_given, param, message):
    from mvlm_compile.errors import MvlmError
    from mvlm_compile.serve.errors import from_session_error

    error = from_session_error(MvlmError(said), "messages[0].content[1].image_url.url", max_tokens_given)
    assert (error.status, error.param) == (400, param)
    assert error.message.startswith(message or said) and "--" not in error.message


def test_the_openai_client_reads_a_conversation_error(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=[user(TEXT, GOOD_IMAGE), assistant()])
    assert e.value.param == "messages[1]" and "ends with an assistant turn" in e.value.message


# Bad input -------------------------------------------------------------------------------------


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: side * side * 3 bytes and more."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def body(**changes) -> dict:
    return {"model": MODEL, "messages": ask(), **changes}


BAD_REQUESTS = {
    "bad base64": (body(messages=ask(url="data:image/png;base64,@@not base64@@")), 400, "image_url.url"),
    "not an image": (body(messages=ask(url=data_url(b"GIF? no, plain text"))), 400, "image_url.url"),
    "not an image media type": (body(messages=ask(url=data_url(b"x", "text/plain"))), 400, "image_url.url"),
    "image too large": (body(messages=ask(url=data_url(noise_png(640)))), 400, "image_url.url"),
    "remote image refused": (body(messages=ask(url="http://127.0.0.1:9/image.png")), 400, "image_url.url"),
    "max_tokens 0": (body(max_tokens=0), 400, "max_tokens"),
    "max_tokens beyond the context": (body(max_tokens=400), 400, "max_tokens"),
    "prompt beyond the context": (body(messages=ask("word " * 400)), 400, "messages"),
    "temperature out of range": (body(temperature=-1), 400, "temperature"),
    "top_p 0": (body(top_p=0), 400, "top_p"),
    "unknown model": (body(model="gpt-4o"), 404, "model"),
    "no question": (body(messages=[{"role": "user", "content": [GOOD_IMAGE]}]), 400, "messages[0].content"),
    "image part without url": (
        body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]),
        400,
        "messages[0].content[1].image_url",
    ),
    "no messages": (body(messages=[]), 400, "messages"),
    "messages not a list": (body(messages="hi"), 400, "messages"),
    "n > 1": (body(n=2), 400, "n"),
    "not an object": ([1, 2], 400, None),
    "stream not a boolean": (body(stream="yes"), 400, "stream"),
    "max_tokens not an integer": (body(max_tokens="5"), 400, "max_tokens"),
    "temperature not a number": (body(temperature="0"), 400, "temperature"),
    "a question that cannot fit": (body(messages=ask("x" * 1_500_000)), 400, "messages"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, name):
    document, status, param = BAD_REQUESTS[name]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=document, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or (param and error["param"].endswith(param)), error
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    "content, headers, status",
    [
        (b'{"model": "tiny-shapes", "messages": [', {"content-type": "application/json"}, 400),  # malformed JSON
        (b"\xff\xfe", {"content-type": "application/json"}, 400),
        (b"model=tiny-shapes", {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b"{}", {}, 415),
        (b"[" * 100_000, {"content-type": "application/json"}, 400),  # nested deeper than the parser goes
        (b'{"model": "tiny-shapes", "tools": ' + b"[" * 100_000, {"content-type": "application/json"}, 400),
    ],
)
def test_malformed_bodies(server, content, headers, status):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_paths_and_methods_are_json_errors(server):
    assert httpx.get(f"{server.url}/v1/completions").json()["error"]["message"].endswith("Not Found")
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="nope", messages=ask())
    assert e.value.code == "model_not_found"


def raw_request(port: int, head: str, body: bytes) -> bytes:
    """Send a request's head and part of its body; what the server answers, without sending the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_oversize_body_is_refused_before_it_is_read(server):
    """A declared 1 GB body: 413 after 1 KiB of it, the rest never sent."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {10**9}\r\n\r\n"
    )
    answer = raw_request(server.port, head, b"{" + b" " * 1023)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"--max-body-bytes" in answer
    # Chunked (no length declared): refused once what came exceeds the limit.
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    size = MAX_BODY + 4096
    answer = raw_request(server.port, head, f"{size:x}\r\n".encode() + b" " * size + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_host_must_be_this_server_without_an_api_key(server):
    """A page whose name was rebound to 127.0.0.1 sends its own name as Host: refused without a key."""
    rebound = httpx.get(f"{server.url}/v1/models", headers={"Host": f"attacker.example:{server.port}"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert "--allowed-host" in rebound.json()["error"]["message"]
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "LOCALHOST"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": host}).status_code == 200, host
    assert httpx.get(f"{server.url}/health", headers={"Host": "attacker.example"}).status_code == 200  # probes


def test_slow_clients_are_disconnected(server):
    """Connections that trickle their request head (or send nothing) are closed after --header-timeout."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    connections = [socket.create_connection(("127.0.0.1", server.port), timeout=1) for _ in range(4)]
    closed_after = {}
    started = time.monotonic()
    while len(closed_after) < len(connections) and time.monotonic() - started < 6 * HEADER_TIMEOUT:
        for i, s in enumerate(connections):
            if i in closed_after:
                continue
            if i:  # all but the first send a byte of their head every 0.2 s, the first sends nothing
                with contextlib.suppress(OSError):
                    s.sendall(head[: int((time.monotonic() - started) * 5) % len(head)][-1:] or b"P")
            s.settimeout(0.05)
            try:
                if s.recv(1024) == b"":
                    closed_after[i] = time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:  # reset by the server
                closed_after[i] = time.monotonic() - started
    for s in connections:
        s.close()
    assert sorted(closed_after) == list(range(len(connections))), closed_after
    assert all(t >= HEADER_TIMEOUT - 0.1 for t in closed_after.values()), closed_after
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_body_that_does_not_arrive_frees_its_place(server):
    """Admitted, then a body that stops after 10 of 1000 bytes: 408 after --body-timeout, the queue empty."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    answer = raw_request(server.port, head, b'{"model": ')
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"--body-timeout" in answer
    assert server.metrics()["mvlm_queue_depth"] == 0


def vm_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0])


def test_a_burst_of_the_largest_requests_stays_within_the_memory_bound(server):
    """24 at once, each a body of --max-body-bytes holding the largest image there is to decode
    (7071x7071 pixels in a 50 KB PNG): the server's peak memory grows by at most serve's stated bound."""
    from mvlm_compile.model.preprocess import MAX_IMAGE_PIXELS
    from mvlm_compile.serve.app import ServeOptions, memory_bound

    side = math.isqrt(MAX_IMAGE_PIXELS)
    picture = Image.new("P", (side, side))
    picture.putpalette(list(range(256)) * 3)
    encoded = io.BytesIO()
    picture.save(encoded, "PNG")
    request = body(messages=ask(url=data_url(encoded.getvalue())), max_tokens=1)
    request["padding"] = "x" * (MAX_BODY - len(json.dumps(request)) - 64)  # an unknown field, ignored
    content = json.dumps(request).encode()
    assert MAX_BODY - 100 < len(content) <= MAX_BODY

    def post(_: int) -> int | str:
        try:
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                content=content,
                headers={"Content-Type": "application/json"},
                timeout=120,
            )
            return r.status_code
        except httpx.TransportError:  # refused with 429 before its body was read, the rest unsent
            return "closed"

    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from what is resident
    before = vm_kib(pid, "VmRSS") * 1024
    burst = 24
    with ThreadPoolExecutor(burst) as pool:
        statuses = list(pool.map(post, range(burst)))
    grown = vm_kib(pid, "VmHWM") * 1024 - before
    options = ServeOptions(Path("."), max_queue=8, max_body_bytes=MAX_BODY, max_image_bytes=MAX_IMAGE)
    bound = memory_bound(options, connections=burst, slots=4)  # the session's default for artifacts
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 429, "closed"}, statuses
    assert grown <= bound, f"grew by {grown / 2**20:.0f} MiB; the bound is {bound / 2**20:.0f} MiB"
    assert httpx.get(f"{server.url}/health").status_code == 200


# Hanging up, queueing, stopping ----------------------------------------------------------------


def test_hang_up_mid_stream_frees_the_engine(server, long_seed, reference):
    before = server.metrics()
    request = body(stream=True, seed=long_seed, **LONG)
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/chat/completions", json=request) as r:
        first_content(r.iter_lines())
    # Hung up after the first piece: the generation is cancelled long before its 300 tokens.
    deadline = time.monotonic() + 10
    while (after := server.metrics()).get('mvlm_generations_total{finish_reason="cancelled"}', 0) == before.get(
        'mvlm_generations_total{finish_reason="cancelled"}', 0
    ):
        assert time.monotonic() < deadline, "the hung-up generation was never cancelled"
        time.sleep(0.02)
    assert after["mvlm_completion_tokens_total"] - before["mvlm_completion_tokens_total"] < LONG["max_tokens"]
    assert after["mvlm_requests_running"] == 0 and after["mvlm_queue_depth"] == 0
    started = time.monotonic()
    answer = server.client().chat.completions.create(model=MODEL, messages=ask())
    assert answer.choices[0].message.content == reference["text"]
    assert time.monotonic() - started < 10


def test_api_key(guarded):
    no_key = httpx.get(f"{guarded.url}/v1/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    assert [m.id for m in guarded.client(api_key=API_KEY).models.list().data] == [MODEL]
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200


@contextlib.contextmanager
def the_only_slot_taken(guarded, long_seed):
    """`guarded` (--max-batch 1 --max-queue 0) streaming a long answer in its only slot; on leaving,
    that answer must have ended unharmed."""
    request = body(stream=True, seed=long_seed, **LONG)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60, headers=headers) as http:
        with http.stream("POST", f"{guarded.url}/v1/chat/completions", json=request) as r:
            lines = r.iter_lines()
            first_content(lines)
            yield
            assert [line for line in lines if line][-1] == "data: [DONE]"


def test_full_queue_is_429(guarded, long_seed, reference):
    """--max-batch 1 --max-queue 0: while one answer streams in the only slot, the next request is refused at once."""
    client = guarded.client(api_key=API_KEY)
    with the_only_slot_taken(guarded, long_seed):
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=ask())
        assert refused.value.code == "queue_full" and refused.value.response.headers["retry-after"] == "1"
    assert client.chat.completions.create(model=MODEL, messages=ask()).choices[0].message.content == reference["text"]


def test_a_full_queue_refuses_before_reading_the_body(guarded, long_seed):
    """--max-queue 0: while one answer streams, a request declaring a 10 MB body gets 429 after its head."""
    with the_only_slot_taken(guarded, long_seed):
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {10**7}\r\n\r\n"
        )
        answer = raw_request(guarded.port, head, b"{")
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]


def test_the_api_key_may_come_from_a_file_or_the_environment_only(shapes_int4, tmp_path):
    """Not both: a key given twice is a usage error (exit 2) before anything loads."""
    import os

    key_file = tmp_path / "key"
    key_file.write_text("")
    port = str(free_ports()[0])
    for args, env, says in [
        (["--api-key-file", str(key_file)], {}, "empty"),
        (["--api-key-file", str(tmp_path)], {}, "not a regular file"),
        (["--api-key-file", str(key_file)], {"MVLM_API_KEY": "k"}, "give the key once"),
    ]:
        done = subprocess.run(
            cli_argv_without_torch(["serve", str(shapes_int4), "--port", port, *args]),
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: --api-key-file") and says in done.stderr


@pytest.fixture
def image_site(tmp_path):
    """A local http.server on 127.0.0.1 serving the golden image and one too large for --max-image-bytes."""
    (tmp_path / "image.png").write_bytes(IMAGE.read_bytes())
    (tmp_path / "large.png").write_bytes(noise_png(2048))  # > the 10 MiB default
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    site.handle_error = lambda request, address: None  # the server under test hangs up on the large one
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_remote_images_when_allowed(guarded, image_site, reference):
    client = guarded.client(api_key=API_KEY)
    answer = client.chat.completions.create(model=MODEL, messages=ask(url=f"{image_site}/image.png"))
    assert answer.choices[0].message.content == reference["text"]
    for path, says in [("missing.png", "HTTP 404"), ("large.png", "larger than")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ask(url=f"{image_site}/{path}"))
        assert says in e.value.message


def test_sigterm_drains_then_exits_0(guarded, long_seed):
    """SIGTERM while a long answer streams: it runs to its end, new connections are refused, exit status 0."""
    request = body(stream=True, seed=long_seed, stream_options={"include_usage": True}, **LONG)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60, headers=headers) as http:
        with http.stream("POST", f"{guarded.url}/v1/chat/completions", json=request) as r:
            lines = r.iter_lines()
            first_content(lines)
            stopped_at = time.monotonic()
            guarded.process.send_signal(signal.SIGTERM)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]
    assert guarded.process.wait(30) == 0, "".join(guarded.log)
    assert time.monotonic() - stopped_at < 15
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{guarded.url}/health")


def test_a_bundle_that_does_not_load_exits_2(shapes_int4, tmp_path):
    """Refused before listening (no bundle there), or once loading fails (a damaged graph): exit 2."""
    import shutil

    damaged = Path(shutil.copytree(shapes_int4, tmp_path / "damaged", ignore=shutil.ignore_patterns("*.lock")))
    (damaged / "decoder.onnx").write_bytes(b"not the graph the manifest describes")
    for bundle, says in [(tmp_path / "missing", "neither a bundle"), (damaged, "decoder.onnx")]:
        done = subprocess.run(
            cli_argv_without_torch(["serve", str(bundle), "--port", str(free_ports()[0])]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {bundle}") and says in last, done.stderr
