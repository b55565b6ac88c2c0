"""LeanHandler: RequestHandler's response API for the hot path (/mcp/) without Tornado's
per-request machinery (routing, UI modules, transforms, ETags); LeanDispatch runs it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from urllib.parse import unquote_to_bytes

import tornado
from tornado import httputil
from tornado.escape import utf8
from tornado.web import HTTPError

from handlers.base import SECURITY_HEADERS, Answers
from services.common.logs import REQUEST_ID_HEADER, accept_request_id

log = logging.getLogger("gateway.http")
app_log = logging.getLogger("tornado.application")

# As RequestHandler._VALID_HEADER_CHARS: a value never carries CR, LF or other controls.
_VALID_HEADER_VALUE = re.compile(r"[\x09\x20-\x7e\x80-\xff]*")
_NO_BODY_STATUSES = frozenset({204, 304})
_REPRESENTATION_HEADERS = ("Content-Encoding", "Content-Language", "Content-Type")
SERVER_HEADER = f"TornadoServer/{tornado.version}"  # what every other route sends


class _Date:
    """The Date header's value, formatted once a second rather than once per answer."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, httputil.format_timestamp(second)
        return cls.value


class LeanRequest:
    """What a handler reads of its request (the fields of HTTPServerRequest it uses)."""

    __slots__ = ("method", "path", "headers", "body", "remote_ip", "connection", "_start_time", "_finish_time")

    def __init__(self, connection, start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> None:
        self.connection = connection
        self.method = start_line.method
        self.path = start_line.path.partition("?")[0]  # (RequestStartLine's "path" is the whole target)
        self.headers = headers
        self.body = b""
        self.remote_ip = connection.context.remote_ip
        self._start_time = time.time()
        self._finish_time: float | None = None

    def request_time(self) -> float:
        end = self._finish_time if self._finish_time is not None else time.time()
        return end - self._start_time


class LeanHandler(Answers):
    """The subset of tornado.web.RequestHandler the proxy uses, with the same names and
    behaviour: status, headers, write / flush / finish, errors through write_error, the
    access log through the application's log_function, on_connection_close. Not there:
    output transforms, cookies, ETags and 304s, templates, request body arguments."""

    SUPPORTED_METHODS: tuple[str, ...] = ("GET", "POST", "DELETE", "OPTIONS")
    route_group = "other"
    time_to_head: float | None = None  # seconds from the request's start to the answer's head

    def __init__(self, application, request: LeanRequest, **kwargs) -> None:
        self.application = application
        self.request = request
        # As RequestIdentity (BaseHandler): the id every answer carries, the access log's fields.
        self.request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        self.log_fields: dict[str, object] = {}
        self._headers_written = False
        self._finished = False
        self.clear()
        request.connection.set_close_callback(self.on_connection_close)
        self.initialize(**kwargs)

    def initialize(self) -> None:
        pass

    def prepare(self):
        return None

    def on_connection_close(self) -> None:
        pass

    def on_finish(self) -> None:
        pass

    # -------------------------------------------------------------------- status

    def clear(self) -> None:
        self._headers = httputil.HTTPHeaders()
        self._headers["Server"] = SERVER_HEADER
        self._headers["Content-Type"] = "text/html; charset=UTF-8"
        self._headers["Date"] = _Date.now()
        self.set_default_headers()
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = "OK"

    def set_default_headers(self) -> None:
        # BaseHandler's for an API handler.
        self._headers[REQUEST_ID_HEADER] = self.request_id
        for name, value in SECURITY_HEADERS:
            self._headers[name] = value

    def options(self, *args) -> None:
        # CORS preflight never needs authentication.
        self.set_status(204)

    def set_status(self, status_code: int, reason: str | None = None) -> None:
        self._status_code = status_code
        if reason is not None:
            # As Tornado: a reason phrase outside the grammar (or with "<") is replaced.
            self._reason = reason if "<" not in reason and httputil._ABNF.reason_phrase.fullmatch(reason) \
                else "Unknown"
        else:
            self._reason = httputil.responses.get(status_code, "Unknown")

    def get_status(self) -> int:
        return self._status_code

    def set_header(self, name: str, value) -> None:
        self._headers[name] = self._header_value(value)

    def clear_header(self, name: str) -> None:
        if name in self._headers:
            del self._headers[name]

    @staticmethod
    def _header_value(value) -> str:
        if isinstance(value, int):
            return str(value)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        elif not isinstance(value, str):
            raise TypeError(f"Unsupported header value {value!r}")
        if _VALID_HEADER_VALUE.fullmatch(value) is None:
            raise ValueError(f"Unsafe header value {value!r}")
        return value

    # -------------------------------------------------------------------- output

    def write(self, chunk) -> None:
        if self._finished:
            raise RuntimeError("Cannot write() after finish()")
        if isinstance(chunk, dict):
            chunk = json.dumps(chunk).replace("</", "<\\/")
            self.set_header("Content-Type", "application/json; charset=UTF-8")
        self._write_buffer.append(utf8(chunk))

    def flush(self):
        if self.time_to_head is None:
            self.time_to_head = self.request.request_time()
        chunk = b"".join(self._write_buffer) if self._write_buffer else b""
        self._write_buffer = []
        if self.request.method == "HEAD":  # the head of the answer a GET would get, as Tornado
            chunk = b""
        connection = self.request.connection
        if not self._headers_written:
            self._headers_written = True
            start_line = httputil.ResponseStartLine("", self._status_code, self._reason)
            return connection.write_headers(start_line, self._headers, chunk)
        return connection.write(chunk)

    def finish(self, chunk=None):
        if self._finished:
            raise RuntimeError("finish() called twice")
        if chunk is not None:
            self.write(chunk)
        if not self._headers_written:
            if self._status_code in _NO_BODY_STATUSES or 100 <= self._status_code < 200:
                if self._write_buffer:
                    raise RuntimeError(f"Cannot send body with status code HTTP{self._status_code}")
                for name in _REPRESENTATION_HEADERS:
                    self.clear_header(name)
            elif "Content-Length" not in self._headers:
                self._headers["Content-Length"] = str(sum(len(part) for part in self._write_buffer))
        connection = self.request.connection
        connection.set_close_callback(None)
        future = self.flush()
        connection.finish()
        self.request._finish_time = time.time()
        self.application.settings["log_function"](self)
        self._finished = True
        self.on_finish()
        return future

    # -------------------------------------------------------------------- errors

    def send_error(self, status_code: int = 500, **kwargs) -> None:
        if self._headers_written:
            log.error("Cannot send error response after headers written")
            if not self._finished:
                try:
                    self.finish()
                except Exception:
                    log.error("Failed to flush partial response", exc_info=True)
            return
        self.clear()
        reason = kwargs.get("reason")
        exception = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exception, HTTPError) and exception.reason:
            reason = exception.reason
        self.set_status(status_code, reason=reason)
        try:
            self.write_error(status_code, **kwargs)
        except Exception:
            app_log.error("Uncaught exception in write_error", exc_info=True)
        if not self._finished:
            self.finish()

    def _handle_exception(self, exc: BaseException, exc_info) -> None:
        try:
            self.log_exception(*exc_info)
        except Exception:
            app_log.error("Error in exception logger", exc_info=True)
        if not self._finished:
            self.send_error(exc.status_code if isinstance(exc, HTTPError) else 500, exc_info=exc_info)

    # ------------------------------------------------------------------- running

    async def _execute(self, *path_args: bytes) -> None:
        """As RequestHandler._execute: the method's handler, then finish(); an exception
        becomes write_error's answer (and a log line from log_exception)."""
        try:
            method = self.request.method
            if method not in self.SUPPORTED_METHODS:
                raise HTTPError(405)
            try:
                args = [arg.decode("utf-8") for arg in path_args]
            except UnicodeDecodeError:
                raise HTTPError(400, "Invalid unicode in url") from None
            result = self.prepare()
            if result is not None:
                await result
            if self._finished:
                return
            result = getattr(self, method.lower())(*args)
            if result is not None:
                await result
            if not self._finished:
                self.finish()
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                if not self._finished:
                    try:
                        self.send_error(500)
                    except Exception:
                        app_log.error("Exception in exception handler", exc_info=True)
                raise
            try:
                self._handle_exception(exc, (type(exc), exc, exc.__traceback__))
            except Exception:
                app_log.error("Exception in exception handler", exc_info=True)


