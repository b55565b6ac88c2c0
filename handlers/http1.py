"""The gateway's HTTP/1.1 server side: each client connection an asyncio Protocol parsing with
llhttp (httptools), each request handed to the Tornado Application as an httputil.HTTPConnection."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import httptools
from tornado import httputil, netutil
from tornado.iostream import StreamClosedError

log = logging.getLogger("gateway.http")
app_log = logging.getLogger("tornado.application")

MAX_HEAD = 64 * 1024  # request line and header fields (Tornado's default, nginx's large buffers: 32 KiB)
WRITE_HIGH_WATER = 64 * 1024  # response bytes buffered for a client before a write waits for it to read
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_SECONDS, LINGER_BYTES = 2.0, 1024 * 1024  # reading off a refused request's rest, at most
NO_BODY_STATUSES = frozenset({204, 304})


class HttpParams:
    """What every connection of one server shares."""

    __slots__ = ("max_body_size", "header_timeout", "xheaders")

    def __init__(self, max_body_size: int, header_timeout: float, xheaders: bool) -> None:
        self.max_body_size = max_body_size
        self.header_timeout = header_timeout  # seconds to send a request's head (and its body)
        self.xheaders = xheaders


class RequestContext:
    """`connection.context` as HTTPServerRequest reads it: the client's address and scheme."""

    __slots__ = ("remote_ip", "protocol")

    def __init__(self, remote_ip: str, protocol: str = "http") -> None:
        self.remote_ip = remote_ip
        self.protocol = protocol

    def __str__(self) -> str:
        return self.remote_ip

    def forwarded(self, headers: httputil.HTTPHeaders) -> RequestContext:
        """This request's context behind a reverse proxy (MCPGW_TRUST_FORWARDED), as Tornado's
        `xheaders`: X-Real-Ip, else the right-most X-Forwarded-For entry; X-Scheme or
        X-Forwarded-Proto."""
        ip = headers.get("X-Forwarded-For", self.remote_ip).split(",")[-1].strip()
        ip = headers.get("X-Real-Ip", ip)
        scheme = headers.get("X-Scheme", headers.get("X-Forwarded-Proto", self.protocol))
        scheme = scheme.split(",")[-1].strip() if scheme else scheme
        return RequestContext(ip if netutil.is_valid_ip(ip) else self.remote_ip,
                              scheme if scheme in ("http", "https") else self.protocol)


class Refusal(Exception):
    """A request refused before it reaches the application (status, reason)."""

    def __init__(self, status: int, reason: str) -> None:
        # Never the refused value itself (it may be a credential with one bad byte): the
        # reason up to its first quote, in one line.
        quote = min((i for i in (reason.find("'"), reason.find('"')) if i >= 0), default=-1)
        if quote >= 0:
            reason = reason[:quote].rstrip(": ") + " (the value is not shown)"
        reason = reason.replace("\r", " ").replace("\n", " ")[:200]
        super().__init__(reason)
        self.status = status
        self.reason = reason


_REASONS = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            505: "HTTP Version Not Supported"}


