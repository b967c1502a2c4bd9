"""`mvlm-compile chat` on the embedded shapes model's deployed form (conftest's shapes_int4).

Every expected answer is computed here, independently of the command, by a Session's conversation
with prefix reuse off (`prefix_cache_mib=0`: each turn prefilled from scratch), so the command's
answers (its session keeps the turns' K/V) are checked against the model's plain answers. The loop
itself (mvlm_compile/chat_repl.py) is driven with a reader and a writer where a terminal cannot be:
Ctrl-C raised where a stream is read, or a real SIGINT while an answer stops."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import GOLDEN_SHAPES, SHAPES_MODEL, cli_argv_without_torch

from mvlm_compile import Session
from mvlm_compile.chat_repl import ChatRepl
from mvlm_compile.cli import cli
from mvlm_compile.errors import MvlmError

IMAGE = GOLDEN_SHAPES / "image.png"  # a yellow star at the top, a red circle on the left, a blue square on the right
DESCRIBE = "Describe the image in one sentence."
HOW_MANY = "How many shapes are there?"
LEFT = "What shape is on the left?"
MAX_NEW_TOKENS = 128  # the command's default
CONTEXT = json.loads((SHAPES_MODEL / "config.json").read_text())["max_position_embeddings"]


@pytest.fixture(scope="module")
def reference(shapes_int4):
    """The model's answers with no prefix reuse: what every turn of the command must equal."""
    with Session(shapes_int4, max_batch=1, prefix_cache_mib=0) as session:
        yield session


def answers(session: Session, image, questions: list[str], max_tokens: int = MAX_NEW_TOKENS, system=None) -> list:
    """Each question's Generation, asked in turn in one conversation."""
    chat = session.conversation(image=image, system=system)
    return [chat.ask(question, max_tokens=max_tokens) for question in questions]


@pytest.fixture(scope="module")
def other_image(tmp_path_factory) -> Path:
    """A second scene of the task (one orange triangle), as a PNG file."""
    from mvlm_compile.tinytask.dataset import eval_item
    from mvlm_compile.tinytask.scenes import draw_scene

    path = tmp_path_factory.mktemp("chat") / "other.png"
    draw_scene(eval_item(2).scene()).save(path)
    return path


def chat(shapes_int4, *options: str, lines: list[str]):
    """The command through click, its stdin the lines (not a terminal: a script's)."""
    text = "".join(f"{line}\n" for line in lines)
    return CliRunner().invoke(cli, ["chat", str(shapes_int4), *options], input=text)


# -- the command, fed by a script --


def test_a_piped_conversation_answers_as_the_session_does(shapes_int4, reference):
    """Three turns through the installed command's code in a subprocess (without torch, as on a
    Jetson): stdout is the three answers, one a line; the end of the input leaves with status 0."""
    questions = [DESCRIBE, HOW_MANY, LEFT]
    expected = [g.text for g in answers(reference, IMAGE, questions)]
    result = subprocess.run(
        cli_argv_without_torch(["chat", str(shapes_int4), "--image", str(IMAGE)]),
        input="".join(f"{q}\n" for q in questions),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
    assert "tiny-shapes" in result.stderr and str(IMAGE) in result.stderr  # the banner, on stderr


@pytest.mark.parametrize("prefix_cache_mib", [None, "0"])
def test_json_lines_count_the_tokens_and_the_kept_turns(shapes_int4, reference, prefix_cache_mib):
    questions = [DESCRIBE, HOW_MANY, LEFT]
    expected = answers(reference, IMAGE, questions)
    options = ["--image", str(IMAGE), "--json"]
    if prefix_cache_mib is not None:
        options += ["--prefix-cache-mib", prefix_cache_mib]
    result = chat(shapes_int4, *options, lines=questions)
    assert result.exit_code == 0, result.output
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(t["question"], t["answer"]) for t in turns] == [(q, g.text) for q, g in zip(questions, expected)]
    assert [(t["prompt_tokens"], t["completion_tokens"], t["finish_reason"]) for t in turns] == [
        (g.prompt_tokens, g.completion_tokens, "stop") for g in expected
    ]
    assert all(0 <= t["time_to_first_token_s"] <= t["seconds"] for t in turns)
    cached = [t["cached_tokens"] for t in turns]
    if prefix_cache_mib == "0":
        assert cached == [0, 0, 0]
    else:  # each turn prefills little more than its question: the turn before was kept, prompt and answer
        assert cached[0] == 0
        for before, turn in zip(expected, expected[1:]):
            assert before.prompt_tokens + before.completion_tokens <= turn.prompt_tokens
        assert all(
            before.prompt_tokens <= kept < turn.prompt_tokens
            for before, turn, kept in zip(expected, expected[1:], cached[1:])
        )


