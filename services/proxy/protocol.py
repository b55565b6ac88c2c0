"""MCP as the proxy sees it: JSON-RPC body parsing, scopes, protocol era, header checks, SSE framing.

Pure functions and small value types, no I/O, so the proxy handler stays thin and every
rule here is unit-tested on its own.

- `parse_body(bytes) -> RpcBody`: one JSON parse of a POST body (one message, or a batch
  for 2025-03-26) into `RpcMessage` values: kind, method, id, target (tool name for
  ``tools/call``, name for ``prompts/get``, uri for ``resources/*``, taskId for
  ``tasks/*``, the ref for ``completion/complete``) and the scope the method needs.
  Malformed input raises `ProtocolError` carrying the JSON-RPC code (-32700, -32600,
  -32602) and the HTTP status to answer with.
- Scopes: ``mcp:connect`` covers what sets up and keeps a connection and only reads
  catalogs: ``initialize``, ``server/discover``, ``ping``, ``notifications/*``, any
  ``*/list``, ``subscriptions/listen``, ``resources/subscribe`` / ``unsubscribe``,
  ``logging/setLevel`` (it only tunes what the session's own stream carries, runs no
  tool and reads no resource) and JSON-RPC responses the client posts back (answers to
  the server's own sampling/elicitation/roots requests). Everything else, unknown
  methods included, needs ``mcp:invoke``: ``tools/call``, ``resources/read``,
  ``prompts/get``, ``completion/complete`` (it reveals prompt and resource data),
  ``tasks/get|result|update|cancel`` (they continue an invocation).
- `detect_era(http_method, headers, body) -> Era`: legacy (2025-11-25 and earlier, with
  the initialize handshake and sessions) or modern (2026-07-28, per-request ``_meta``),
  following mcp-2026-07-28.md §5.1: body first, header as a cross-check. Only a header
  contradicting the body's version claim is refused (-32020); anything else is
  forwarded for the upstream to answer, so the gateway never makes up era evidence.
- `check_modern_headers(headers, message)`: a 2026 request's ``Mcp-Method`` /
  ``Mcp-Name`` must agree with the body, after decoding ``=?base64?…?=`` values;
  otherwise `ProtocolError` -32020 (HeaderMismatch, HTTP 400). ``Mcp-Param-*`` headers
  are not checked here: they depend on the tool's schema, and an intermediary that does
  not know it forwards them untouched.
- The proxy's short forms: `parse_message` (one `RpcMessage`, kind "batch" for a batch),
  `check_routing_headers(message, headers)` (era cross-check + header check: required
  for modern requests, compared when sent on legacy ones), `era_of` ("2025"/"2026") and
  `outcome_of` (the outcome label).
- `SseParser`: incremental SSE framing. ``feed(bytes)`` returns the complete events, each
  with its exact raw bytes (to forward unchanged) and its parsed fields.
- `response_outcome(data, request_id)`: finds the JSON-RPC response to a request in a
  JSON body or an SSE event's data, for usage records: "ok", "tool_error" or the code;
  "unknown" (`UNKNOWN`) for an answer nested too deeply to parse. No input makes it
  raise: it runs on upstream bytes in the middle of a relay.
- `jsonrpc_error(code, message, id=None) -> bytes`: a JSON-RPC error body.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "CONNECT_METHODS",
    "HEADER_MISMATCH",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "LEGACY_VERSIONS",
    "MODERN_VERSIONS",
    "PARSE_ERROR",
    "SCOPE_CONNECT",
    "SCOPE_INVOKE",
    "Era",
    "Outcome",
    "ProtocolError",
    "RpcBody",
    "RpcMessage",
    "SseEvent",
    "SseParser",
    "UNKNOWN",
    "check_modern_headers",
    "decode_header_value",
    "detect_era",
    "jsonrpc_error",
    "parse_body",
    "response_outcome",
    "scope_for",
]

# JSON-RPC 2.0 and MCP error codes the gateway itself may emit.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020  # MCP 2026-07-28 HeaderMismatch (renumbered from -32001)

SCOPE_CONNECT = "mcp:connect"
SCOPE_INVOKE = "mcp:invoke"

# Protocol versions that use the initialize handshake, and those with per-request _meta.
LEGACY_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
MODERN_VERSIONS = frozenset({"2026-07-28"})
# JSON-RPC batches existed in 2025-03-26 only (2024-11-05 inherited them from JSON-RPC).
_BATCH_VERSIONS = frozenset({"2024-11-05", "2025-03-26"})
_DEFAULT_LEGACY_VERSION = "2025-03-26"  # what a server assumes without the header

META_PROTOCOL_VERSION = "io.modelcontextprotocol/protocolVersion"

CONNECT_METHODS = frozenset(
    {
        "initialize",
        "server/discover",
        "ping",
        "subscriptions/listen",
        "resources/subscribe",
        "resources/unsubscribe",
        "logging/setLevel",
    }
)

# Methods whose target is named in params, and by which field. For tools/call,
# prompts/get and resources/read this is also what a 2026 client mirrors in Mcp-Name.
_TARGET_FIELD = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
    "tasks/get": "taskId",
    "tasks/result": "taskId",
    "tasks/update": "taskId",
    "tasks/cancel": "taskId",
}
# What Mcp-Name mirrors. Required by 2026-07-28 on the first three; the Tasks extension
# (SEP-2663) adds the task methods, checked only when sent (the SDK servers do not ask).
_MCP_NAME_FIELD = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "tasks/get": "taskId",
    "tasks/update": "taskId",
    "tasks/cancel": "taskId",
}
_MCP_NAME_REQUIRED = frozenset({"tools/call", "prompts/get", "resources/read"})
# The target is what access rules are written against: without it a call cannot be judged.
_TARGET_REQUIRED = frozenset({"tools/call", "prompts/get", "resources/read"})


def scope_for(method: str | None) -> str:
    """The scope a JSON-RPC method needs (responses, method None, need only connect)."""
    if (
        method is None
        or method in CONNECT_METHODS
        or method.startswith("notifications/")
        or method.endswith("/list")
    ):
        return SCOPE_CONNECT
    return SCOPE_INVOKE


# --------------------------------------------------------------------------- errors


class ProtocolError(Exception):
    """A request the gateway refuses before forwarding it; answer `body()` with `http_status`."""

    def __init__(
        self,
        code: int,
        message: str,
        id: str | int | None = None,
        *,
        http_status: int = 400,
        data: Any = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.id = id
        self.data = data

    def body(self) -> bytes:
        return jsonrpc_error(self.code, self.message, self.id, data=self.data)


def jsonrpc_error(code: int, message: str, id: str | int | None = None, *, data: Any = None) -> bytes:
    """A JSON-RPC 2.0 error response body (``id`` null when the request's id is unknown)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return json.dumps({"jsonrpc": "2.0", "id": id, "error": error}, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- JSON-RPC bodies

Kind = Literal["request", "notification", "response", "batch"]


@dataclass(frozen=True, slots=True)
class RpcMessage:
    """One JSON-RPC message of a POST body, as the proxy needs it."""

    kind: Kind
    method: str | None  # None for responses
    id: str | int | None  # None for notifications
    target: str | None  # tool / prompt name, resource uri, task id, completion ref
    scope: str  # SCOPE_CONNECT or SCOPE_INVOKE
    params: Mapping[str, Any] | None = field(default=None, repr=False)
    meta_version: str | None = None  # params._meta["io.modelcontextprotocol/protocolVersion"]
    members: tuple[RpcMessage, ...] = ()  # kind "batch" (parse_message) only

    @property
    def is_request(self) -> bool:
        return self.kind == "request"

    @property
    def needs_invoke(self) -> bool:
        return self.scope == SCOPE_INVOKE


@dataclass(frozen=True, slots=True)
class RpcBody:
    """A parsed POST body: one message, or a batch (2025-03-26)."""

    messages: tuple[RpcMessage, ...]
    is_batch: bool

    @property
    def scope(self) -> str:
        """The scope the whole body needs: invoke if any message needs it."""
        for message in self.messages:
            if message.scope == SCOPE_INVOKE:
                return SCOPE_INVOKE
        return SCOPE_CONNECT

    @property
    def first(self) -> RpcMessage:
        return self.messages[0]

    @property
    def requests(self) -> tuple[RpcMessage, ...]:
        return tuple(m for m in self.messages if m.kind == "request")

    @property
    def has_requests(self) -> bool:
        return any(m.kind == "request" for m in self.messages)

    @property
    def only_responses_or_notifications(self) -> bool:
        """True when the upstream answers 202 with no body (nothing to wait for)."""
        return not self.has_requests


def _valid_id(value: Any) -> bool:
    # MCP: ids are strings or integers, never null; bool is an int subclass in Python.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _completion_target(params: Mapping[str, Any]) -> str | None:
    ref = params.get("ref")
    if isinstance(ref, Mapping):
        value = ref.get("name") if ref.get("type") == "ref/prompt" else ref.get("uri")
        if isinstance(value, str):
            return value
    return None


def _parse_message(obj: Any) -> RpcMessage:
    if not isinstance(obj, dict):
        raise ProtocolError(INVALID_REQUEST, "a JSON-RPC message must be an object")
    raw_id = obj.get("id")
    reply_id = raw_id if _valid_id(raw_id) else None
    if obj.get("jsonrpc") != "2.0":
        raise ProtocolError(INVALID_REQUEST, 'jsonrpc must be "2.0"', reply_id)
    has_id = "id" in obj
    if has_id and not _valid_id(raw_id):
        raise ProtocolError(INVALID_REQUEST, "id must be a string or an integer")
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise ProtocolError(INVALID_REQUEST, "method must be a non-empty string", reply_id)
        params = obj.get("params")
        if params is not None and not isinstance(params, dict):
            raise ProtocolError(INVALID_PARAMS, "params must be an object", reply_id)
        target: str | None = None
        meta_version: str | None = None
        if params is not None:
            field_name = _TARGET_FIELD.get(method)
            if field_name is not None:
                value = params.get(field_name)
                target = value if isinstance(value, str) else None
            elif method == "completion/complete":
                target = _completion_target(params)
            meta = params.get("_meta")
            if isinstance(meta, dict):
                claimed = meta.get(META_PROTOCOL_VERSION)
                if claimed is not None:
                    if not isinstance(claimed, str):
                        raise ProtocolError(
                            INVALID_PARAMS, f"_meta {META_PROTOCOL_VERSION} must be a string", reply_id
                        )
                    meta_version = claimed
        if has_id and target is None and method in _TARGET_REQUIRED:
            raise ProtocolError(
                INVALID_PARAMS, f"{method} needs params.{_TARGET_FIELD[method]} (a string)", reply_id
            )
        return RpcMessage(
            kind="request" if has_id else "notification",
            method=method,
            id=raw_id if has_id else None,
            target=target,
            scope=scope_for(method),
            params=params,
            meta_version=meta_version,
        )
    if has_id and ("result" in obj) != ("error" in obj):
        return RpcMessage(kind="response", method=None, id=raw_id, target=None, scope=SCOPE_CONNECT)
    raise ProtocolError(INVALID_REQUEST, "not a JSON-RPC request, notification or response", reply_id)


def parse_body(body: bytes | str) -> RpcBody:
    """Parse a POST body once; raise `ProtocolError` (-32700 / -32600 / -32602) if malformed."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(PARSE_ERROR, f"parse error: {exc}") from None
    except RecursionError:  # "[[[[…" nested deeper than the interpreter's stack
        raise ProtocolError(PARSE_ERROR, "parse error: nested too deeply") from None
    if isinstance(data, list):
        if not data:
            raise ProtocolError(INVALID_REQUEST, "empty batch")
        return RpcBody(tuple(_parse_message(item) for item in data), True)
    return RpcBody((_parse_message(data),), False)


def parse_message(body: bytes | str) -> RpcMessage:
    """`parse_body` as one message: a batch becomes kind "batch" (method of its first
    member, no id, no target) that needs invoke if any member does; its members are kept."""
    parsed = parse_body(body)
    if not parsed.is_batch:
        return parsed.first
    first = parsed.first
    return RpcMessage(
        kind="batch",
        method=first.method,
        id=None,
        target=None,
        scope=parsed.scope,
        members=parsed.messages,
    )


def _as_body(message: RpcBody | RpcMessage | None) -> RpcBody | None:
    if message is None or isinstance(message, RpcBody):
        return message
    if message.kind == "batch":
        return RpcBody(message.members, True)
    return RpcBody((message,), False)


# --------------------------------------------------------------------------- protocol era


class HeaderLookup(Protocol):
    def get(self, name: str, default: Any = None, /) -> Any: ...


def _header(headers: HeaderLookup | Mapping[str, str] | None, name: str) -> str | None:
    """A header value, case-insensitively for plain dicts too (Tornado's HTTPHeaders already is)."""
    if headers is None:
        return None
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        lowered = name.lower()
        for key, candidate in headers.items():
            if key.lower() == lowered:
                return candidate.strip()
        return None
    return value.strip() if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class Era:
    """The protocol era of one HTTP request, and the version it speaks.

    ``source`` says how it was decided: "claim" (the body's _meta), "header"
    (MCP-Protocol-Version), "initialize" (the initialize params) or "default" (nothing
    said; 2025-03-26 assumed, as the spec tells servers to).
    """

    era: Literal["legacy", "modern"]
    version: str
    source: Literal["claim", "header", "initialize", "default"]

    @property
    def is_modern(self) -> bool:
        return self.era == "modern"


def detect_era(
    http_method: str,
    headers: HeaderLookup | Mapping[str, str] | None,
    body: RpcBody | RpcMessage | None,
) -> Era:
    """Legacy (handshake, sessions) or modern (2026-07-28) per mcp-2026-07-28.md §5.1.

    The body decides, the ``MCP-Protocol-Version`` header cross-checks. Raises
    `ProtocolError` -32020 (HTTP 400) only when the header contradicts the body's
    ``_meta`` version claim or is missing next to one. Everything else is forwarded for
    the upstream to judge (the gateway must not make up era evidence): a modern or
    unknown header version without a claim comes back as modern at that version, and
    the upstream answers -32602 or -32022 itself; a batch is legacy whatever the header.
    """
    parsed = _as_body(body)
    header_version = _header(headers, "MCP-Protocol-Version") or None
    if http_method != "POST" or parsed is None:
        # Rule 1: GET streams and DELETE exist only in the legacy era.
        if header_version:
            return Era("legacy", header_version, "header")
        return Era("legacy", _DEFAULT_LEGACY_VERSION, "default")
    if parsed.is_batch or parsed.first.kind == "response":
        # Rule 2: batches and client-posted responses are legacy.
        if header_version:
            return Era("legacy", header_version, "header")
        return Era("legacy", _DEFAULT_LEGACY_VERSION, "default")
    message = parsed.first
    if message.meta_version is not None:
        # Rule 3: a _meta claim means modern at that version; the header must agree.
        if header_version != message.meta_version:
            found = repr(header_version) if header_version else "missing"
            raise ProtocolError(
                HEADER_MISMATCH,
                f"MCP-Protocol-Version header ({found}) does not match params._meta "
                f"{META_PROTOCOL_VERSION} ({message.meta_version!r})",
                message.id,
            )
        return Era("modern", message.meta_version, "claim")
    if message.method == "initialize":
        # Rule 4: the legacy handshake.
        offered = (message.params or {}).get("protocolVersion")
        if isinstance(offered, str) and offered:
            return Era("legacy", offered, "initialize")
    if header_version is None:
        # Rule 5: nothing says otherwise, so the spec's default.
        return Era("legacy", _DEFAULT_LEGACY_VERSION, "default")
    if header_version in LEGACY_VERSIONS:
        return Era("legacy", header_version, "header")
    # Rules 5 and 6: a modern or unknown version without a claim (or a notification).
    return Era("modern", header_version, "header")


def era_of(message: RpcBody | RpcMessage | None, headers: HeaderLookup | Mapping[str, str] | None) -> str:
    """ "2026" or "2025" for usage records; never raises (the request was already checked)."""
    try:
        era = detect_era("POST" if message is not None else "GET", headers, message)
    except ProtocolError:
        return "2026"  # only a modern claim can contradict its header
    return "2026" if era.is_modern else "2025"


# --------------------------------------------------------------------------- 2026 header checks

_SENTINEL = re.compile(r"=\?base64\?(.*)\?=", re.DOTALL)


def decode_header_value(value: str) -> str:
    """Decode an ``Mcp-Name`` / ``Mcp-Method`` value: ``=?base64?…?=`` carries UTF-8.

    The markers are lowercase and case-sensitive. Raises ValueError for a broken sentinel
    or for characters a plain value must not contain.
    """
    match = _SENTINEL.fullmatch(value)
    if match is not None:
        payload = match.group(1)
        try:
            decoded = base64.b64decode(payload, validate=True)
            # Only the canonical encoding: a value must have exactly one spelling.
            if base64.b64encode(decoded).decode("ascii") != payload:
                raise ValueError("non-canonical base64 header value")
            return decoded.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("invalid base64 header value") from None
    if not value.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("header value must be plain ASCII or base64-encoded")
    return value


def check_modern_headers(
    headers: HeaderLookup | Mapping[str, str] | None, message: RpcMessage, *, required: bool = True
) -> None:
    """Check a 2026-era message's ``Mcp-Method`` / ``Mcp-Name`` against its body.

    Requests must carry ``Mcp-Method`` equal to the method, and ``Mcp-Name`` equal to
    ``params.name`` (tools/call, prompts/get) or ``params.uri`` (resources/read); a task
    method's ``Mcp-Name`` must equal ``params.taskId`` when sent. Values compare
    case-sensitively after decoding. Notifications, and everything when `required` is
    False, are checked only for the headers they carry (the revision defines no rule for
    notifications). Raises `ProtocolError` -32020 (HTTP 400) on any mismatch.
    """
    if message.kind in ("response", "batch") or message.method is None:
        return
    must = required and message.kind == "request"
    method_header = _header(headers, "Mcp-Method")
    if method_header is None:
        if must:
            raise ProtocolError(HEADER_MISMATCH, "missing Mcp-Method header", message.id)
    else:
        try:
            method_value = decode_header_value(method_header)
        except ValueError as exc:
            raise ProtocolError(HEADER_MISMATCH, f"Mcp-Method header: {exc}", message.id) from None
        if method_value != message.method:
            raise ProtocolError(
                HEADER_MISMATCH,
                f"Mcp-Method header {method_value!r} does not match the body method {message.method!r}",
                message.id,
            )
    field_name = _MCP_NAME_FIELD.get(message.method)
    if field_name is None:
        return  # Mcp-Name has no meaning for this method; forwarded untouched
    name_header = _header(headers, "Mcp-Name")
    if name_header is None:
        if must and message.method in _MCP_NAME_REQUIRED:
            raise ProtocolError(HEADER_MISMATCH, f"missing Mcp-Name header for {message.method}", message.id)
        return
    try:
        name_value = decode_header_value(name_header)
    except ValueError as exc:
        raise ProtocolError(HEADER_MISMATCH, f"Mcp-Name header: {exc}", message.id) from None
    expected = (message.params or {}).get(field_name)
    if not isinstance(expected, str) or name_value != expected:
        raise ProtocolError(
            HEADER_MISMATCH,
            f"Mcp-Name header {name_value!r} does not match params.{field_name} {expected!r}",
            message.id,
        )


def check_routing_headers(message: RpcMessage, headers: HeaderLookup | Mapping[str, str] | None) -> None:
    """The proxy's one call for a POST: era cross-check, then the routing headers.

    A modern request (a ``_meta`` version claim) must carry matching ``MCP-Protocol-Version``,
    ``Mcp-Method`` and ``Mcp-Name``; on a legacy request those headers are not defined,
    so they are compared only when sent, and a mismatch is refused either way: the
    gateway authorizes from the body, and no later hop may be routed by a different
    story. Raises `ProtocolError` -32020.
    """
    era = detect_era("POST", headers, message)
    check_modern_headers(headers, message, required=era.source == "claim")


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a JSON-RPC request ended, for usage records."""

    ok: bool
    code: int | None = None  # the JSON-RPC error code when not ok
    tool_error: bool = False  # a result with isError: true (the tool ran and failed)
    result_type: str | None = None  # 2026: "complete", "input_required", "task" …
    known: bool = True  # False: it looked like an answer but could not be read (see UNKNOWN)

    @property
    def label(self) -> str:
        """ "ok", "tool_error", the error code as text, or "unknown"."""
        if not self.known:
            return "unknown"
        if not self.ok:
            return str(self.code)
        return "tool_error" if self.tool_error else "ok"


# An answer nested deeper than the interpreter's recursion limit (json.loads raises
# RecursionError): it is relayed as it is, and its outcome is recorded as unknown.
UNKNOWN = Outcome(ok=False, known=False)


def _outcome_of(message: Any, request_id: str | int) -> Outcome | None:
    if not isinstance(message, dict) or "id" not in message:
        return None
    found = message["id"]
    if type(found) is not type(request_id) or found != request_id:  # 1 and "1" are different ids
        return None
    if "error" in message:
        error = message["error"]
        code = error.get("code") if isinstance(error, dict) else None
        return Outcome(False, code if isinstance(code, int) and not isinstance(code, bool) else None)
    if "result" in message:
        result = message["result"]
        if isinstance(result, dict):
            result_type = result.get("resultType")
            return Outcome(
                True,
                tool_error=result.get("isError") is True,
                result_type=result_type if isinstance(result_type, str) else None,
            )
        return Outcome(True)
    return None


def outcome_of(data: str | bytes | None, request_id: str | int | None) -> str | None:
    """`response_outcome` as a label: "ok", "tool_error", the error code as text, or None."""
    if request_id is None:
        return None
    outcome = response_outcome(data, request_id)
    return None if outcome is None else outcome.label


def response_outcome(data: str | bytes | None, request_id: str | int) -> Outcome | None:
    """The outcome of request `request_id` if `data` (a JSON body or an SSE event's data)
    holds its JSON-RPC response; None when it is something else (a notification, another
    id, not JSON)."""
    if not data:
        return None
    if isinstance(data, bytes | bytearray):
        if b'"result"' not in data and b'"error"' not in data:
            return None
    elif '"result"' not in data and '"error"' not in data:
        return None  # cheap test first: most SSE events are notifications
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    except RecursionError:  # upstream data: "[[[[…" 100,000 deep must not cut the relay
        return UNKNOWN
    if isinstance(parsed, list):
        for item in parsed:
            outcome = _outcome_of(item, request_id)
            if outcome is not None:
                return outcome
        return None
    return _outcome_of(parsed, request_id)


# --------------------------------------------------------------------------- SSE


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event: its exact bytes plus the parsed fields.

    ``data`` is the data lines joined with "\\n" ("" when there is none; ``has_data``
    tells an empty data line from no data field, as for a comment-only keep-alive).
    ``raw`` includes the blank line that ended the event, so concatenating every raw
    reproduces the stream byte for byte.
    """

    raw: bytes
    id: str | None = None
    event: str | None = None
    data: str = ""
    has_data: bool = False
    retry: int | None = None
    comments: tuple[str, ...] = ()

    @property
    def is_comment_only(self) -> bool:
        return not self.has_data and self.id is None and self.event is None and self.retry is None

    @property
    def type(self) -> str:
        """The event type a browser would dispatch ("message" by default)."""
        return self.event or "message"


_LINE_END = re.compile(rb"\r\n|\r|\n")


class SseParser:
    """Incremental ``text/event-stream`` framing (WHATWG HTML §9.2.6).

    Lines end with CRLF, LF or CR; a blank line ends an event. Feed bytes as they arrive
    in any split; partial events are kept until complete. A CR at the very end of the
    fed bytes is held until the next byte shows whether it is half of a CRLF, so the
    result never depends on where chunks were split; events that end with LF or CRLF
    (all real servers) come out as soon as their last byte arrives.
    """

    __slots__ = ("_buffer", "_scan", "_line_start", "_lines", "_first", "max_event_size")

    def __init__(self, *, max_event_size: int | None = None) -> None:
        self._buffer = bytearray()
        self._scan = 0  # where to look for the next line end
        self._line_start = 0  # start of the line being completed
        self._lines: list[bytes] = []  # complete lines of the event being built
        self._first = True  # a UTF-8 BOM is stripped from the very first line only
        self.max_event_size = max_event_size

    @property
    def pending(self) -> int:
        """How many bytes of a begun event are waiting for the rest of it."""
        return len(self._buffer)

    @property
    def pending_bytes(self) -> bytes:
        """The bytes of the event not yet complete (what a stream's abrupt end leaves behind)."""
        return bytes(self._buffer)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes; return the events completed by them, in order."""
        buffer = self._buffer
        buffer += chunk
        events: list[SseEvent] = []
        event_start = 0
        size = len(buffer)
        position = self._scan
        while True:
            match = _LINE_END.search(buffer, position)
            if match is None:
                position = size
                break
            end = match.end()
            if end == size and buffer[end - 1] == 0x0D:
                # A lone CR at the end may be the first half of CRLF: decide with the next byte.
                position = match.start()
                break
            line = bytes(buffer[self._line_start : match.start()])
            self._line_start = end
            position = end
            if line:
                self._lines.append(line)
                continue
            events.append(self._dispatch(bytes(buffer[event_start:end])))
            event_start = end
        if event_start:
            del buffer[:event_start]
            position -= event_start
            self._line_start -= event_start
        self._scan = position
        if self.max_event_size is not None and len(buffer) > self.max_event_size:
            raise ValueError(f"SSE event larger than {self.max_event_size} bytes")
        return events

    def flush(self) -> list[SseEvent]:
        """At the end of the stream: the event a trailing CR completed, if any.

        An event without its final blank line is incomplete and, as the SSE spec says,
        dropped; its bytes stay in `pending_bytes`.
        """
        buffer = self._buffer
        if not buffer.endswith(b"\r"):
            return []
        # The held CR ends a line; if that line is blank, the event is complete.
        line = bytes(buffer[self._line_start : len(buffer) - 1])
        if line:
            self._lines.append(line)
            self._line_start = len(buffer)
            self._scan = len(buffer)
            return []
        event = self._dispatch(bytes(buffer))
        buffer.clear()
        self._scan = self._line_start = 0
        return [event]

    def _dispatch(self, raw: bytes) -> SseEvent:
        lines = self._lines
        self._lines = []
        event_id: str | None = None
        event_type: str | None = None
        data: list[str] | None = None
        retry: int | None = None
        comments: list[str] = []
        for raw_line in lines:
            line = raw_line.decode("utf-8", "replace")
            if self._first:
                self._first = False
                if line.startswith("\ufeff"):
                    line = line[1:]
            if line.startswith(":"):
                comments.append(line[1:].removeprefix(" "))
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                if data is None:
                    data = [value]
                else:
                    data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id":
                if "\0" not in value:
                    event_id = value
            elif name == "retry":
                if value.isascii() and value.isdigit():
                    retry = int(value)
        return SseEvent(
            raw=raw,
            id=event_id,
            event=event_type,
            data="" if data is None else "\n".join(data),
            has_data=data is not None,
            retry=retry,
            comments=tuple(comments),
        )