class LeanRoute(httputil.HTTPServerConnectionDelegate):
    """A route served by a LeanHandler: AdmissionHTTPServer asks it first (`match`); in
    the Application's route table too, so that the table lists every route."""

    def __init__(self, pattern: str, handler_class) -> None:
        self.regex = re.compile(pattern + "$")  # as Tornado's PathMatches
        self.handler_class = handler_class
        self.application = None  # the Application (make_app sets it)

    def match(self, target: str) -> list[bytes] | None:
        """The captured groups of a request target on this route, %-decoded (as Tornado's
        routing; the handler decodes UTF-8), or None when it is not this route's."""
        found = self.regex.match(target.partition("?")[0])
        return None if found is None else [unquote_to_bytes(group) for group in found.groups()]

    def start_request(self, server_conn, request_conn, path_args: list[bytes] | None = None) -> LeanDispatch:
        return LeanDispatch(self, request_conn, path_args)


class LeanDispatch(httputil.HTTPMessageDelegate):
    """One request on a LeanRoute: its request built from the head, its body collected, the
    handler run in a task of its own (as Tornado runs RequestHandler._execute)."""

    __slots__ = ("route", "connection", "path_args", "request", "chunks")

    def __init__(self, route: LeanRoute, connection, path_args: list[bytes] | None) -> None:
        self.route = route
        self.connection = connection
        self.path_args = path_args  # None: reached through the Application, matched at the head
        self.request: LeanRequest | None = None
        self.chunks: list[bytes] = []

    def headers_received(self, start_line, headers) -> None:
        self.request = LeanRequest(self.connection, start_line, headers)
        if self.path_args is None:
            self.path_args = self.route.match(self.request.path) or []

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        request = self.request
        if self.chunks:
            request.body = b"".join(self.chunks)
        route = self.route
        handler = route.handler_class(route.application, request)
        asyncio.get_running_loop().create_task(handler._execute(*self.path_args))

    def on_connection_close(self) -> None:
        self.chunks = []
