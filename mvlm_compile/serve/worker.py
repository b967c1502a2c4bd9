"""The bounded queue in front of the session, and the threads that carry its answers to the event loop.

The session decodes up to `max_batch` requests together (its scheduler, runtime/scheduler.py, owns
every step); the rest wait for a slot. A request is admitted while fewer than `max_queue` others
wait beyond the slots; past that it is refused at once (429), so a burst of clients costs memory
for at most max_batch + max_queue requests. Each admitted request has a thread here (never the
event loop) that hands its text pieces to the request's event loop as the scheduler makes them.
`Job.cancel()` (the client hung up, or the server is stopping) ends the generation at the next
step boundary, freeing its slot at once, or skips it if it has not started.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mvlm_compile.runtime.pipeline import Generation
from mvlm_compile.serve.errors import APIError
from mvlm_compile.serve.metrics import Metrics
from mvlm_compile.session import Session, TextStream

log = logging.getLogger("mvlm_compile.serve")

_END = object()


class Job:
    """One admitted request: its stream (once checked), its pieces as they come, its timings."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue[Any] = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.cancelled = threading.Event()
        self.stream: TextStream | None = None
        self.error: BaseException | None = None

    def start(self, stream: TextStream) -> None:
        """Queue the checked request for the engine."""
        self.stream = stream
        if self.cancelled.is_set():
            stream.cancel()
        self._worker.submit(self)

    def cancel(self) -> None:
        """From the event loop or any thread: end the generation between two tokens, or skip it."""
        self.cancelled.set()
        if self.stream is not None:
            self.stream.cancel()

    def release(self) -> None:
        """Leave the queue: when the generation ended, or when the request never reached it."""
        self._worker.release(self)

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces as the worker makes them; raises what the generation raised."""
        while (piece := await self._pieces.get()) is not _END:
            yield piece
        if self.error is not None:
            raise self.error

    def emit(self, item: Any) -> None:  # worker thread -> event loop
        try:
            self._loop.call_soon_threadsafe(self._pieces.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.cancel()


class Worker:
    def __init__(self, metrics: Metrics, max_queue: int) -> None:
        self.metrics, self.max_queue = metrics, max_queue
        self.capacity = max_queue + 1  # until a session is attached: the waiting ones and one running
        self._executor: ThreadPoolExecutor | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mvlm-load")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()  # admitted and not yet ended
        self._slots_in_use: Callable[[], int] = lambda: 0
        metrics.queue_depth.set_function(lambda: max(0, len(self._jobs) - self._slots_in_use()))
        metrics.running.set_function(lambda: self._slots_in_use())

    def run_blocking(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run `fn` on a thread of its own (loading and warming up the session)."""
        return asyncio.wrap_future(self._loader.submit(fn))

    def attach(self, session: Session) -> None:
        """Size the queue to the loaded session's slots, and show its steps in the metrics."""
        self.capacity = session.max_batch + self.max_queue
        self._executor = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="mvlm-generate")
        self._slots_in_use = lambda: session.slots_in_use
        self.metrics.slots.set(session.max_batch)
        session.add_step_listener(self.metrics.observe_step)

        def pages(used: bool) -> int:  # read at each scrape, from the scheduler's counts
            cache = session.prefix_cache_info()
            return 0 if cache is None else cache.pages_used if used else cache.pages

        self.metrics.prefix_cache_pages.set_function(lambda: pages(used=False))
        self.metrics.prefix_cache_pages_used.set_function(lambda: pages(used=True))

    def admit(self) -> Job:
        """A place in the queue, or a 429 when max_queue requests already wait."""
        job = Job(self)
        with self._lock:
            if len(self._jobs) >= self.capacity:
                raise APIError(
                    429,
                    f"the server is busy: every slot is taken and {self.max_queue} requests already wait "
                    "(--max-batch, --max-queue); retry later",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            self._jobs.add(job)
        return job

    def release(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)

    def submit(self, job: Job) -> None:
        assert self._executor is not None, "requests are admitted once the session is attached"
        self._executor.submit(self._generate, job)

    def _generate(self, job: Job) -> None:
        stream = job.stream
        assert stream is not None
        generation = stream.generation
        first_at = None
        ran = False
        try:
            if job.cancelled.is_set():  # hung up while waiting: the engine never sees it
                generation.finish_reason = "cancelled"
                return
            ran = True
            try:
                for piece in stream:
                    if first_at is None:
                        first_at = time.perf_counter()
                        self.metrics.time_to_first_token.observe(first_at - job.arrived)
                    job.emit(piece)
            finally:
                stream.close()
        except Exception as e:  # a backend failure: this request gets a 500, the server goes on
            log.exception("generation failed")
            job.error = e
            generation.finish_reason = "error"
        finally:
            self._account(generation, ran, first_at)
            job.release()
            job.emit(_END)

    def _account(self, generation: Generation, ran: bool, first_at: float | None) -> None:
        m = self.metrics
        m.generations.labels(generation.finish_reason or "cancelled").inc()
        if ran:
            m.prompt_tokens.inc(generation.prompt_tokens)
            if generation.cached_tokens:
                m.prefix_cache_hits.inc()
                m.prefix_cache_reused_tokens.inc(generation.cached_tokens)
        m.completion_tokens.inc(generation.completion_tokens)
        if first_at is not None and generation.completion_tokens > 1:
            m.time_per_output_token.observe((time.perf_counter() - first_at) / (generation.completion_tokens - 1))

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()

    def shutdown(self) -> None:
        """Cancel what is queued or running and wait for the threads (at most one step's time)."""
        self.cancel_all()
        self._loader.shutdown(wait=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