def test_system_prompt_replaces_the_templates(shapes_int4, reference):
    system = "You are a careful assistant that counts shapes."
    expected = [g.text for g in answers(reference, IMAGE, [HOW_MANY, LEFT], system=system)]
    result = chat(shapes_int4, "--image", str(IMAGE), "--system", system, lines=[HOW_MANY, LEFT])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == expected


def test_reset_forgets_the_turns_and_image_starts_a_conversation_about_another(shapes_int4, reference, other_image):
    first, second = answers(reference, IMAGE, [DESCRIBE, HOW_MANY])
    (fresh,) = answers(reference, IMAGE, [HOW_MANY])  # the turn after /reset answers as a first turn
    (about_other,) = answers(reference, other_image, [HOW_MANY])
    assert about_other.text != fresh.text  # the images differ in what is asked: the check below means something
    assert fresh.prompt_tokens < second.prompt_tokens  # and a first turn is told from a second by its prompt
    lines = [DESCRIBE, HOW_MANY, "/reset", HOW_MANY, f"/image {other_image}", HOW_MANY, "/exit", DESCRIBE]
    result = chat(shapes_int4, "--image", str(IMAGE), "--json", lines=lines)
    assert result.exit_code == 0, result.output
    turns = [json.loads(line) for line in result.stdout.splitlines()]  # none after /exit
    assert [(t["answer"], t["prompt_tokens"]) for t in turns] == [
        (g.text, g.prompt_tokens) for g in (first, second, fresh, about_other)
    ]
    assert "[new conversation: the turns so far are forgotten; the image stays]" in result.stderr
    assert f"[new conversation about {other_image} (the image goes in the first turn" in result.stderr


def test_exit_and_the_end_of_the_input_leave_with_status_0(shapes_int4, reference):
    (answer,) = answers(reference, IMAGE, [HOW_MANY])
    result = chat(shapes_int4, "--image", str(IMAGE), lines=[HOW_MANY, "/exit", LEFT])
    assert (result.exit_code, result.stdout) == (0, f"{answer.text}\n")
    result = chat(shapes_int4, "--image", str(IMAGE), lines=[])
    assert (result.exit_code, result.stdout) == (0, "")
    result = chat(shapes_int4, "--image", str(IMAGE), lines=["", "   ", HOW_MANY])  # blank lines are skipped
    assert (result.exit_code, result.stdout) == (0, f"{answer.text}\n")


@pytest.mark.parametrize("kind", ["missing", "text", "directory"])
def test_a_bad_image_file_exits_2_naming_it(shapes_int4, reference, tmp_path, kind):
    bad = tmp_path / {"missing": "missing.png", "text": "notes.png", "directory": "folder"}[kind]
    if kind == "text":
        bad.write_text("these are notes, not a picture\n")
    elif kind == "directory":
        bad.mkdir()
    (answer,) = answers(reference, IMAGE, [HOW_MANY])
    result = chat(shapes_int4, "--image", str(IMAGE), lines=[HOW_MANY, f"/image {bad}", LEFT])
    assert result.exit_code == 2, result.output
    assert result.stdout == f"{answer.text}\n"  # the answer before; none after the bad line
    (error,) = result.stderr.strip().splitlines()[-1:]
    assert error.startswith(f"error: input line 2: {bad}: ")
    # At start-up a bad --image fails before the bundle is opened (here: there is none), naming the file.
    result = chat(tmp_path / "no-bundle", "--image", str(bad), lines=[HOW_MANY])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {bad}: ")


