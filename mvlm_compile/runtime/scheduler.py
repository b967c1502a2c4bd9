"""In-flight batching: concurrent requests share the decoder's steps, each in a slot of one KV cache.

One thread owns the decoder (runtime/kv_cache.py's loop over a cache of `slots` sequences) and
runs every graph call of every answer. A request joins at a step boundary and leaves on EOS, a
stop string, its token limit or a cancel, freeing its slot at once. Each turn of the loop:

  1. requests that were cancelled leave; waiting requests take free slots, first come first served;
  2. one chunk (`prefill_chunk` tokens) of the oldest prompt still being prefilled;
  3. one decode step for every sequence past its prompt: one token each, in one call.

So a joining prompt delays the running streams by one chunk per token at most, never by its whole
length, and the decode rows share each step's weight reads (an Orin's decode is bound by them: 8
rows read the same bytes as 1). Chunk boundaries depend only on the prompt (and the prefix it
reuses), so a request's computation is the same whether it runs alone or beside others (the
batched step differs from a step of one by the kernels' rounding; tests/test_scheduler.py checks
the tokens are equal).

With a prefix cache (runtime/prefix_cache.py), a prompt's first chunk starts after the longest
prefix kept from sequences that finished before (copied into its slot), and a sequence that
leaves is kept there (copied out of its slot) before its slot is reused.

Sampling is per request (temperature, top_p, seed: each row draws from its own generator).

Slots stay contiguous: the decoding sequences hold slots [0, d) and the one being prefilled holds
slot d, so a decode step is one call over the first d slots. When a sequence leaves from the
middle, the last decoding sequence moves into its slot (and the prefilling one down by one): a
copy of those sequences' rows, on leaving only, never per step.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mvlm_compile.errors import MvlmError
from mvlm_compile.runtime.kv_cache import DecoderLoop
from mvlm_compile.runtime.pipeline import AnswerText, Generation, Sampling, next_token
from mvlm_compile.runtime.prefix_cache import PAGE_TOKENS, PositionKey, PrefixCache

DEFAULT_PREFILL_CHUNK = 128
_END = object()


@dataclass(frozen=True)
class StepInfo:
    """What one turn of the loop ran (for metrics and benchmarks)."""

    decode_rows: int  # sequences advanced by one token together (0: no decode step)
    prefill_tokens: int  # prompt tokens prefilled (one chunk, or 0)
    slots_in_use: int
    waiting: int  # requests admitted and waiting for a slot
    seconds: float


@dataclass(eq=False)
class Request:
    """One answer in the scheduler: its prompt, options, text so far and the pieces for its reader."""

    generation: Generation
    prompt: np.ndarray  # [1, prompt tokens, hidden]: the spliced prompt embeddings
    text: AnswerText
    sampling: Sampling
    keys: list[PositionKey] | None = None  # each prompt position's content, for prefix reuse (None: none)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prefilled: int = 0  # prompt tokens in the cache
    token: int | None = None  # the last token, fed at the next decode step
    ended: threading.Event = field(default_factory=threading.Event)  # set once its last piece is out
    rng: np.random.Generator = field(init=False)
    _pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    def pieces(self) -> Iterator[str]:
        """The answer's text pieces as they are made; raises what failed its generation."""
        while (item := self._pieces.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    @property
    def finished(self) -> bool:
        return self.generation.finish_reason is not None

    def _finish(self, reason: str | None = None, error: BaseException | None = None) -> None:
        if reason is not None and self.generation.finish_reason is None:
            self.generation.finish_reason = reason
        if error is not None:
            self._pieces.put(error)
        self._pieces.put(_END)
        self.ended.set()

    def _accept(self, logits: np.ndarray) -> None:
        """The next token from this row's logits: its text piece to the reader, or the end."""
        if self.cancelled.is_set():
            self.generation.finish_reason = "cancelled"
            return
        self.token = next_token(logits, self.sampling, self.rng)
        piece = self.text.add(self.token)
        if piece:
            self._pieces.put(piece)


class BatchScheduler:
    """The decoder's one thread: admits requests into cache slots and steps them together."""

    def __init__(
        self,
        decoder: DecoderLoop,
        embed: Callable[[Sequence[int]], np.ndarray],
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        chunk_after_past: bool = True,
        prefix_cache_bytes: int = 0,
    ) -> None:
        """`decoder`: the loop over a cache of max-batch slots. `embed(ids)`: token embeddings
        [1, n, hidden]. `prefill_chunk`: prompt tokens per chunk; with `chunk_after_past` False (an
        engine without a profile for it, or a test model whose cache rows cannot be viewed at any
        slot) every prompt is prefilled in one call, and no prefix is reused. `prefix_cache_bytes`:
        the memory that keeps finished sequences' K/V for reuse (0: none)."""
        if prefill_chunk < 1:
            raise MvlmError(f"--prefill-chunk {prefill_chunk}: expected at least 1")
        self.decoder, self.embed = decoder, embed
        self.slots = decoder.plan.slots
        self.prefill_chunk = prefill_chunk if chunk_after_past and decoder.plan.chunked_prefill else None
        reuse = self.prefill_chunk is not None and prefix_cache_bytes >= decoder.plan.sequence_bytes(PAGE_TOKENS)
        self.prefix_cache = PrefixCache(decoder, prefix_cache_bytes) if reuse else None  # None: not one page
        self.listeners: list[Callable[[StepInfo], None]] = []
        self._rows: list[Request] = []  # slot i holds _rows[i]: decoding ones first, then the one prefilling
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        decoder.reset()
        self._thread = threading.Thread(target=self._run, name="mvlm-batch-scheduler", daemon=True)
        self._thread.start()

    # -- the callers' side (any thread) --

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closed:
                raise MvlmError("the session is closed: open a new Session to generate")  # closed meanwhile
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled.set()
        with self._wake:
            self._wake.notify()

    @property
    def slots_in_use(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        """Cancel everything and stop the thread (after the call under way)."""
        with self._wake:
            self._closed = True
            for request in [*self._waiting, *self._rows]:
                request.cancelled.set()
            self._wake.notify()
        self._thread.join()

    # -- the scheduler's thread --

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self._waiting or self._rows)
                closing = self._closed
                self._admit()
            self._leave_cancelled()
            if closing and not self._rows:
                self._drain_waiting()
                return
            started = time.perf_counter()
            try:
                prefilled = self._prefill_chunk()
                decoded = self._decode_step()
            except Exception as e:  # a failed graph call fails the requests in the cache, not the server
                self._fail_all(e)
                continue
            info = StepInfo(decoded, prefilled, len(self._rows), len(self._waiting), time.perf_counter() - started)
            for listener in self.listeners:
                listener(info)

    def _admit(self) -> None:
        """Waiting requests into free slots (under the lock); one prompt is prefilled at a time, so
        a request takes a slot once the slot before it decodes."""
        while self._waiting and len(self._rows) < self.slots and not self._prefilling():
            request = self._waiting.popleft()
            if request.cancelled.is_set():
                request._finish("cancelled")
                continue
            self.decoder.clear(len(self._rows))
            self._rows.append(request)

    def _prefilling(self) -> Request | None:
        last = self._rows[-1] if self._rows else None
        return last if last is not None and last.token is None else None

    def _decoding(self) -> int:
        return len(self._rows) - (self._prefilling() is not None)

    def _prefill_chunk(self) -> int:
        request = self._prefilling()
        if request is None:
            return 0
        total = request.prompt.shape[1]
        if request.prefilled == 0 and self.prefix_cache is not None and request.keys is not None:
            request.prefilled = self.prefix_cache.restore(len(self._rows) - 1, request.keys)
            request.generation.cached_tokens = request.prefilled
        end = total if self.prefill_chunk is None else min(total, request.prefilled + self.prefill_chunk)
        logits = self.decoder.step(len(self._rows) - 1, request.prompt[:, request.prefilled : end])
        chunk, request.prefilled = end - request.prefilled, end
        if end == total:
            request._accept(logits[0])  # its first token: it decodes from the next step on
            if request.finished:
                self._leave(len(self._rows) - 1)
        return chunk

    def _decode_step(self) -> int:
        rows = self._decoding()
        if rows == 0:
            return 0
        tokens = [request.token for request in self._rows[:rows]]
        logits = self.decoder.step(0, self.embed(tokens)[0][:, None])
        for request, row in zip(self._rows[:rows], logits):
            request._accept(row)
        for slot in reversed(range(rows)):
            if self._rows[slot].finished:
                self._leave(slot)
        return rows

    def _leave_cancelled(self) -> None:
        for slot in reversed(range(len(self._rows))):
            if self._rows[slot].cancelled.is_set():
                self._leave(slot, "cancelled")

    def _leave(self, slot: int, reason: str | None = None) -> None:
        """End the request in `slot` (with `reason` unless it has one) and keep the slots contiguous:
        the last decoding sequence moves into the hole, and the prefilling one (if any) down by one."""
        request = self._rows[slot]
        if self.prefix_cache is not None and request.keys is not None:
            # The answer's tokens but EOS (never fed: it is drawn last) are the positions after the prompt.
            self.prefix_cache.store(slot, request.keys + request.text.tokens)
        prefilling = self._prefilling()
        decoding = self._decoding()
        if request is prefilling:
            self._rows.pop()
            self.decoder.clear(slot)
        else:
            last = decoding - 1
            if slot != last:
                self.decoder.move(last, slot)
                self._rows[slot] = self._rows[last]
            self._rows.pop(last)
            if prefilling is not None:  # it was at slot `decoding`, now one down
                self.decoder.move(decoding, last)
        request._finish(reason)

    def _fail_all(self, error: Exception) -> None:
        failed, self._rows = self._rows, []
        self.decoder.reset()
        for request in failed:
            request.generation.finish_reason = "error"
            request._finish(error=error)

    def _drain_waiting(self) -> None:
        with self._wake:
            while self._waiting:
                self._waiting.popleft()._finish("cancelled")
