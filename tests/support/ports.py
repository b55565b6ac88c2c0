"""Loopback ports for tests: the test binds the socket and hands it to whoever serves on it
(as tornado.testing.bind_unused_port does), so no other process can take the port between."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Self

from tornado.testing import bind_unused_port

__all__ = ["HeldPort", "bind_unused_port", "bound_socket"]

HOST = "127.0.0.1"


def bound_socket(port: int = 0, host: str = HOST) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: an unused port) that does not listen yet:
    connections are refused until its owner calls listen().

    While it is bound the kernel gives the port to no one else (no bind to port 0, no
    outgoing connection gets it). SO_REUSEADDR lets its owner rebind a port it served
    before (TIME_WAIT), and lets a listener share the port with a holder that never listens.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class HeldPort:
    """A loopback port held for this object's lifetime by a bound socket that never listens
    (`bound_socket`): connecting to it is refused, and no other process is given it.

    `listen()` opens a listener on the port, and may be called again after that listener
    was closed (a test switching a peer between "down" and "up"). Use as a context manager
    or call `close()`.
    """

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self._holder: socket.socket | None = bound_socket(0, host)
        self.port: int = self._holder.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def listen(self, backlog: int = 128) -> socket.socket:
        """A new listening socket on the held port (the caller closes it)."""
        if self._holder is None:
            raise RuntimeError("the port was released")
        sock = bound_socket(self.port, self.host)
        sock.listen(backlog)
        return sock

    def close(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
