"""HTTP/1.1 framing for the upstream client: request serialization, hop-by-hop headers and the
response head/body parser (llhttp via httptools, plus the client's own rules). No I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import NoReturn

import httptools
from tornado import httputil

from services.proxy.upstream.urls import UpstreamTarget

HeadersArg = Mapping[str, str] | Iterable[tuple[str, str]] | httputil.HTTPHeaders | None


# Headers the client owns (framing, connection management) or that describe one hop only.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def hop_by_hop_names(connection_values: Iterable[str]) -> frozenset[str]:
    """Lower-case names of the fields that describe one hop only, given the values of a
    message's Connection field(s): the fixed set plus every name the Connection field
    lists (RFC 9110 §7.6.1). A proxy forwards none of them, in either direction."""
    if not connection_values:  # the usual case: no Connection field
        return _HOP_BY_HOP
    named = {token.strip().lower() for value in connection_values for token in value.split(",")}
    named.discard("")
    return _HOP_BY_HOP | named if named else _HOP_BY_HOP


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_READ_SIZE = 65536
_MAX_1XX = 10


def _header_items(headers: HeadersArg) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, httputil.HTTPHeaders):
        return list(headers.get_all())
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _serialize_request(method: str, target: UpstreamTarget, headers: HeadersArg, body: bytes | None) -> bytes:
    """The request head (and body) as bytes, ready for one write.

    Framing headers are the client's own; hop-by-hop headers of the caller are dropped;
    names must be tokens and values must not contain CR, LF or NUL (no header injection).
    """
    items = _header_items(headers)
    dropped = hop_by_hop_names(value for name, value in items if name.lower() == "connection")
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host_header}"]
    for name, value in items:
        if name.lower() in dropped:
            continue
        if not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"invalid upstream request header {name!r}")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    elif method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    try:
        head = "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("upstream request headers must be latin-1") from None
    return head + body if body else head


class _EarlyClose(Exception):
    """Internal: the connection closed before response headers (maybe a stale pooled one)."""

    def __init__(self, sent: bool) -> None:
        super().__init__("connection closed before response headers")
        self.sent = sent


class _Malformed(Exception):
    """Internal: llhttp or a rule of ours refused the response; the message says why."""


class _Stop(Exception):
    """Internal: raised inside a parser callback to stop llhttp; the reason is on `_Parse`."""


class ResponseHeaders(Mapping[str, str]):
    """The header fields of an upstream response, read-only, names case-insensitive.

    A field sent on several lines reads as its values joined with ", " (RFC 9110 §5.3);
    `get_list` gives them apart and `get_all` the lines as received. llhttp has already
    refused names that are not tokens and values with control characters, so nothing is
    validated again here (that was most of the cost of a head in tornado.httputil).
    """

    __slots__ = ("_fields", "_index")

    def __init__(self, fields: list[tuple[str, str]], index: dict[str, list[str]] | None = None) -> None:
        """`fields` as received; `index` (lower-case name → values), when the caller built it already."""
        self._fields = fields
        if index is None:
            index = {}
            for name, value in fields:
                index.setdefault(name.lower(), []).append(value)
        self._index = index

    def __getitem__(self, name: str) -> str:
        values = self._index[name.lower()]
        return values[0] if len(values) == 1 else ", ".join(values)

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        # Not Mapping.get: a missing field is the common case, and KeyError is costly.
        values = self._index.get(name.lower())
        if values is None:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def get_list(self, name: str) -> list[str]:
        """Every value of field `name`, one per line it was sent on."""
        return list(self._index.get(name.lower(), ()))

    def get_all(self) -> Iterator[tuple[str, str]]:
        """(name, value) per header line, in the order received."""
        return iter(self._fields)

    def __repr__(self) -> str:
        return f"ResponseHeaders({self._fields!r})"


class _Parse:
    """What llhttp (via httptools) reports about one response, and what may follow it.

    llhttp does the framing: line endings (CRLF only: a bare LF is refused at once rather
    than waited on), the status line, field syntax (no obs-fold, no NUL or other control
    characters, no space before the colon), Content-Length (digits only, one value, not
    together with Transfer-Encoding), chunk sizes, and the end of the body. On top of it:
    only HTTP/1.0 and 1.1, status 100-599, interim 1xx heads skipped (at most _MAX_1XX),
    trailer fields dropped, and whether the connection may carry another request.
    """

    # Defaults on the class: one is made per upstream response, and most stay as they are.
    head_size = 0
    reason = b""
    status = 0
    version = ""
    headers: ResponseHeaders | None = None
    content_length: int | None = None
    interim = 0
    began = False  # a response (or garbage) started: an early close is not a clean one
    head_done = False
    complete = False
    until_close = False  # no length and not chunked: the body ends when the connection does
    reusable = False
    extra = False  # bytes followed the end of the response
    failure: str | None = None  # why the head is refused
    broken: str | None = None  # why the body is, once the head was good

    def __init__(self, method: str, max_head: int) -> None:
        # The parser refers back to this object (its callbacks): UpstreamResponse breaks
        # the cycle when the response ends, so nothing waits for the cyclic collector.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.method = method
        self.max_head = max_head
        self.fields: list[tuple[str, str]] = []
        self.index: dict[str, list[str]] = {}  # lower-case name → values, for ResponseHeaders
        self.body: list[bytes] = []  # body bytes parsed and not yet handed to the consumer

    def fail(self, reason: str) -> NoReturn:
        self.failure = reason
        raise _Stop

    # ----------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # Something after the end of the response: an answer nobody asked for (the next
            # request's caller would get it) or garbage. Stop; the connection is closed.
            self.extra = True
            raise _Stop
        self.began = True

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # trailer fields after a chunked body: dropped
        self.head_size += len(name) + len(value) + 4
        text = name.decode("latin-1")
        value_text = value.decode("latin-1").rstrip(" \t")
        self.fields.append((text, value_text))
        key = text.lower()
        values = self.index.get(key)
        if values is None:
            self.index[key] = [value_text]
        else:
            values.append(value_text)

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self.fail(f"HTTP/{version} is not HTTP/1.x")
        if self.head_size > self.max_head:
            self.fail(f"response headers larger than {self.max_head} bytes")
        if not 100 <= status <= 599:
            self.fail(f"status code {status:03d} is outside 100-599")
        if status < 200:
            if status == 101:
                self.fail("unexpected protocol switch (101)")
            self.interim += 1
            if self.interim > _MAX_1XX:
                self.fail(f"more than {_MAX_1XX} interim 1xx responses")
            self.fields, self.index, self.head_size, self.reason = [], {}, 0, b""
            return  # llhttp ends this interim message and parses the next head
        headers = ResponseHeaders(self.fields, self.index)
        transfer_encoding = headers.get("Transfer-Encoding")
        if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
            # Another transfer coding (gzip, "gzip, chunked" …) would reach the client
            # undecoded under a content type that does not say so.
            self.fail(f"unsupported Transfer-Encoding {transfer_encoding!r}")
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None  # llhttp checked the digits
        self.status, self.version, self.headers, self.head_done = status, "HTTP/" + version, headers, True
        no_body = self.method == "HEAD" or status in (204, 304)
        self.until_close = not no_body and transfer_encoding is None and length is None
        # Reuse only when the framing leaves no doubt where this response ends: never a
        # body-less status or HEAD that still announces a length or a coding, never one
        # delimited by the close, never Connection: close or HTTP/1.0 without keep-alive.
        self.reusable = (
            parser.should_keep_alive()
            and not self.until_close
            and not (no_body and (length is not None or transfer_encoding is not None))
        )
        if self.method == "HEAD":
            # llhttp does not know the request method and would wait for the body the
            # head describes; the response ends here, and its connection is not reused.
            self.reusable = False
            self.complete = True
            raise _Stop

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.head_done:  # an interim 1xx ends too, with the final head still to come
            self.complete = True

    def feed(self, data: bytes) -> None:
        """Hand bytes to llhttp. A broken head raises `_Malformed`; a broken body sets
        `broken` (the body parsed before the fault is still delivered first)."""
        parser = self.parser
        if parser is None or self.broken is not None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise _Malformed("unexpected protocol switch") from None
        except httptools.HttpParserError as exc:
            if self.failure is not None:
                raise _Malformed(self.failure) from None
            if self.complete:
                self.extra = True  # garbage after the end: the response stands, the connection goes
            elif self.head_done:
                self.broken = str(exc) or type(exc).__name__
            else:
                raise _Malformed(str(exc) or type(exc).__name__) from None
