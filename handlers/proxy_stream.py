"""The SSE half of the /mcp/{serverId} relay (a mixin of McpProxyHandler), and tools/list
answers filtered for the caller (JSON or SSE): events written and flushed one by one,
keep-alive comments, slow readers cut off, drain at event boundaries, and an idle stream
that costs as little as the process can hold thousands of."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from tornado import httputil
from tornado.iostream import StreamClosedError

from services.proxy.gate import Call
from services.proxy.protocol import jsonrpc, sse
from services.proxy.tools.filtering import MAX_LIST_BYTES, ToolListError
from services.proxy.upstream.errors import UpstreamStreamError

log = logging.getLogger("gateway.proxy")

MAX_PENDING_EVENT = 8 * 1024 * 1024  # an SSE event may not grow beyond this in the gateway


class RelayState:
    """One request's relay state. In slots, not handler attributes: past 30 attribute names
    CPython stops sharing an instance dict's keys between instances, and every held stream
    would pay for a dict of its own (about 1.3 KiB)."""

    __slots__ = ("upstream_request", "upstream_response", "reading", "interrupted", "last_read",
                 "client_gone", "bytes_out", "flushed", "message", "answered_at", "ttfb", "era", "tools")

    def __init__(self) -> None:
        self.upstream_request: asyncio.Task | None = None  # the handler's task, awaiting upstream headers
        self.upstream_response = None
        self.reading: asyncio.Task | None = None  # the handler's task, awaiting an idle stream's next bytes
        self.interrupted: str | None = None  # why `reading` was cancelled: "keepalive" or "drain"
        self.last_read = 0.0  # loop time of the upstream's last bytes (a stream)
        self.client_gone = False
        self.bytes_out = 0
        self.flushed = False  # once True, the client has bytes of the answer: no error answer any more
        self.message = None  # the parsed JSON-RPC body of a POST, for the id of error answers
        self.answered_at: float | None = None  # when the response to the request went by
        self.ttfb = 0.0  # seconds from sending the upstream request to its answer's head
        self.era: str | None = None  # a POST's protocol era, once its routing headers were checked
        self.tools = None  # a ToolContext while a tools/list answer is to be filtered


class SseRelay:
    """relay_stream and its helpers; the handler provides _r (RelayState), services, config,
    observe_latency, _uncancel and Tornado's write/flush/finish."""

    async def relay_stream(self, response, message, started: float, call: Call) -> str:
        """Relay an SSE stream event by event, flushed at once, never buffered beyond one
        event; keep-alive comments while idle; slow readers cut off.

        Drain (SIGTERM): a standalone GET stream, or a POST's stream once its answer went by,
        ends at the next event boundary with a normal end of stream (the chunked terminator),
        so the client reconnects (to another instance) instead of seeing a reset.

        An idle stream is this handler's task awaiting the upstream's next bytes and nothing
        else (no task, waiter or timeout per stream or per event: thousands are held open):
        the process's keep-alive sweep and drain watch interrupt that read by cancelling the task."""
        self.set_header("Cache-Control", "no-cache, no-transform")
        self.set_header("X-Accel-Buffering", "no")
        metrics = self.services.metrics
        if message is None and self.request.headers.get("Last-Event-ID"):
            self._r.tools = await self.services.gate.resumed_tools(call)
        draining = self.services.draining
        keepalive = self.config.sse_keepalive
        loop = asyncio.get_running_loop()
        parser = sse.SseParser()
        outcome = "stream"
        streams = _open_streams(draining, keepalive)
        streams.add(self)
        self._r.last_read = loop.time()
        metrics.gauge_add("sse_streams_open", 1)
        try:
            self._r.flushed = True
            self.flush()
            # The head is out and Tornado reads the response headers no more (finish() only
            # ends the body): a stream held for hours need not keep them (~1.3 KiB).
            self._headers = httputil.HTTPHeaders()
            self.observe_latency(call)
            while True:
                if draining.is_set() and self._may_end_for_drain(message, outcome, parser):
                    metrics.inc("streams_closed_total", reason="drain")
                    break  # finish() below flushes what was written
                self._r.reading = asyncio.current_task()
                try:
                    chunk = await response.read_chunk()
                except asyncio.CancelledError:
                    reason, self._r.interrupted = self._r.interrupted, None
                    if reason is None:
                        raise
                    self._uncancel()
                    if reason == "keepalive" and not parser.pending:
                        self.write(b": keepalive\n\n")
                        await self._flush_or_cut()
                    continue  # a drain: the check above
                finally:
                    self._r.reading = None
                self._r.last_read = loop.time()
                if not chunk:
                    break
                if self._r.tools is None:
                    wrote, outcome = self._write_events(parser, chunk, message, outcome)
                else:  # a tools/list answer to filter (only that request's stream pays for it)
                    wrote, outcome, end = await self._write_tool_events(parser, chunk, message, outcome)
                    if end:
                        await self._flush_or_cut()
                        break
                chunk = None  # not held while the stream idles
                if parser.pending > MAX_PENDING_EVENT:
                    metrics.inc("streams_closed_total", reason="event_too_large")
                    break
                if wrote:
                    await self._flush_or_cut()
        except StreamClosedError:
            metrics.inc("streams_closed_total", reason="client_gone")
        except TimeoutError:
            metrics.inc("streams_closed_total", reason="slow_reader")
            self.request.connection.close()
        except UpstreamStreamError:
            metrics.inc("streams_closed_total", reason="upstream_broke")
        finally:
            metrics.gauge_add("sse_streams_open", -1)
            streams.discard(self)
            if not streams:
                _close_drain_watch(draining)
        if not self._finished:
            try:
                await self.finish()
            except StreamClosedError:
                pass
        return outcome if outcome != "stream" else "ok"

    def _write_events(self, parser, chunk: bytes, message, outcome: str) -> tuple[bool, str]:
        """Write the events `chunk` completes; (any written, the call's outcome so far)."""
        events = parser.feed(chunk)
        for event in events:
            self.write(event.raw)
            self._r.bytes_out += len(event.raw)
            if message is not None and message.id is not None and outcome in ("stream", "unknown"):
                found = jsonrpc.outcome_of(event.data.encode(), message.id)
                if found:
                    outcome = found
                    if found != "unknown":  # too deep to read: maybe not the answer, keep looking
                        self._r.answered_at = time.monotonic()
        return bool(events), outcome

    async def _write_tool_events(self, parser, chunk: bytes, message, outcome: str) -> tuple[bool, str, bool]:
        """`_write_events` with the tools/list answer filtered for the caller; one that cannot
        be filtered is replaced by a JSON-RPC error and ends the stream (fail closed)."""
        gate, tools = self.services.gate, self.services.tools
        events = parser.feed(chunk)
        for event in events:
            raw, data = event.raw, event.data
            if self._r.tools is not None and data:
                try:
                    filtered = await gate.filter_tools_answer(tools, self._r.tools, data, must_answer=False)
                except ToolListError as exc:
                    self.services.metrics.inc("upstream_errors_total", kind="protocol")
                    log.warning("upstream tools/list answer refused: %s", exc)
                    error = jsonrpc.jsonrpc_error(-32603, "the upstream MCP server sent a tools/list answer "
                                                  f"the gateway cannot filter ({exc})", message and message.id)
                    self._r.tools = None
                    self.write(_event(event, error))
                    self._r.answered_at = time.monotonic()
                    return True, "-32603", True
                if filtered is not None:
                    raw, data = _event(event, filtered), filtered
                    if self._r.tools.pending == []:  # None: a resumed stream, filtered to its end
                        self._r.tools = None
            self.write(raw)
            self._r.bytes_out += len(raw)
            if message is not None and message.id is not None and outcome in ("stream", "unknown"):
                found = jsonrpc.outcome_of(data if isinstance(data, bytes) else data.encode(), message.id)
                if found:
                    outcome = found
                    if found != "unknown":
                        self._r.answered_at = time.monotonic()
        return bool(events), outcome, False

    async def relay_tools_body(self, response, message, status: int) -> str:
        """A tools/list answer: read whole (bounded), filtered for the caller, then written;
        anything that cannot be filtered is a 502 JSON-RPC error, never the original list."""
        data = bytearray()
        try:
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise ToolListError("the tools/list answer is encoded")
            while chunk := await response.read_chunk():
                data += chunk
                if len(data) > MAX_LIST_BYTES:
                    raise ToolListError(f"the tools/list answer is larger than {MAX_LIST_BYTES // 2**20} MiB")
            body = await self.services.gate.filter_tools_answer(self.services.tools, self._r.tools, bytes(data),
                                                                 must_answer=True)
        except (ToolListError, UpstreamStreamError) as exc:
            kind = "broken_body" if isinstance(exc, UpstreamStreamError) else \
                "too_large" if len(data) > MAX_LIST_BYTES else "protocol"
            self.services.metrics.inc("upstream_errors_total", kind=kind)
            log.warning("upstream tools/list answer refused: %s", exc)
            session = self._headers.get("Mcp-Session-Id")
            self.clear()
            if session:
                self.set_header("Mcp-Session-Id", session)
            text = "broke off its answer" if isinstance(exc, UpstreamStreamError) else f"sent a tools/list answer " \
                f"the gateway cannot filter ({exc})"
            self.jsonrpc_error(502, -32603, f"the upstream MCP server {text}", message and message.id)
            return "502"
        finally:
            self._r.tools = None
        self.write(body)
        self._r.bytes_out += len(body)
        try:
            await self.finish()
        except StreamClosedError:
            self.services.metrics.inc("streams_closed_total", reason="client_gone")
        if status >= 400:
            return str(status)
        return "ok" if message is None or message.id is None else jsonrpc.body_outcome(body, message.id)

    async def _flush_or_cut(self) -> None:
        """Flush; a client that does not take it within the slow-reader timeout: TimeoutError."""
        flushed = self.flush()
        if not flushed.done():  # usually written at once: no timeout to arm
            await asyncio.wait_for(flushed, self.config.slow_reader_timeout)

    def _interrupt(self, reason: str) -> None:
        """Cancel the task only while it awaits the upstream's bytes (a cancel-safe read)."""
        if self._r.reading is not None and self._r.interrupted is None:
            self._r.interrupted = reason
            self._r.reading.cancel()

    @staticmethod
    def _may_end_for_drain(message, outcome: str, parser) -> bool:
        """While draining: may this stream end here without losing anything owed?"""
        if parser.pending:
            return False  # mid-event: end at its boundary
        if message is None or message.id is None:
            return True  # a standalone GET stream: the client reconnects
        return outcome not in ("stream", "unknown")  # the POST's answer went by

