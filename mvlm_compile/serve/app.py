"""The OpenAI-compatible app (Starlette) over one Session.

    POST /v1/chat/completions   OpenAI's chat completions, streamed (SSE) or not
    GET  /v1/models             the one model served (and /v1/models/{id})
    GET  /health                200 once the session is loaded and warmed up; 503 before, or if loading failed
    GET  /metrics               Prometheus text (metrics.py)

The session loads on the generation thread after the server starts listening, so /health answers
503 while a large engine loads. Every error is OpenAI's JSON shape with a 4xx/5xx status, checked
before the request waits for the model; the server stays up. With an API key, /v1/* needs
`Authorization: Bearer KEY` (401 otherwise); without one, /v1/* answers only requests whose Host is
this machine's loopback name, the --host it listens on or an --allowed-host (403 otherwise: a web
page whose name was rebound to this address gets nothing). /health and /metrics stay open for probes
and scrapers.

Memory: a request takes its place in the queue (or gets 429) before its body is read, so only the
admitted ones (at most max_batch + max_queue) hold a body; the rest wait in uvicorn's 64 KiB read buffer. An
admitted request holds at most REQUEST_BODY_COPIES copies of --max-body-bytes while its body is read
and parsed, plus its image (--max-image-bytes); IMAGE_DECODES images are decoded at once, each in at
most DECODE_BYTES_PER_PIXEL bytes per pixel of preprocess.MAX_IMAGE_PIXELS. `memory_bound` adds these
up: what a burst of the largest requests can add to the loaded server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mvlm_compile.errors import MvlmError
from mvlm_compile.model.preprocess import MAX_IMAGE_PIXELS
from mvlm_compile.runtime.scheduler import DEFAULT_PREFILL_CHUNK
from mvlm_compile.serve.errors import APIError, from_session_error
from mvlm_compile.serve.images import image_bytes
from mvlm_compile.serve.metrics import Metrics
from mvlm_compile.serve.schema import (
    ChatCompletionRequest,
    Conversation,
    max_new_tokens,
    parse_request,
    stop_strings,
    the_conversation,
)
from mvlm_compile.serve.worker import Job, Worker
from mvlm_compile.session import Session, TextStream

log = logging.getLogger("mvlm_compile.serve")

MiB = 2**20
DISCONNECT_POLL_S = 0.1  # how soon a client that hung up frees the engine (plus one token)
ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# The body as read, as text while it is parsed, the data URL parsed out of it, and its base64 part
# while it is decoded: each at most --max-body-bytes.
REQUEST_BODY_COPIES = 4
IMAGE_DECODES = 1  # the largest image takes hundreds of MB while it is decoded: one at a time
DECODE_BYTES_PER_PIXEL = 12  # decoding and pre-processing any accepted format (measured: at most 11.6)
CONNECTION_BYTES = 2**20  # uvicorn's read buffer (64 KiB) and one socket read (256 KiB), rounded up


@dataclass
class ServeOptions:
    """What `mvlm-compile serve` takes (see its --help); the defaults are the CLI's."""

    bundle: Path
    backend: str = "ort"
    engines: Path | None = None
    plugin: Path | None = None
    threads: int = 0
    int4_activations: str = "int8"
    image_cache_size: int = 32
    max_batch: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache_mib: float | None = None  # None: one sequence at the full context
    model_name: str | None = None
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 16
    max_body_bytes: int = 20 * MiB
    max_image_bytes: int = 10 * MiB
    allow_remote_images: bool = False
    image_fetch_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    drain_timeout: int = 30
    log_level: str = "info"


def memory_bound(options: ServeOptions, connections: int, slots: int) -> int:
    """The most memory (bytes) requests can add to the loaded server while `connections` are open:
    the admitted requests' bodies and images (`slots`: the session's max batch), the images being
    decoded, and the connections' buffers."""
    admitted = slots + options.max_queue
    per_request = REQUEST_BODY_COPIES * options.max_body_bytes + options.max_image_bytes
    decoding = IMAGE_DECODES * DECODE_BYTES_PER_PIXEL * MAX_IMAGE_PIXELS
    return admitted * per_request + decoding + connections * CONNECTION_BYTES