def test_a_conversation_longer_than_the_context_exits_2_naming_the_context(shapes_int4, reference):
    """With 300 new tokens allowed per answer, the conversation outgrows the model's context within
    a few turns: the turns that fit are answered, then the error names the context."""
    max_new, questions = 300, [HOW_MANY, LEFT, DESCRIBE, HOW_MANY, LEFT]
    conversation, fitted = reference.conversation(image=IMAGE), []
    for question in questions:
        try:
            fitted.append(conversation.ask(question, max_tokens=max_new).text)
        except MvlmError:
            break
    assert 0 < len(fitted) < len(questions)
    result = chat(shapes_int4, "--image", str(IMAGE), "--max-new-tokens", str(max_new), lines=questions)
    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines() == fitted
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: input line {len(fitted) + 1}: ")
    assert f"--max-new-tokens {max_new} exceed the context of {CONTEXT}" in error


@pytest.mark.parametrize(
    "line, message",
    [
        ("/frob", "/frob: unknown command; the commands are /image FILE, /reset, /help, /exit"),
        ("/image", "/image: name the image file: /image FILE"),
        ("/reset everything", "/reset: takes no argument"),
    ],
)
def test_a_bad_command_from_a_script_exits_2(shapes_int4, line, message):
    result = chat(shapes_int4, "--image", str(IMAGE), lines=[line, HOW_MANY])
    assert result.exit_code == 2 and result.stdout == ""
    assert f"error: input line 1: {message}" in result.stderr


def test_a_line_that_is_not_text_is_refused_alone(shapes_int4, reference):
    """Bytes that are not UTF-8 fail their own line (status 2 from a script), not the lines before."""
    (answer,) = answers(reference, IMAGE, [HOW_MANY])
    stdin = HOW_MANY.encode() + b"\n\xff\xfe shapes?\n"
    result = CliRunner().invoke(cli, ["chat", str(shapes_int4), "--image", str(IMAGE)], input=stdin)
    assert (result.exit_code, result.stdout) == (2, f"{answer.text}\n")
    assert result.stderr.strip().splitlines()[-1].startswith("error: input line 2: ")
    assert "not valid UTF-8" in result.stderr


def test_bad_sampling_options_fail_before_the_bundle_is_opened(tmp_path):
    result = chat(tmp_path / "no-bundle", "--temperature", "-1", lines=[HOW_MANY])
    assert result.exit_code == 2 and result.stderr.startswith("error: --temperature -1.0: ")
    result = chat(tmp_path / "no-bundle", "--max-new-tokens", "0", lines=[HOW_MANY])
    assert result.exit_code == 2 and "--max-new-tokens" in result.stderr


# -- the loop, as at a terminal --


@pytest.fixture(scope="module")
def session(shapes_int4):
    """The command's session: one slot, the turns' K/V kept (the default prefix cache)."""
    with Session(shapes_int4, max_batch=1) as s:
        yield s


class StepGate:
    """While armed, holds the session's scheduler after a decode step until released, so that a
    Ctrl-C lands on an answer still being made (the shapes model answers in milliseconds)."""

    def __init__(self, session: Session) -> None:
        self.armed, self.released = False, threading.Event()
        session.add_step_listener(self._after_step)

    def _after_step(self, info) -> None:
        if self.armed and info.decode_rows:
            self.released.wait(timeout=30)

    def arm(self) -> None:
        self.released.clear()
        self.armed = True

    def release(self) -> None:
        self.armed = False
        self.released.set()

    def run(self, loop) -> None:
        """`loop.run()` with the scheduler held after each decode step until released (never left held)."""
        self.arm()
        try:
            loop.run()
        finally:
            self.release()


@pytest.fixture(scope="module")
def gate(session) -> StepGate:
    return StepGate(session)


