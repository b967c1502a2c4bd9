"""uvicorn over the app: bind first (a busy port is a usage error, exit 2), then serve until SIGTERM
or Ctrl-C, which drain: the listening socket closes, requests in flight (those queued included) get
up to --drain-timeout seconds to finish, then are cancelled between two tokens; the process exits 0.
A session that fails to load stops the server with the load's error and exit status. A client gets
--header-timeout seconds for each request's head (from connecting, or from its previous answer),
then its connection is closed: a slow client cannot hold connections open by trickling headers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mvlm_compile.bundle import resolve_artifacts
from mvlm_compile.errors import InternalError, MvlmError
from mvlm_compile.serve.app import ServeOptions, create_app

log = logging.getLogger("mvlm_compile.serve")
BACKSTOP_S = 5


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app when a stop begins (uvicorn itself then stops accepting
    connections and waits for the open ones)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_stop()
        super().handle_exit(sig, frame)


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11), closing a connection whose request head has not all arrived
    `header_timeout` seconds after the connection was made or its previous answer was sent. (uvicorn's
    own keep-alive timeout stops counting at the first byte, so one byte every few seconds kept a
    connection, and its buffers, forever.)"""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection is ending)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.debug("closing a connection whose request head took longer than %g s", self.header_timeout)
            self.transport.close()


def _return_large_blocks_to_the_system() -> None:
    """glibc keeps what a thread frees in that thread's arena, and raises its mmap threshold (up to
    32 MiB) as large blocks are freed: Pillow's 16 MiB blocks of one decode stayed with the thread
    that decoded, so the next decode on another thread took as much again. A fixed 1 MiB threshold
    maps every large block and unmaps it when freed: what the server holds is what it uses."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from glibc's malloc.h
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(m_mmap_threshold, 2**20)


def serve(options: ServeOptions) -> None:
    """Serve until stopped; raises MvlmError (the CLI's exit status) if it cannot."""
    _return_large_blocks_to_the_system()
    resolve_artifacts(options.bundle)  # a path that is no bundle fails here, before anything listens
    sock = _bind(options.host, options.port)
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_failure(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    _log_to_stderr(options.log_level)
    app = create_app(options, on_load_failure=stop_on_load_failure)
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level=options.log_level,
        # A backstop: the app itself cancels what is left after --drain-timeout, and answers it.
        timeout_graceful_shutdown=options.drain_timeout + BACKSTOP_S,
        server_header=False,
        http=type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout": options.header_timeout}),
    )
    server = _DrainingServer(config, lambda: app.begin_drain(options.drain_timeout))
    host, port = sock.getsockname()[:2]
    if not _is_loopback(options.host) and options.api_key is None:
        log.warning(
            "listening on %s without --api-key: anyone who reaches this port with an allowed Host can use the model",
            host,
        )
    log.info("loading %s; GET http://%s:%d/health answers 200 when ready", options.bundle, options.host, port)
    # uvicorn restores the handlers it found and raises the signal again after its drain: make that a
    # no-op, so a drained server exits 0 (not the CLI's 130 for an interrupted command).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[sock])
    if failures:
        error = failures[0]
        if isinstance(error, MvlmError):
            raise error
        raise InternalError(f"loading {options.bundle} failed: {type(error).__name__}: {error}")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise MvlmError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_to_stderr(level: str) -> None:
    """The server's own lines next to uvicorn's, in its format."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())