def _event(event, data: bytes) -> bytes:
    """`event` written again with `data` (one line of compact JSON) as its data."""
    head = b"".join(f"{name}: {value}\n".encode() for name, value in
                    (("id", event.id), ("event", event.event), ("retry", event.retry)) if value is not None)
    return head + b"data: " + data + b"\n\n"


# The streams open per drain event (one per Services), one task per event waiting for it to
# interrupt their reads, and one keep-alive sweep timer: nothing per stream (a timer each
# was ~0.6 KiB of Python objects plus libuv's). Both go with the last stream.
_streams: weakref.WeakKeyDictionary[asyncio.Event, set[SseRelay]] = weakref.WeakKeyDictionary()
_drain_watch: weakref.WeakKeyDictionary[asyncio.Event, asyncio.Task] = weakref.WeakKeyDictionary()
_sweeps: weakref.WeakKeyDictionary[asyncio.Event, list] = weakref.WeakKeyDictionary()  # [its TimerHandle]
# A stream idle for `keepalive` seconds gets its comment at the next sweep: up to a quarter
# of the interval late, never early.
SWEEPS_PER_KEEPALIVE = 4


def _open_streams(draining: asyncio.Event, keepalive: float) -> set[SseRelay]:
    streams = _streams.get(draining)
    if streams is None:
        streams = _streams[draining] = set()
    if draining not in _drain_watch:
        watch = _drain_watch[draining] = asyncio.ensure_future(draining.wait())
        watch.add_done_callback(
            lambda watch: watch.cancelled() or [handler._interrupt("drain") for handler in list(streams)])
    if draining not in _sweeps:
        _sweep(_sweeps.setdefault(draining, [None]), streams, keepalive)
    return streams


def _sweep(timer: list, streams: set[SseRelay], keepalive: float) -> None:
    """Interrupt the read of each stream without upstream bytes for `keepalive` seconds (it
    writes a comment unless mid-event), then run again a quarter interval later."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    for handler in list(streams):
        if now - handler._r.last_read >= keepalive:
            handler._r.last_read = now
            handler._interrupt("keepalive")
    timer[0] = loop.call_at(now + keepalive / SWEEPS_PER_KEEPALIVE, _sweep, timer, streams, keepalive)


def _close_drain_watch(draining: asyncio.Event) -> None:
    watch = _drain_watch.pop(draining, None)
    if watch is not None and not watch.done():
        watch.cancel()
    timer = _sweeps.pop(draining, None)
    if timer is not None:
        timer[0].cancel()