class Unfinished:
    """A generation that shows no finish_reason for 10 s: a stop that has not taken effect yet."""

    def __init__(self, generation) -> None:
        self.generation, self.until = generation, time.monotonic() + 10

    def __getattr__(self, name: str):
        if name == "finish_reason" and time.monotonic() < self.until:
            return None
        return getattr(self.generation, name)


class CtrlCStream:
    """A stream whose reader gets Ctrl-C (KeyboardInterrupt) after `pieces` pieces, where the real
    one raises it: while waiting for the next piece. `on_cancel` runs when the loop cancels it."""

    def __init__(self, stream, pieces: int, on_cancel, unfinished: bool = False) -> None:
        self.stream, self.left, self.on_cancel = stream, pieces, on_cancel
        self.generation = Unfinished(stream.generation) if unfinished else stream.generation

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return next(self.stream)

    def cancel(self) -> None:
        self.stream.cancel()
        self.on_cancel()

    def wait(self, timeout=None):
        """The real wait, held while the generation shows unfinished (a stop not in effect yet)."""
        while self.generation.finish_reason is None:
            time.sleep(0.005)
        return self.stream.wait(timeout)


class CtrlCConversation:
    """A conversation whose first streamed answer is interrupted (CtrlCStream, its generation
    `unfinished` for a while); or, with `while_asking`, Ctrl-C comes while the question is being
    submitted (a real SIGINT)."""

    def __init__(self, conversation, on_cancel, pieces=1, while_asking=False, unfinished=False) -> None:
        self.conversation, self.on_cancel, self.pieces = conversation, on_cancel, pieces
        self.while_asking, self.unfinished, self.interrupted = while_asking, unfinished, False

    def __getattr__(self, name):
        return getattr(self.conversation, name)

    def ask(self, text, stream=False, **options):
        first, self.interrupted = not self.interrupted, True
        if first and self.while_asking:
            signal.raise_signal(signal.SIGINT)
        answer = self.conversation.ask(text, stream=stream, **options)
        if first and not self.while_asking:
            return CtrlCStream(answer, self.pieces, self.on_cancel, self.unfinished)
        if first:
            cancel = answer.cancel

            def cancel_then_release() -> None:
                cancel()
                self.on_cancel()

            answer.cancel = cancel_then_release
        return answer


def reader(lines: list):
    """A line reader over `lines`; an exception in them is raised when its turn comes (Ctrl-C at the prompt)."""
    items = iter(lines)

    def read_line():
        item = next(items, None)
        if isinstance(item, BaseException):
            raise item
        return item

    return read_line


def repl(conversation, lines: list, interactive: bool = True, **options):
    out: list[str] = []
    notes: list[str] = []
    loop = ChatRepl(
        conversation,
        reader(lines),
        out.append,
        notes.append,
        interactive=interactive,
        options={"max_tokens": MAX_NEW_TOKENS, **options},
    )
    return loop, out, notes


def needs_python_sigint_handler():
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's KeyboardInterrupt here")


