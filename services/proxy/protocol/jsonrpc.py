"""JSON-RPC as the proxy sees it: body parsing into `RpcMessage`s, the scope each method needs,
`ProtocolError`, error bodies and the outcome of a call (for usage). Pure, no I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from services.common.scopes import SCOPE_CONNECT, SCOPE_INVOKE

# JSON-RPC 2.0 and MCP error codes the gateway itself may emit.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020  # MCP 2026-07-28 HeaderMismatch (renumbered from -32001)


META_PROTOCOL_VERSION = "io.modelcontextprotocol/protocolVersion"
INPUT_REQUIRED = "input_required"  # the 2026 resultType of an interim answer (MRTR)

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
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.id = id

    def body(self) -> bytes:
        return jsonrpc_error(self.code, self.message, self.id)


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
        """ "ok", "tool_error", the error code as text, "unknown", or "input_required" (a 2026
        interim answer: the retry that follows is the call, so usage records skip it)."""
        if not self.known:
            return "unknown"
        if not self.ok:
            return str(self.code)
        if self.result_type == INPUT_REQUIRED:
            return INPUT_REQUIRED
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


_SHALLOW = 256  # fewer brackets than this cannot nest anywhere near the recursion limit


_IS_ERROR_TRUE = re.compile(rb'"isError"\s*:\s*true')


def body_outcome(data: bytes, request_id: str | int) -> str:
    """`outcome_of` for a whole JSON answer, "ok" when it holds no answer to `request_id`.
    An answer without an "error" member, an `"isError": true` or "input_required", too shallow
    to be "unknown", is "ok" whatever else it says: those (most, and every successful tool
    result of the SDKs, which say `"isError": false`) are not parsed a second time."""
    if (b'"error"' not in data and b'"input_required"' not in data
            and (b'"isError"' not in data or not _IS_ERROR_TRUE.search(data))
            and data.count(b"{") + data.count(b"[") < _SHALLOW):
        return "ok"
    return outcome_of(data, request_id) or "ok"


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
