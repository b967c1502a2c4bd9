"""Free TCP ports on 127.0.0.1, for the local servers the suite and the benchmarks start (serve, tritonserver).

The ports are free when asked; a server started right after binds them unless another process
took one in between, which on a test machine is rare enough to retry rather than prevent.
"""

from __future__ import annotations

import socket


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct free ports: all bound at once, so that none is handed out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