def test_at_a_terminal_a_bad_line_is_reported_and_the_conversation_goes_on(session, reference, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not a picture")
    expected = [g.text for g in answers(reference, IMAGE, [HOW_MANY, LEFT])]
    lines = [
        "/frob",
        HOW_MANY,
        f"/image {tmp_path / 'missing.png'}",
        f"/image {text_file}",
        "/reset now",
        "/help",
        LEFT,
    ]
    loop, out, notes = repl(session.conversation(image=IMAGE), lines)
    loop.run()
    assert "".join(out) == "".join(f"{a}\n" for a in expected)  # the bad lines changed nothing
    errors = [n for n in notes if n.startswith("error: ")]
    assert errors[0] == "error: /frob: unknown command; the commands are /image FILE, /reset, /help, /exit"
    assert errors[1] == f"error: {tmp_path / 'missing.png'}: image file not found"
    assert errors[2].startswith(f"error: {text_file}: not an image file")
    assert errors[3].startswith("error: /reset: takes no argument")
    assert len(errors) == 4 and any(n.startswith("commands: /image FILE") for n in notes)  # /help
    # The same lines from a script: the first bad one is raised, naming its line.
    loop, out, _ = repl(session.conversation(image=IMAGE), lines, interactive=False)
    with pytest.raises(MvlmError, match=r"^input line 1: /frob: unknown command"):
        loop.run()
    assert out == []


def test_at_a_terminal_a_conversation_too_long_for_the_context_goes_on_after_reset(session, reference):
    """Answers as long as the first turn leaves room for: the second turn's longer prompt cannot fit."""
    room = CONTEXT - reference.prompt_tokens([{"role": "user", "content": HOW_MANY}])
    (first,) = answers(reference, IMAGE, [HOW_MANY], max_tokens=room)
    (fresh,) = answers(reference, IMAGE, [LEFT], max_tokens=room)
    loop, out, notes = repl(session.conversation(image=IMAGE), [HOW_MANY, LEFT, "/reset", LEFT], max_tokens=room)
    loop.run()
    assert "".join(out) == f"{first.text}\n{fresh.text}\n"
    (error,) = [n for n in notes if n.startswith("error: ")]
    assert f"--max-new-tokens {room} exceed the context of {CONTEXT}" in error


def test_ctrl_c_at_the_prompt_leaves(session):
    conversation = session.conversation(image=IMAGE)
    loop, out, notes = repl(conversation, [HOW_MANY, KeyboardInterrupt(), LEFT])
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert len(loop.turns) == 1  # LEFT was never read
    assert [m["content"] for m in conversation.messages if m["role"] == "user"] == [HOW_MANY]
    assert notes[-1] == ""  # the terminal's next line starts clean


def test_ctrl_c_during_an_answer_stops_it_and_the_conversation_goes_on(session, reference, gate):
    (full,) = answers(reference, IMAGE, [DESCRIBE])
    conversation = CtrlCConversation(session.conversation(image=IMAGE), on_cancel=gate.release)
    loop, out, notes = repl(conversation, [DESCRIBE, HOW_MANY])
    gate.run(loop)
    stopped, after = loop.turns
    assert stopped.finish_reason == "cancelled" and after.finish_reason == "stop"
    assert stopped.answer and full.text.startswith(stopped.answer) and stopped.answer != full.text
    assert 0 < stopped.completion_tokens < full.completion_tokens
    assert "".join(out) == f"{stopped.answer}\n{after.answer}\n"  # what was kept is what was shown
    assert "[stopped]" in notes
    # The stopped answer's text is the assistant's turn, and the next answer follows from it.
    turns = [DESCRIBE, stopped.answer, HOW_MANY]
    messages = [{"role": role, "content": text} for role, text in zip(["user", "assistant", "user"], turns)]
    expected = reference.chat(messages, image=IMAGE, max_tokens=MAX_NEW_TOKENS)
    assert after.answer == expected.text
    assert conversation.messages[:3] == messages  # (the last answer joins them when the next turn starts)


def test_a_second_ctrl_c_while_the_answer_stops_leaves(session):
    """The second Ctrl-C, a real SIGINT, comes while the loop waits for the stopped answer to end
    (its generation shows it unfinished until then, as one between two decode steps does)."""
    needs_python_sigint_handler()

    def second_ctrl_c() -> None:
        main = threading.main_thread().ident
        threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT)).start()

    conversation = CtrlCConversation(session.conversation(image=IMAGE), on_cancel=second_ctrl_c, unfinished=True)
    loop, out, notes = repl(conversation, [DESCRIBE, HOW_MANY])
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert loop.turns == [] and notes[-1] == ""  # HOW_MANY was never asked


