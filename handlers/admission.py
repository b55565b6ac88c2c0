"""Connection admission: the gateway's HTTP server, holding client connections below the
descriptor limit (503 beyond), backing off when accept() runs out, and draining (docs/architecture.md §6)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tornado import httputil
from tornado.ioloop import IOLoop

from handlers.http1 import Exchange, HttpParams, ServerConnection

log = logging.getLogger("gateway.admission")

# Descriptors kept back from client and upstream connections: stdio, the event loop's own
# (epoll, io_uring, wake-up pipes), the listening sockets, SQLite's database, WAL and
# shared-memory files, DynamoDB's and the IdP's HTTPS connections, metadata fetches, DNS.
# An idle gateway uses 16; the proportional part leaves room for pooled idle upstream
# connections on large limits.
RESERVE_FIXED = 32
RESERVE_SHARE = 16  # plus one descriptor in 16
REPORT_INTERVAL = 10.0  # seconds between two log lines about one condition
RETRY_AFTER = 5  # seconds, in the 503's Retry-After
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0  # accepting paused this long after EMFILE
ACCEPT_BATCH = 128  # accepts per readiness, as Tornado's own handler (fairness to other work)
# Workers sharing one listening socket (MCPGW_WORKERS): each readiness wakes all of them and
# the first would take the whole backlog; a few at a time spreads a burst of connections.
SHARED_ACCEPT_BATCH = 4
FRESH_GRACE = 1.0  # seconds a connection accepted just before a drain gets to send its request
DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 75.0  # seconds a connection may take to send a request's head, or its body
SWEEP_INTERVAL = 5.0  # seconds between two sweeps for connections past that timeout
HANDLER_GRACE = 1.0  # seconds a handler gets, after its response, to finish its work (usage record)

# accept() failures that mean "no descriptor or socket memory now", not "this connection".
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_BODY = json.dumps({
    "error": "temporarily_unavailable",
    "error_description": "the gateway is at its connection limit; retry shortly",
}).encode()
REFUSAL = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: application/json\r\n"
    f"Content-Length: {len(_BODY)}\r\n"
    f"Retry-After: {RETRY_AFTER}\r\n"
    "Cache-Control: no-store\r\n"
    "Connection: close\r\n\r\n"
).encode() + _BODY


def descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one and return it.

    The soft limit (often 1024, kept low for programs that still use select()) would cap
    the gateway at a few hundred streams; the event loop uses epoll, so up to the hard
    limit the administrator granted is safe to take, as Go's runtime and nginx's
    worker_rlimit_nofile do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. a sandbox that forbids it
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(limit: int) -> int:
    """Client connections allowed at once under a descriptor limit of `limit`."""
    usable = limit - RESERVE_FIXED - limit // RESERVE_SHARE
    return max(1, usable // 2)  # each client connection may hold one upstream connection


class AdmissionHTTPServer(httputil.HTTPServerConnectionDelegate):
    """The gateway's HTTP server: serves `app` (a Tornado Application) on the connections of
    handlers/http1.py, with a cap on open client connections, an accept loop that backs off
    when the process is out of descriptors, and a drain."""

    def __init__(self, app, *, max_connections: int, metrics=None, accept_batch: int = ACCEPT_BATCH,
                 xheaders: bool = False, max_body_size: int = DEFAULT_MAX_BODY,
                 idle_connection_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.app = app
        self._lean_routes = getattr(app, "settings", {}).get("lean_routes", ())
        self.params = HttpParams(max_body_size, idle_connection_timeout, xheaders)
        self.max_connections = max_connections
        self.accept_batch = accept_batch
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()  # constructed by the serving coroutine
        self._connections: set[ServerConnection] = set()
        self._sockets: list[socket.socket] = []
        self._acceptors: list[_Acceptor] = []
        self._sweeper: asyncio.TimerHandle | None = None
        # Counts since the last report, and the report timer (None: no condition pending).
        self._refused = 0
        self._pauses = 0
        self._report_timer: object | None = None
        # Drain: the request each busy connection serves (from its headers to the end of
        # its response), and counts while draining.
        self._busy: dict[ServerConnection, Exchange] = {}
        self.draining = False
        self._drain_done = 0
        self._all_closed: asyncio.Event | None = None

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets.append(sock)
            self._acceptors.append(_Acceptor(self, sock, self.accept_batch))
        if self._sweeper is None:
            self._sweep()

    def stop(self) -> None:
        """Stop listening (the listening sockets close) and sweeping; open connections are left as they are."""
        for acceptor in self._acceptors:
            acceptor.close()
        for sock in self._sockets:
            sock.close()
        self._acceptors.clear()
        self._sockets.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._report_timer is not None:
            IOLoop.current().remove_timeout(self._report_timer)
            self._report_timer = None

    def _sweep(self) -> None:
        """Close the connections that took longer than the idle timeout to send a request
        (or were idle between two that long): one timer per server, not one per connection."""
        now = self._loop.time()
        for conn in list(self._connections):
            if conn.deadline is not None and conn.deadline < now:
                conn.close()
        self._sweeper = self._loop.call_later(min(self.params.header_timeout / 2, SWEEP_INTERVAL), self._sweep)

    # ------------------------------------------------------ HTTPServerConnectionDelegate

    def start_request(self, server_conn: ServerConnection, request_conn: Exchange) -> httputil.HTTPMessageDelegate:
        self._busy[server_conn] = request_conn
        if self.draining:
            request_conn.disconnect = True  # answered with Connection: close, then closed
        for route in self._lean_routes:  # the hot path, past Tornado's routing (handlers/lean.py)
            path_args = route.match(request_conn.url)
            if path_args is not None:
                return route.start_request(server_conn, request_conn, path_args)
        return self.app.start_request(server_conn, request_conn)

    def request_ended(self, server_conn: ServerConnection, request_conn: Exchange) -> None:
        if self._busy.get(server_conn) is request_conn:
            del self._busy[server_conn]
            if self.draining:
                self._drain_done += 1

    def on_close(self, server_conn: ServerConnection) -> None:
        self._connections.discard(server_conn)
        request_conn = self._busy.get(server_conn)
        if request_conn is not None:
            self.request_ended(server_conn, request_conn)
        if self._all_closed is not None and not self._connections:
            self._all_closed.set()

    # ---------------------------------------------------------------------- drain

    async def drain(self, timeout: float) -> DrainResult:
        """Stop accepting, close idle connections, let the requests in flight finish for up
        to `timeout` seconds, then cut what is left. Logs one line at the start and one at
        the end."""
        started = time.monotonic()
        # Connections already in the kernel's backlog were accepted by the client's TCP
        # stack: serve them (closing the socket would reset them), then close it.
        for acceptor in list(self._acceptors):
            acceptor.accept_pending()
        self.stop()  # the listening sockets close (and the idle sweep ends): new connections are refused
        self.draining = True
        self._drain_done = 0
        self._all_closed = asyncio.Event()
        in_flight = len(self._busy)
        for request_conn in self._busy.values():
            request_conn.disconnect = True
        idle = self._close_idle(fresh_too=False)
        log.info("draining: %d request(s) in flight, %d idle connection(s) closed; "
                 "waiting up to %g s (MCPGW_DRAIN_TIMEOUT)", in_flight, idle, timeout)
        # A connection that has not sent its first request yet (just accepted) gets a
        # moment to send it, as its client has no reason to expect a close.
        for wait in (min(FRESH_GRACE, timeout), timeout - min(FRESH_GRACE, timeout)):
            if self._connections:
                try:
                    await asyncio.wait_for(self._all_closed.wait(), wait)
                except TimeoutError:
                    pass
            self._close_idle(fresh_too=True)
        cut = len(self._busy)
        for server_conn in list(self._connections):
            server_conn.abort()
        await asyncio.sleep(0)  # the cut requests' handlers see their connections close
        # A handler goes on after its response is out (the proxy records the call's usage
        # then); the services must not stop under it, or that record is lost.
        await _handlers_done(HANDLER_GRACE)
        result = DrainResult(in_flight, self._drain_done, cut, time.monotonic() - started)
        log.info("drained in %.1f s: %d request(s) completed, %d cut at the %g s limit",
                 result.seconds, result.completed, result.cut, timeout)
        return result

    def _close_idle(self, fresh_too: bool) -> int:
        """Close the connections between requests (no request under way, no bytes of one
        read); `fresh_too`: also those that have not carried a request yet."""
        closed = 0
        for server_conn in list(self._connections):
            if server_conn in self._busy or server_conn.has_input():
                continue
            if fresh_too or server_conn.served:
                closed += 1
                server_conn.close()
        return closed

    # -------------------------------------------------------------- per connection

    def admit(self, connection: socket.socket, address) -> None:
        """One accepted connection: serve it, or refuse it when at the cap."""
        if len(self._connections) < self.max_connections:
            self._serve(connection, address)
            return
        _refuse(connection)
        self._refused += 1
        if self._metrics is not None:
            self._metrics.inc("connections_refused_total")
        if self._report_timer is None:
            log.warning("at capacity: %d connections (the cap); answering new ones 503 until some close",
                        len(self._connections))
            self._arm_report()

    def _serve(self, connection: socket.socket, address) -> None:
        server_conn = ServerConnection(self, self.params, address)
        self._connections.add(server_conn)

        def served(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is not None:  # closed before it was set up
                connection.close()
                self.on_close(server_conn)

        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: server_conn, connection))
        task.add_done_callback(served)

    def paused(self, delay: float) -> None:
        """The accept loop hit EMFILE/ENFILE and paused for `delay` seconds."""
        self._pauses += 1
        if self._metrics is not None:
            self._metrics.inc("accept_paused_total")
        if self._report_timer is None:
            log.warning("out of file descriptors with %d client connections open; accepting paused, "
                        "retrying with back-off", len(self._connections))
            self._arm_report()

    # ------------------------------------------------------------------ reporting

    def _arm_report(self) -> None:
        self._refused = self._pauses = 0
        self._report_timer = IOLoop.current().call_later(REPORT_INTERVAL, self._report)

    def _report(self) -> None:
        if not self._refused and not self._pauses:
            self._report_timer = None  # quiet: the next occurrence logs at once again
            log.info("accepting normally again: %d connections", len(self._connections))
            return
        if self._refused:
            log.warning("at capacity: %d connections, refused %d in the last %.0f s",
                        len(self._connections), self._refused, REPORT_INTERVAL)
        if self._pauses:
            log.warning("out of file descriptors: accepting paused %d times in the last %.0f s (%d connections)",
                        self._pauses, REPORT_INTERVAL, len(self._connections))
        self._arm_report()


@dataclass(frozen=True)
class DrainResult:
    in_flight: int  # requests under way when the drain began
    completed: int  # requests that finished during the drain (including ones begun in it)
    cut: int  # requests still running at the timeout, their connections closed
    seconds: float


HANDLER_TASKS = ("RequestHandler._execute", "LeanHandler._execute")  # (handlers/lean.py)


async def _handlers_done(timeout: float) -> None:
    """Wait up to `timeout` for the request handlers still running. Tornado runs each as a
    task of RequestHandler._execute (tornado.web._HandlerDelegate.execute), known by name."""
    current = asyncio.current_task()
    running = [task for task in asyncio.all_tasks() if task is not current
               and getattr(task.get_coro(), "__qualname__", "") in HANDLER_TASKS]
    if running:
        await asyncio.wait(running, timeout=timeout)


def _refuse(connection: socket.socket) -> None:
    """Answer 503 and close, without waiting: the response fits any socket send buffer.

    The request already received is read off first: closing a socket with unread input
    makes the kernel send a reset, which can destroy the 503 before the client reads it."""
    try:
        connection.setblocking(False)
        try:
            for _ in range(4):
                if not connection.recv(65536):
                    break
        except (BlockingIOError, InterruptedError):
            pass
        connection.send(REFUSAL)
    except OSError:
        pass  # the client went away already; nothing to answer
    finally:
        connection.close()


class _Acceptor:
    """The accept loop of one listening socket (Tornado's netutil.add_accept_handler, plus a
    back-off when out of descriptors instead of an exception per readiness)."""

    def __init__(self, server: AdmissionHTTPServer, sock: socket.socket, batch: int = ACCEPT_BATCH):
        self._server = server
        self._batch = batch
        self._sock = sock
        self._loop = IOLoop.current()
        self._backoff = BACKOFF_MIN
        self._resume: object | None = None  # the timer while paused
        self._closed = False
        self._accepted = 0
        self._loop.add_handler(sock, self._on_readable, IOLoop.READ)

    def _on_readable(self, fd, events, batch: int | None = None) -> None:
        for _ in range(batch or self._batch):
            if self._closed:
                return
            try:
                connection, address = self._sock.accept()
            except BlockingIOError:
                return  # the backlog is empty
            except ConnectionAbortedError:
                continue  # reset while in the backlog
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    raise
                self._pause()
                return
            self._backoff = BACKOFF_MIN
            self._accepted += 1
            self._server.admit(connection, address)

    def accept_pending(self) -> None:
        """Accept what waits in the backlog now (before the socket closes for a drain)."""
        for _ in range(64):
            if self._closed or self._resume is not None:
                return
            before = self._accepted
            self._on_readable(None, None, ACCEPT_BATCH)
            if self._accepted - before < ACCEPT_BATCH:
                return

    def _pause(self) -> None:
        # Off the loop: the socket stays readable while connections wait in its backlog.
        self._loop.remove_handler(self._sock)
        delay = self._backoff
        self._backoff = min(delay * 2, BACKOFF_MAX)
        self._resume = self._loop.call_later(delay, self._resume_accepting)
        self._server.paused(delay)

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._closed:
            self._loop.add_handler(self._sock, self._on_readable, IOLoop.READ)

    def close(self) -> None:
        self._closed = True
        if self._resume is not None:
            self._loop.remove_timeout(self._resume)
            self._resume = None
        else:
            self._loop.remove_handler(self._sock)