def _refusal_bytes(refusal: Refusal) -> bytes:
    body = f"{refusal.status} {_REASONS[refusal.status]}: {refusal.reason}\n".encode("latin-1", "replace")
    return (f"HTTP/1.1 {refusal.status} {_REASONS[refusal.status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Request:
    """A request read whole, waiting for its turn (pipelining) or handed over."""

    __slots__ = ("method", "url", "version", "headers", "body", "keep_alive", "upgrade")

    def __init__(self, method, url, version, headers, body, keep_alive) -> None:
        self.method, self.url, self.version = method, url, version
        self.headers, self.body, self.keep_alive = headers, body, keep_alive
        self.upgrade = False


class ServerConnection(asyncio.Protocol):
    """One client connection: reads its requests and hands them, one at a time and in order,
    to the server's delegate (`server.start_request`); `server.on_close(self)` at the end."""

    def __init__(self, server, params: HttpParams, address) -> None:
        self.server = server
        self.params = params
        remote_ip = address[0] if isinstance(address, tuple) and address else "0.0.0.0"
        self.context = RequestContext(remote_ip)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.served = False  # has carried a request
        self.exchange: Exchange | None = None  # the request being answered
        self.deadline: float | None = None  # when a client still sending a request's head or body is cut
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._pending: deque[_Request] = deque()  # read while another is answered (pipelining)
        self._in_message = False
        self._head_done = False
        self._head_size = 0  # request line and fields (then trailer fields), as llhttp reports them
        self._unparsed = 0  # bytes received since the parser last reported progress
        self._te_seen = False  # the request being read has Transfer-Encoding
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._refusal: Refusal | None = None
        self._final: bytes | None = None  # a refusal to send once the requests before it are answered
        self._body_declared = False  # the request being read has a Content-Length or chunked body
        self._lingering = -1  # bytes read and discarded after a refusal (-1: none sent)
        self._write_paused = False
        self._drained: list[asyncio.Future] = []  # writes waiting for the client to read
        self._written: asyncio.Future = self._loop.create_future()  # returned by writes that did not wait
        self._written.set_result(None)

    # --------------------------------------------------------------- asyncio Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.deadline = self._loop.time() + self.params.header_timeout

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.abort()
            return
        if self.closed:
            return
        if self._in_message:
            # A header or trailer line httptools holds until it ends, or a chunk's size line:
            # bytes without any parser progress, bounded here (every callback resets it).
            self._unparsed += len(data)
        try:
            self._parser.feed_data(data)
            if self._in_message and self._unparsed > MAX_HEAD:
                if self._head_done:
                    raise Refusal(400, f"a line of the chunked body or its trailer exceeds {MAX_HEAD} bytes")
                raise Refusal(431, f"the request head exceeds {MAX_HEAD} bytes")
        except httptools.HttpParserUpgrade:
            # An Upgrade (h2c, websocket) the gateway does not take: the request is answered
            # as HTTP/1.1; the bytes after it belong to the other protocol, so the connection
            # closes after the answer.
            if self._pending and not self._body_declared:
                self.transport.pause_reading()
                self._pending[-1].upgrade = True
            else:  # llhttp hands a body after an Upgrade head to the other protocol: not read
                self._refuse(Refusal(400, "a request body with Upgrade is not supported"))
        except (httptools.HttpParserError, Refusal) as exc:
            self._refuse(self._refusal or (exc if isinstance(exc, Refusal) else Refusal(400, _parser_reason(exc))))
        if self.exchange is None and self._pending:
            self._start_next()

    def eof_received(self) -> bool:
        # As Tornado: a client that shuts its sending side is gone (its request is cancelled);
        # after a refusal, the client has read it and is done.
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.deadline = None
        self._pending.clear()
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_exception(StreamClosedError())
                waiter.exception()  # retrieved: a writer that stopped waiting is not an error
        self._drained.clear()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection_lost()
        self.server.on_close(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drained = self._drained, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._head_done = False
        self._head_size = 0
        self._unparsed = 0
        self._url = b""
        self._headers = []
        self._body = []
        self._body_size = 0
        if self.deadline is None:  # a pipelined request: its head gets the full timeout too
            self.deadline = self._loop.time() + self.params.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        self._unparsed = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._unparsed = 0
        if self._head_done:
            # A trailer field (llhttp reports them after the head): bounded like a head,
            # and never one of the request's header fields (RFC 9110 §6.5.1); dropped.
            if self._head_size > MAX_HEAD:
                self._stop(Refusal(400, f"the trailer exceeds {MAX_HEAD} bytes"))
            return
        if self._head_size > MAX_HEAD:
            self._stop(Refusal(431, f"the request head exceeds {MAX_HEAD} bytes"))
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._parser.get_http_version() not in ("1.1", "1.0"):  # llhttp takes 0.9 and 2.0 lines too
            self._stop(Refusal(505, "only HTTP/1.1 and HTTP/1.0 are served here"))
        self._head_done = True
        self._head_size = 0  # trailer fields count from here
        self._unparsed = 0
        codings = 0
        expect_continue = False
        self._body_declared = self._te_seen = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                codings += 1
                self._te_seen = True
                self._body_declared = True
                if codings > 1 or value.strip().lower() != b"chunked":
                    # Only plain chunked, as Tornado: codings a relay may read otherwise are refused.
                    self._stop(Refusal(400, "unsupported Transfer-Encoding"))
            elif lower == b"content-length":
                self._body_declared = value != b"0"
                if int(value) > self.params.max_body_size:
                    self._stop(Refusal(413, f"the request body exceeds {self.params.max_body_size} bytes"))
            elif lower == b"expect":
                expect_continue = value.lower() == b"100-continue"
        if expect_continue and self.exchange is None and not self._pending:
            self.transport.write(CONTINUE)  # (a pipelined request's client sends its body unasked)
        self.deadline = self._loop.time() + self.params.header_timeout  # the body's turn

    def on_body(self, body: bytes) -> None:
        self._unparsed = 0
        self._body_size += len(body)
        if self._body_size > self.params.max_body_size:
            self._stop(Refusal(413, f"the request body exceeds {self.params.max_body_size} bytes"))
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        body = b"".join(self._body) if self._body else b""
        version = "HTTP/" + parser.get_http_version()
        # An HTTP/1.0 message with Transfer-Encoding has faulty framing: the connection
        # closes after it, whatever it asks (RFC 9112 §6.1).
        keep_alive = parser.should_keep_alive() and not (self._te_seen and version == "HTTP/1.0")
        self._pending.append(_Request(parser.get_method().decode("latin-1"), self._url.decode("latin-1"),
                                      version, self._headers, body, keep_alive))
        self._in_message = False
        self._headers, self._body = [], []
        self.deadline = None
        if len(self._pending) > 1 or self.exchange is not None:
            self.transport.pause_reading()  # the next requests wait in the kernel's buffer

    def _stop(self, refusal: Refusal) -> None:
        # llhttp wraps what a callback raises; the refusal itself is kept here.
        self._refusal = refusal
        raise refusal

    # ------------------------------------------------------------------- requests

    def _start_next(self) -> None:
        request = self._pending.popleft()
        self.served = True
        headers = httputil.HTTPHeaders()
        try:
            # Tornado's checks of each field too (its grammar, as its own parser applies it).
            for name, value in request.headers:
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
        except httputil.HTTPInputError as exc:
            self._pending.clear()  # what follows a refused request is not answered
            self._refuse(Refusal(400, str(exc)))
            return
        context = self.context
        if self.params.xheaders:
            context = context.forwarded(headers)
        exchange = Exchange(self, context, request)
        self.exchange = exchange
        delegate = self.server.start_request(self, exchange)
        try:
            delegate.headers_received(httputil.RequestStartLine(request.method, request.url, request.version), headers)
        except httputil.HTTPInputError as exc:  # e.g. an HTTP/1.1 request without Host
            self.exchange = None
            self.server.request_ended(self, exchange)
            self._pending.clear()
            self._refuse(Refusal(400, str(exc)))
            return
        try:
            if request.body:
                delegate.data_received(request.body)
            delegate.finish()
        except Exception:
            app_log.error("Uncaught exception", exc_info=True)
            self.abort()

    def exchange_done(self, exchange: Exchange) -> None:
        """The response is complete: the next request's turn, or the connection closes."""
        if exchange is not self.exchange:
            return
        self.exchange = None
        self.server.request_ended(self, exchange)
        if exchange.disconnect or self.closed:
            self.close()
        elif self._pending:
            self._loop.call_soon(self._resume)  # not in the handler's stack (as Tornado's sleep(0))
        else:
            self._idle()

    def _resume(self) -> None:
        if self.closed or self.exchange is not None:
            return
        if self._pending:
            self._start_next()
        else:
            self._idle()

    def _idle(self) -> None:
        if self._final is not None:  # the malformed request read after the ones answered
            self._linger(self._final)
            return
        self.deadline = self._loop.time() + self.params.header_timeout
        self.transport.resume_reading()

    def send(self, data: bytes) -> asyncio.Future:
        """Write to the client: a future resolved once the client has read enough that the
        buffer is below WRITE_HIGH_WATER, failed with StreamClosedError if it is gone."""
        if self.closed or self.transport.is_closing():
            failed = self._loop.create_future()
            failed.set_exception(StreamClosedError())
            failed.exception()  # retrieved: a caller that does not wait is not an error
            return failed
        self.transport.write(data)
        if not self._write_paused:
            return self._written
        waiter = self._loop.create_future()
        self._drained.append(waiter)
        return waiter

    # -------------------------------------------------------------------- closing

    def has_input(self) -> bool:
        """Bytes of a next request read already (an idle connection has none)."""
        return self._in_message or bool(self._pending)

    def close(self) -> None:
        """Close once what is written has gone out (cut at once if the client is not reading)."""
        if self.transport is None or self.closed:
            return
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _refuse(self, refusal: Refusal) -> None:
        log.info("refused a malformed request from %s: %s", self.context.remote_ip, refusal.reason)
        self._in_message = False
        if self.exchange is None and not self._pending:
            self._linger(_refusal_bytes(refusal))
        else:
            self.transport.pause_reading()  # nothing after it can be framed
            self._final = _refusal_bytes(refusal)

    def _linger(self, answer: bytes) -> None:
        """Send `answer`, then read and discard what the client still sends for a moment
        before closing: closing with unread input makes the kernel send a reset, which can
        destroy the answer before the client reads it (a 413 sent while a body is on its way)."""
        self._pending.clear()
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._lingering = 0
        self.deadline = self._loop.time() + LINGER_SECONDS
        self.transport.resume_reading()


def _parser_reason(exc: Exception) -> str:
    cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
    return str(cause or exc) or type(exc).__name__


class Exchange(httputil.HTTPConnection):
    """One request's side of the connection, as Tornado's RequestHandler writes its response."""

    __slots__ = ("conn", "context", "method", "url", "version", "keep_alive", "disconnect", "finished",
                 "_close_callback", "_chunked", "_remaining")

    def __init__(self, conn: ServerConnection, context: RequestContext, request: _Request) -> None:
        self.conn = conn
        self.context = context
        self.method = request.method
        self.url = request.url
        self.version = request.version
        self.keep_alive = request.keep_alive
        self.disconnect = not request.keep_alive or request.upgrade
        self.finished = False
        self._close_callback = None
        self._chunked = False
        self._remaining: int | None = None

    def set_close_callback(self, callback) -> None:
        self._close_callback = callback

    def write_headers(self, start_line, headers: httputil.HTTPHeaders, chunk: bytes | None = None) -> asyncio.Future:
        code = start_line.code
        has_body = self.method != "HEAD" and code not in NO_BODY_STATUSES and code >= 200
        self._chunked = has_body and "Content-Length" not in headers and self.version == "HTTP/1.1"
        if has_body and not self._chunked and "Content-Length" not in headers:
            self.disconnect = True  # an HTTP/1.0 body without a length ends with the connection
        if self.version == "HTTP/1.1":
            if self.disconnect:
                headers["Connection"] = "close"
        elif not self.disconnect:
            headers["Connection"] = "keep-alive"
        if self._chunked:
            headers["Transfer-Encoding"] = "chunked"
        if not has_body:
            self._remaining = 0
        elif "Content-Length" in headers:
            self._remaining = int(headers["Content-Length"])
        lines = [f"HTTP/1.1 {code} {start_line.reason}"]
        for name, value in headers.get_all():
            line = f"{name}: {value}"
            if "\n" in line or "\r" in line:
                raise ValueError(f"illegal characters (CR or LF) in header: {line!r}")
            lines.append(line)
        lines.append("\r\n")
        data = "\r\n".join(lines).encode("latin-1")
        if chunk:
            data += self._frame(chunk)
        return self.conn.send(data)

    def _frame(self, chunk: bytes) -> bytes:
        if self._remaining is not None:
            self._remaining -= len(chunk)
            if self._remaining < 0:
                self.conn.abort()  # stop the framing error from going further
                raise httputil.HTTPOutputError("Tried to write more data than Content-Length")
        if self._chunked:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunk else b""
        return chunk

    def write(self, chunk: bytes) -> asyncio.Future:
        return self.conn.send(self._frame(chunk))

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._remaining and not self.conn.closed:
            self.conn.abort()
            raise httputil.HTTPOutputError(f"Tried to write {self._remaining} bytes less than Content-Length")
        if self._chunked:
            self.conn.send(b"0\r\n\r\n")
        self._close_callback = None
        self.conn.exchange_done(self)

    def close(self) -> None:
        """Cut the connection (an answer that cannot be completed), unless this request is done."""
        if not self.finished or self.conn.exchange is self:
            self.conn.abort()

    def connection_lost(self) -> None:
        callback, self._close_callback = self._close_callback, None
        if callback is not None:
            try:
                callback()
            except Exception:
                app_log.error("Exception in the connection close callback", exc_info=True)