class _State:
    """The app's session, its loading status, the queue in front of it and the metrics."""

    def __init__(self, options: ServeOptions, on_load_failure: Callable[[BaseException], None] | None) -> None:
        self.options = options
        self.metrics = Metrics()
        self.worker = Worker(self.metrics, options.max_queue)
        self.session: Session | None = None
        self.status = "loading"
        self.error: str | None = None
        self.model_name = options.model_name
        self.created = int(time.time())
        self.fetcher: httpx.AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # Taken on the thread that decodes (not on the event loop), so a client that hangs up
        # mid-decode cannot free a place while its decode still runs.
        self.decodes = threading.BoundedSemaphore(IMAGE_DECODES)
        self._on_load_failure = on_load_failure

    async def load(self) -> None:
        try:
            self.session = await self.worker.run_blocking(self._load_and_warm_up)
        except BaseException as e:
            self.status = "failed"
            self.error = e.format_message() if isinstance(e, MvlmError) else f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", self.options.bundle, self.error)
            if self._on_load_failure is not None:
                self._on_load_failure(e)
            return
        self.model_name = self.model_name or self.session.model_id
        self.worker.attach(self.session)
        if self.status == "loading":  # not when a stop began meanwhile
            self.status = "ready"
            self.metrics.ready.set(1)
            log.info("model %r ready (backend %s)", self.model_name, self.options.backend)

    def _load_and_warm_up(self) -> Session:
        from PIL import Image

        o = self.options
        session = Session(
            o.bundle,
            o.backend,
            o.engines,
            o.threads,
            o.int4_activations,
            o.image_cache_size,
            plugin=o.plugin,
            max_batch=o.max_batch,
            prefill_chunk=o.prefill_chunk,
            prefix_cache_mib=o.prefix_cache_mib,
        )
        try:
            # One short answer: the first run of each graph (allocations, TensorRT's lazy setup) is slow.
            session.generate(Image.new("RGB", (32, 32), (128, 128, 128)), "Describe the image.", max_tokens=2)
        except BaseException:
            session.close()
            raise
        return session

    def require_ready(self) -> Session:
        if self.status in ("draining", "stopping"):
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if self.session is None or self.status != "ready":
            detail = f"loading the model failed: {self.error}" if self.status == "failed" else self.status
            raise APIError(503, f"the model is not ready ({detail}); GET /health says when", code="model_not_ready")
        return self.session

    def begin_drain(self, seconds: float) -> None:
        """Stopping (SIGTERM; any thread): new requests get 503 and /health 503; what has not
        finished `seconds` later is cancelled between two tokens, its client told so."""
        if self.status in ("loading", "ready"):
            self.status = "draining"
        self.metrics.ready.set(0)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.call_later, seconds, self.worker.cancel_all)

    def prepare(
        self,
        request: ChatCompletionRequest,
        conversation: Conversation,
        image: bytes | None,
        max_tokens: int | None,
        stop: tuple[str, ...],
    ) -> TextStream:
        """The session's checked stream for the request (on a thread: it tokenizes and decodes the image)."""
        session = self.require_ready()
        temperature = 0.0 if request.temperature is None else request.temperature
        seed = request.seed
        if seed is None:  # greedy needs none; sampling without a seed differs from call to call, as OpenAI's
            seed = secrets.randbelow(2**31) if temperature > 0 else 0
        try:
            with self.decodes if image is not None else contextlib.nullcontext():  # text only: nothing to decode
                return session.chat(
                    [dict(message) for message in conversation.messages],
                    image,
                    max_tokens=max_tokens,  # None: OpenAI's default, as many as the context leaves
                    temperature=temperature,
                    top_p=1.0 if request.top_p is None else request.top_p,
                    seed=seed,
                    stop=stop,
                    stream=True,
                )
        except MvlmError as e:
            raise from_session_error(e, conversation.image_param, max_tokens is not None) from None

    async def close(self, loading: asyncio.Task) -> None:
        self.status = "stopping"
        await asyncio.to_thread(self.worker.shutdown)  # cancels what is left; waits for a load under way
        await loading
        if self.session is not None:
            await asyncio.to_thread(self.session.close)
        if self.fetcher is not None:
            await self.fetcher.aclose()