def test_ctrl_c_while_the_question_is_submitted_stops_its_answer(session, reference, gate):
    """A real SIGINT while `ask` runs is held until the stream is in hand, then stops the answer: it
    keeps what was decoded, or, if nothing was, the question is dropped as if never asked."""
    needs_python_sigint_handler()
    (full,) = answers(reference, IMAGE, [DESCRIBE])
    conversation = CtrlCConversation(session.conversation(image=IMAGE), on_cancel=gate.release, while_asking=True)
    loop, out, notes = repl(conversation, [DESCRIBE, HOW_MANY])
    gate.run(loop)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    stopped, after = loop.turns
    assert stopped.finish_reason == "cancelled" and full.text.startswith(stopped.answer)
    if stopped.answer:
        assert "[stopped]" in notes
        turns = [DESCRIBE, stopped.answer, HOW_MANY]
    else:
        assert "[stopped before the answer began: the question is dropped]" in notes
        turns = [HOW_MANY]
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    assert after.answer == reference.chat(messages, image=IMAGE, max_tokens=MAX_NEW_TOKENS).text
    assert conversation.messages[: len(messages)] == messages


# -- the command, at a real terminal and under a real SIGINT --


@pytest.mark.parametrize(
    "signum, message",
    [
        (signal.SIGINT, "interrupted: mvlm-compile chat"),
        (signal.SIGTERM, "interrupted: mvlm-compile chat (SIGTERM)"),  # leaves, where Ctrl-C would stop an answer
    ],
)
def test_a_signal_while_it_waits_for_a_line_from_a_pipe_exits_130(shapes_int4, reference, signum, message):
    (answer,) = answers(reference, IMAGE, [HOW_MANY])
    process = subprocess.Popen(
        cli_argv_without_torch(["chat", str(shapes_int4), "--image", str(IMAGE)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        process.stdin.write(f"{HOW_MANY}\n")
        process.stdin.flush()
        assert process.stdout.readline() == f"{answer.text}\n"  # answered: it reads the next line now
        process.send_signal(signum)
        assert process.wait(timeout=60) == 130
        assert process.stderr.read().strip().splitlines()[-1] == message
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_at_a_real_terminal_errors_go_on_and_ctrl_c_at_the_prompt_exits_130(shapes_int4, reference, tmp_path):
    """A pseudo-terminal: the prompt, the answers streamed, a missing /image reported and the
    conversation going on, then Ctrl-C typed at the prompt (the terminal sends SIGINT): status 130."""
    pty = pytest.importorskip("pty")
    first, second = (g.text for g in answers(reference, IMAGE, [HOW_MANY, LEFT]))
    argv = cli_argv_without_torch(["chat", str(shapes_int4), "--image", str(IMAGE)])
    # A plain terminal and no inputrc: readline's line editing, without escape sequences of its own.
    environment = {**os.environ, "TERM": "dumb", "INPUTRC": os.devnull}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, the pseudo-terminal its stdin, stdout and stderr
        try:
            os.execve(argv[0], argv, environment)
        finally:
            os._exit(127)
    screen = Terminal(fd)
    try:
        screen.wait_for_prompts(1)
        for count, line in enumerate([HOW_MANY, f"/image {tmp_path / 'missing.png'}", LEFT], start=2):
            screen.type(line + "\r")
            screen.wait_for_prompts(count)
        # Ctrl-C once it waits for a key: readline writes the prompt, then waits, and a SIGINT in between
        # (microseconds, but the moment the prompt appears) is only seen at the next key.
        time.sleep(0.3)
        screen.type("\x03")
        status = screen.wait_for_exit(pid)
    finally:
        screen.close(pid)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.text()).replace("\r\n", "\n")
    assert status == 130, text
    assert f"> {HOW_MANY}\n{first}\n> " in text and f"> {LEFT}\n{second}\n> " in text
    assert f"error: {tmp_path / 'missing.png'}: image file not found" in text
    assert "interrupted: mvlm-compile chat" in text


class Terminal:
    """The parent's side of a pseudo-terminal: what the child wrote, read as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.data = fd, b""

    def _read(self, seconds: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if ready:
            try:
                self.data += os.read(self.fd, 65536)
            except OSError:  # the child has gone: the terminal is closed
                pass

    def wait_for_prompts(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.data.count(b"> ") < count:
            assert time.monotonic() < deadline, self.text()
            self._read(0.05)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait_for_exit(self, pid: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self._read(0.2)
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"still running: {self.text()}")

    def text(self) -> str:
        return self.data.decode(errors="replace")

    def close(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)
