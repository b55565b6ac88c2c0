"""FakeUpstream: a small Tornado app on its own thread and event loop, standing in for an
upstream MCP server whose behaviour a test needs to script exactly (the tests themselves
are sync); it records every request it receives."""

from __future__ import annotations

import asyncio
import threading
import time

import tornado.web

from .idp import free_port


class FakeUpstream:
    """Serves `handler` at /KIND paths (handler gets `upstream=self`); records requests."""

    def __init__(self, handler: type[tornado.web.RequestHandler], name: str = "fake-upstream") -> None:
        self.port = free_port()
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
                return app.listen(self.port, address="127.0.0.1")

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
