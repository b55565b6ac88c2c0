"""In-test upstreams that record every request they receive. FakeUpstream: a small
Tornado app on its own thread and event loop, standing in for an upstream MCP server whose
behaviour a test needs to script (the tests themselves are sync). RawUpstream: raw
asyncio sockets writing exactly the bytes a test scripts, for HTTP framing attacks."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable

import tornado.httpserver
import tornado.web

from .ports import bind_unused_port


class FakeUpstream:
    """Serves `handler` at /KIND paths (handler gets `upstream=self`); records requests."""

    def __init__(self, handler: type[tornado.web.RequestHandler], name: str = "fake-upstream") -> None:
        # Bound now, served from start(): the port is ours from the first moment.
        self._socket, self.port = bind_unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[dict] = []
        self.marks: dict[str, float] = {}
        self.pushed = 0  # bytes a flooding handler got into the gateway's socket
        self._handler = handler
        self._name = name
        self._events: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def record(self, kind: str, request) -> None:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.get_all():
            headers.setdefault(name.lower(), []).append(value)
        with self._lock:
            self.requests.append({"kind": kind, "method": request.method, "headers": headers,
                                  "body": request.body})

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["kind"] == kind]

    def mark(self, name: str) -> None:
        with self._lock:
            self.marks[name] = time.monotonic()

    def event(self, what: str, kind: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault((what, kind), threading.Event())

    def start(self) -> FakeUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop

            async def listen():
                app = tornado.web.Application([(r"/([a-z0-9-]+)", self._handler, {"upstream": self})])
                server = tornado.httpserver.HTTPServer(app)
                server.add_sockets([self._socket])
                return server

            server = loop.run_until_complete(listen())
            ready.set()
            loop.run_forever()
            server.stop()
            loop.close()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the in-test upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._socket.close()  # server.stop() closed it when it ran; never started: here


# --------------------------------------------------------------------------- raw bytes


class RawExchange:
    """One request a `RawUpstream` received, and the connection to answer it on."""

    def __init__(self, connection: RawConnection, number: int, method: str, path: str,
                 headers: list[tuple[str, str]], body: bytes) -> None:
        self.connection = connection
        self.number = number  # 1 for the first request on its connection
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def write(self, data: bytes) -> None:
        self.connection.writer.write(data)

    async def drain(self) -> None:
        await self.connection.writer.drain()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashing process or a middlebox would."""
        sock = self.connection.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.writer.transport.abort()


class RawConnection:
    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.number = number  # 1 for the first connection the upstream accepted
        self.writer = writer
        # Bytes the upstream writes when the next request arrives on this connection, before
        # answering it: an extra response that reaches the client only after its next request.
        self.before_next = b""


class RawUpstream:
    """An HTTP/1.1 upstream on raw asyncio sockets that answers with exactly the bytes a test
    scripts, for framing tests the well-behaved servers cannot produce (bare LF, stray
    responses, resets mid-body). ``script(exchange)`` is awaited per request on a keep-alive
    connection (the connection closes when it returns False). Every request is recorded.

    In a test's own loop: ``async with RawUpstream(script) as upstream``; for sync tests
    (a gateway process in front): ``upstream.start()`` runs it on a thread, ``stop()``.
    """

    def __init__(self, script: Callable[[RawExchange], Awaitable[bool | None]]) -> None:
        self._script = script
        self.exchanges: list[RawExchange] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def of(self, path: str) -> list[RawExchange]:
        with self.lock:
            return [e for e in self.exchanges if e.path == path]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with self.lock:
            self.connections += 1
            connection = RawConnection(self.connections, writer)
        number = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)]
                length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
                body = await reader.readexactly(length) if length else b""
                number += 1
                exchange = RawExchange(connection, number, method, path, headers, body)
                with self.lock:
                    self.exchanges.append(exchange)
                if connection.before_next:
                    writer.write(connection.before_next)
                    connection.before_next = b""
                if await self._script(exchange) is False:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):  # connections the client left open
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def start(self) -> RawUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self.__aenter__())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.__aexit__())
            loop.close()

        self._thread = threading.Thread(target=run, name="raw-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the raw upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
