"""The conversation loop of `mvlm-compile chat`, apart from the terminal: it reads lines through a
reader, asks a Conversation (mvlm_compile.session) and writes the answers through a writer, so that
it runs the same under a test as at a terminal.

A line is a question, or a command:

    /image FILE   a new conversation about FILE (the image goes in the first user turn)
    /reset        forget the turns, keep the image
    /help         the commands
    /exit         leave (so does the end of the input, Ctrl-D)

Answers are written as they are decoded, then a newline (with `as_json`, one JSON line per turn
instead); everything else (the banner, notes, errors at a terminal) goes through `note`, which the
CLI sends to stderr, so that stdout holds the answers alone. Ctrl-C (KeyboardInterrupt) while an
answer streams stops it: its text so far stays as the assistant's turn. Ctrl-C at the prompt, or
again while an answer stops, leaves: the KeyboardInterrupt goes on to the caller (the CLI exits 130).
A bad line (an unknown command, an image that is not one, a conversation grown past the context) is
an MvlmError: `interactive` (a person at a terminal), it is noted and the conversation goes on;
otherwise (a script feeding lines) it is raised, naming the input line, and the CLI exits 2.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mvlm_compile.errors import Interrupted, MvlmError, collapse_whitespace

COMMANDS = (
    "/image FILE (a new conversation about FILE), /reset (forget the turns, keep the image), /help, "
    "/exit (or Ctrl-D); Ctrl-C stops an answer"
)


@dataclass(frozen=True)
class Turn:
    """One question and its answer, as `--json` prints them (times in seconds)."""

    question: str
    answer: str
    prompt_tokens: int  # the image's and the turns' before included
    cached_tokens: int  # prompt tokens whose K/V were kept from the turns before (not prefilled)
    completion_tokens: int
    finish_reason: str | None  # "stop", "length" or "cancelled" (Ctrl-C)
    time_to_first_token_s: float | None  # None: no text came
    seconds: float


class ChatRepl:
    """Lines from `read_line` (a line without its end, None at the end of the input) asked to
    `conversation` (Session.conversation) with `options` (max_tokens, temperature, top_p, seed,
    stop); answers through `write` (stdout), everything else through `note` (stderr, one line each)."""

    def __init__(
        self,
        conversation: Any,
        read_line: Callable[[], str | None],
        write: Callable[[str], None],
        note: Callable[[str], None],
        *,
        interactive: bool,
        options: Mapping[str, Any] | None = None,
        as_json: bool = False,
    ) -> None:
        self.conversation, self.read_line, self.write, self.note = conversation, read_line, write, note
        self.interactive, self.options, self.as_json = interactive, dict(options or {}), as_json
        self.turns: list[Turn] = []

    def banner(self, title: str, image: str | None) -> None:
        self.note(title)
        self.note(f"image: {image}" if image else "no image: text only (/image FILE to talk about one)")
        self.note(f"commands: {COMMANDS}")

    def run(self) -> None:
        """Until /exit or the end of the input. Raises KeyboardInterrupt (Ctrl-C at the prompt, or
        a second while an answer stops), and MvlmError for a bad line when not interactive."""
        try:
            self._loop()
        except KeyboardInterrupt:
            if self.interactive:
                self.note("")  # off the prompt's line, or the stopped answer's
            raise

    def _loop(self) -> None:
        number = 0
        while True:
            line = self.read_line()
            if line is None:
                if self.interactive:
                    self.note("")
                return
            number += 1
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if self._command(line) == "exit":
                        return
                else:
                    self.ask(line)
            except Interrupted:  # SIGTERM (the CLI's handler): leave
                raise
            except MvlmError as e:
                message = collapse_whitespace(e.format_message())
                if not self.interactive:
                    raise MvlmError(f"input line {number}: {message}") from None
                self.note(f"error: {message}")

    def _command(self, line: str) -> str | None:
        name, argument = (line.split(maxsplit=1) + [""])[:2]
        if name in ("/exit", "/reset", "/help") and argument:
            raise MvlmError(f"{name}: takes no argument (got {argument!r})")
        if name == "/exit":
            return "exit"
        if name == "/help":
            self.note(f"commands: {COMMANDS}")
        elif name == "/reset":
            self.conversation.reset()
            self.note("[new conversation: the turns so far are forgotten; the image stays]")
        elif name == "/image":
            if not argument:
                raise MvlmError("/image: name the image file: /image FILE")
            self.new_image(_unquote(argument))
        else:
            raise MvlmError(f"{name}: unknown command; the commands are /image FILE, /reset, /help, /exit")
        return None

    def new_image(self, name: str) -> None:
        """A new conversation about the image file `name` (checked first: a bad file changes nothing)."""
        from mvlm_compile.model.preprocess import load_image

        path = Path(name).expanduser()
        picture = load_image(path)
        had_turns = bool(self.conversation.messages)
        self.conversation.reset(image=picture)
        forgotten = " (the image goes in the first turn, so the turns so far are forgotten)" if had_turns else ""
        self.note(f"[new conversation about {path}{forgotten}]")

    def ask(self, question: str) -> Turn:
        """Stream the answer to `question`; Ctrl-C stops it (its text so far stays as the turn)."""
        started = time.perf_counter()
        with _interrupts_held() as interrupted:  # a Ctrl-C now waits until the stream is in hand
            stream = self.conversation.ask(question, stream=True, **self.options)
        shown, first = "", None
        stopped = interrupted()
        if not stopped:
            try:
                for piece in stream:
                    if first is None:
                        first = time.perf_counter() - started
                    shown += piece
                    if not self.as_json:
                        self.write(piece)
            except KeyboardInterrupt:
                stopped = True
        if stopped:
            stream.cancel()
            stream.wait()  # the next step boundary; a second Ctrl-C here goes on to the caller
        generation = stream.generation
        turn = Turn(
            question,
            generation.text,
            generation.prompt_tokens,
            generation.cached_tokens,
            generation.completion_tokens,
            generation.finish_reason,
            None if first is None else round(first, 4),
            round(time.perf_counter() - started, 4),
        )
        if self.as_json:
            self.write(json.dumps(asdict(turn)) + "\n")
        else:
            # What was decoded before the stop took effect: the turn kept is the text shown.
            self.write(generation.text[len(shown) :] + "\n")
        if generation.finish_reason == "cancelled":
            kept = generation.text.strip()
            self.note("[stopped]" if kept else "[stopped before the answer began: the question is dropped]")
        self.turns.append(turn)
        return turn


def _unquote(text: str) -> str:
    """A file name as a terminal pastes or drops it: 'my photo.png' or "my photo.png" without its quotes."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


@contextlib.contextmanager
def _interrupts_held() -> Iterator[Callable[[], bool]]:
    """Hold Ctrl-C (SIGINT) while a question is submitted: one raised then could leave the request
    running with no stream to cancel it. Yields a function that says whether one came; the caller
    then stops the answer as if Ctrl-C had come while it streamed. Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield lambda: bool(caught)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
