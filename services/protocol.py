"""MCP as the proxy sees it: one parse of a JSON-RPC POST body, the scope a method needs,
the protocol era of a request, the 2026-era routing-header check, and an incremental SSE
parser that keeps each event's exact bytes. Pure functions, no I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MODERN_VERSION = "2026-07-28"
# Methods a token with only mcp:connect may call.
CONNECT_METHODS = {
    "initialize",
    "server/discover",
    "ping",
    "subscriptions/listen",
    "resources/subscribe",
    "resources/unsubscribe",
    "logging/setLevel",
}
ERROR_PARSE = -32700
ERROR_INVALID_REQUEST = -32600
ERROR_HEADER_MISMATCH = -32020


class ProtocolError(Exception):
    def __init__(self, code: int, message: str, request_id=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = request_id


@dataclass(frozen=True)
class Message:
    kind: str  # request | notification | response | batch
    method: str | None
    id: object
    target: str | None  # tool name, resource URI or prompt name
    needs_invoke: bool
    meta_version: str | None = None


def needs_invoke(method: str) -> bool:
    return not (
        method in CONNECT_METHODS or method.startswith("notifications/") or method.endswith("/list")
    )


def _target(method: str, params) -> str | None:
    if not isinstance(params, dict):
        return None
    name = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri",
            "resources/subscribe": "uri", "resources/unsubscribe": "uri"}.get(method)
    value = params.get(name) if name else None
    return value[:500] if isinstance(value, str) else None


def _one(item) -> Message:
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        raise ProtocolError(ERROR_INVALID_REQUEST, "not a JSON-RPC 2.0 message")
    request_id = item.get("id")
    if request_id is not None and not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise ProtocolError(ERROR_INVALID_REQUEST, "id must be a string or a number")
    method = item.get("method")
    if method is None:
        if "result" in item or "error" in item:
            return Message("response", None, request_id, None, False)
        raise ProtocolError(ERROR_INVALID_REQUEST, "a message needs a method, a result or an error", request_id)
    if not isinstance(method, str) or not method or len(method) > 200:
        raise ProtocolError(ERROR_INVALID_REQUEST, "method must be a short string", request_id)
    params = item.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get("io.modelcontextprotocol/protocolVersion") if isinstance(meta, dict) else None
    kind = "notification" if "id" not in item else "request"
    return Message(kind, method, request_id, _target(method, params), needs_invoke(method),
                   version if isinstance(version, str) else None)


def parse_message(body: bytes) -> Message:
    """Parse once; a batch (2025-03-26) counts as invoke if any member needs it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(ERROR_PARSE, "the body is not valid JSON") from None
    if isinstance(data, list):
        if not data:
            raise ProtocolError(ERROR_INVALID_REQUEST, "an empty batch")
        members = [_one(item) for item in data]
        return Message("batch", members[0].method, None, None, any(m.needs_invoke for m in members))
    return _one(data)


def era_of(message: Message | None, headers) -> str:
    version = headers.get("MCP-Protocol-Version", "") or (message.meta_version if message else "") or ""
    if version >= MODERN_VERSION or (message is not None and message.method == "server/discover"):
        return "2026"
    return "2025"


def check_routing_headers(message: Message, headers) -> None:
    """2026-07-28: Mcp-Method / Mcp-Name, when sent, must agree with the body; the gateway
    decides from the body, and a mismatch is refused so no hop can be fooled."""
    sent_method = headers.get("Mcp-Method")
    if sent_method is not None and message.kind in ("request", "notification") and sent_method != message.method:
        raise ProtocolError(ERROR_HEADER_MISMATCH, "Mcp-Method does not match the body", message.id)
    sent_name = headers.get("Mcp-Name")
    if sent_name is not None and message.target is not None and sent_name != message.target:
        raise ProtocolError(ERROR_HEADER_MISMATCH, "Mcp-Name does not match the body", message.id)


def outcome_of(data: bytes, request_id) -> str | None:
    """'ok' or the JSON-RPC error code of the response to `request_id` in `data`, or None."""
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if isinstance(item, dict) and item.get("id") == request_id and "method" not in item:
            if "error" in item:
                error = item["error"]
                return str(error.get("code", "error")) if isinstance(error, dict) else "error"
            if isinstance(item.get("result"), dict) and item["result"].get("isError") is True:
                return "tool_error"
            return "ok"
    return None


@dataclass(frozen=True)
class SseEvent:
    raw: bytes  # the exact bytes, blank line included, to forward unchanged
    data: str
    event: str
    id: str | None
    retry: int | None


_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n")


class SseParser:
    """Incremental: feed bytes as they arrive, get back the events they completed."""

    def __init__(self):
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes of an event that has begun but not ended."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events = []
        start = 0
        # The whole unfinished event is searched again, so a boundary split across chunks
        # ("\r\n" | "\r\n") is found once its second half arrives.
        for match in _BOUNDARY.finditer(self._buffer):
            if match.start() < start:
                continue
            raw = self._buffer[start : match.end()]
            events.append(_parse_event(raw))
            start = match.end()
        self._buffer = self._buffer[start:]
        return events


def _parse_event(raw: bytes) -> SseEvent:
    data_lines, event, event_id, retry = [], "message", None, None
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
    return SseEvent(raw, "\n".join(data_lines), event, event_id, retry)