def create_app(options: ServeOptions, on_load_failure: Callable[[BaseException], None] | None = None) -> _Gate:
    """The ASGI app; it loads the session when its lifespan starts and closes it when it ends.
    `on_load_failure(error)` is called if the session cannot be loaded (the CLI stops the server);
    `app.begin_drain(seconds)` starts a graceful stop (the server calls it on SIGTERM)."""
    state = _State(options, on_load_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        if options.allow_remote_images:
            state.fetcher = httpx.AsyncClient(
                timeout=options.image_fetch_timeout, follow_redirects=True, max_redirects=3
            )
        loading = asyncio.create_task(state.load())
        try:
            yield
        finally:
            await state.close(loading)

    async def health(request: Request) -> Response:
        body = {"status": state.status, "model": state.model_name}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mvlm-compile"}

    async def list_models(request: Request) -> Response:
        state.require_ready()
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        state.require_ready()
        _check_model(request.path_params["model"])
        return JSONResponse(model_card())

    def _check_model(name: str) -> None:
        if name != state.model_name:
            raise APIError(
                404,
                f"model {name!r}: this server serves {state.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def chat_completions(request: Request) -> Response:
        state.require_ready()
        # A place first: only admitted requests have their body read, parsed and decoded.
        job = state.worker.admit()
        try:
            stream, include_usage = await _start(request, job)
        except BaseException:
            job.release()
            raise
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        completion = _Completion(state.model_name or "", job)
        if stream:
            return StreamingResponse(
                completion.events(watcher, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return JSONResponse(await completion.whole())
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once it ended; ends it if this handler is cancelled (drain timeout)

    async def _start(request: Request, job: Job) -> tuple[bool, bool]:
        """Read, check and start the admitted request; (stream, include_usage). Its body, data URL and
        image bytes are not kept beyond this (the answer may take a while)."""
        body = await _read_body(request, options.max_body_bytes, options.body_timeout)
        chat = await asyncio.to_thread(_parse, body)  # megabytes of JSON: not on the event loop
        del body
        _check_model(chat.model)
        conversation = the_conversation(chat)
        max_tokens, stop = max_new_tokens(chat), stop_strings(chat)
        image = None  # a text-only conversation
        if conversation.image_url is not None:
            image = await image_bytes(
                conversation.image_url,
                conversation.image_param or "messages",
                options.max_image_bytes,
                state.fetcher,
                options.image_fetch_timeout,
            )
        job.start(await asyncio.to_thread(state.prepare, chat, conversation, image, max_tokens, stop))
        return chat.stream, bool(chat.stream_options and chat.stream_options.include_usage)

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, APIError)
        return error.response()

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").response()

    async def internal_error(request: Request, error: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return APIError(500, f"internal error ({type(error).__name__}); see the server's log").response()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    return _Gate(app, state)


class _Completion:
    """One request's answer as OpenAI's chat.completion or its chat.completion.chunk events."""

    def __init__(self, model: str, job: Job) -> None:
        self.model, self.job = model, job
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage(self) -> dict:
        g = self.job.stream.generation  # type: ignore[union-attr]
        return {
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
            # OpenAI's field: prompt tokens whose K/V a kept prefix gave (an earlier turn; the same system
            # prompt and image), not prefilled
            "prompt_tokens_details": {"cached_tokens": g.cached_tokens},
        }

    def _finish_reason(self) -> str:
        reason = self.job.stream.generation.finish_reason  # type: ignore[union-attr]
        if reason == "cancelled":  # the client is still there, so the server is stopping
            raise APIError(503, "the server is shutting down; the answer was cut short", code="server_shutting_down")
        return str(reason)

    async def whole(self) -> dict:
        text = "".join([piece async for piece in self.job.pieces()])
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": self._finish_reason(),
                    "logprobs": None,
                }
            ],
            "usage": self._usage(),
        }

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return self._event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
            }
        )

    @staticmethod
    def _event(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, watcher: asyncio.Task, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: the role, each text piece, the finish reason, optionally the usage
        (choices empty, as OpenAI's stream_options.include_usage), then [DONE]. An error after the
        stream started (the status is sent) is an {"error": ...} event, as OpenAI's."""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async for piece in self.job.pieces():
                yield self._chunk({"content": piece})
            yield self._chunk({}, self._finish_reason())
            if include_usage:
                yield self._event(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self._usage(),
                    }
                )
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield self._event(e.body())
        except Exception as e:
            log.error("generation failed mid-stream", exc_info=e)
            yield self._event(APIError(500, f"internal error ({type(e).__name__}); see the server's log").body())
        finally:  # also when the client hangs up (Starlette cancels this generator) or the drain times out
            watcher.cancel()
            self.job.cancel()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    job.cancel()


async def _read_body(request: Request, max_bytes: int, timeout: float) -> bytearray:
    """The JSON body's bytes, refused (415, 413, 408) before it is all read where possible."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type {media_type or '(none)'!r}: expected application/json")
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than {max_bytes} bytes (--max-body-bytes)")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise too_large

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        # An admitted request holds a place in the queue: a client that trickles its body loses it.
        raise APIError(408, f"the request body took longer than {timeout:g} s to arrive (--body-timeout)") from None
    return body


def _parse(body: bytearray) -> ChatCompletionRequest:
    try:
        document = json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    return parse_request(document)


class _Gate:
    """ASGI middleware around the app: the API key (or, without one, the Host) for /v1/*, and requests
    counted by endpoint and status."""

    def __init__(self, app: ASGIApp, state: _State) -> None:
        self.app, self.state = app, state
        options = state.options
        self._key = None if options.api_key is None else options.api_key.encode()
        self._hosts = {h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, options.host, *options.allowed_hosts)}

    def begin_drain(self, seconds: float) -> None:
        self.state.begin_drain(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = [500]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refusal(scope) if path.startswith("/v1/") else None
            if error is not None:
                await error.response()(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self._key is not None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
                return None
            return APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        host = headers.get(b"host", b"").decode("latin-1")
        if _host_name(host) in self._hosts:
            return None
        # Without a key, a page from anywhere could reach this server through a name rebound to its address.
        return APIError(
            403,
            f"Host {host!r}: this server, started without --api-key, answers only for "
            f"{', '.join(sorted(self._hosts))} (--allowed-host NAME adds one)",
            code="host_not_allowed",
        )


def _host_name(host: str) -> str:
    """A Host header's name, without its port: 'example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host
