"""uvicorn over the app: bind first (a busy port is a usage error, exit 2), then serve until SIGTERM
or Ctrl-C, which drain: the listening socket closes, requests in flight (those queued included) get
up to --drain-timeout seconds to finish, then are cancelled between two tokens; the process exits 0.
A session that fails to load stops the server with the load's error and exit status."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

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


def serve(options: ServeOptions) -> None:
    """Serve until stopped; raises MvlmError (the CLI's exit status) if it cannot."""
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
    )
    server = _DrainingServer(config, lambda: app.begin_drain(options.drain_timeout))
    host, port = sock.getsockname()[:2]
    if not _is_loopback(options.host) and options.api_key is None:
        log.warning("listening on %s without --api-key: anyone who reaches this port can use the model", host)
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
