"""MCP protocol eras (2025 handshake vs 2026 per-request `_meta`) and the 2026 routing headers
(`Mcp-Method` / `Mcp-Name`) checked against the body. Pure, no I/O."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from services.proxy.protocol.jsonrpc import (
    HEADER_MISMATCH,
    META_PROTOCOL_VERSION,
    ProtocolError,
    RpcBody,
    RpcMessage,
)

# Protocol versions that use the initialize handshake (2026-07-28 has per-request _meta).
LEGACY_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
_DEFAULT_LEGACY_VERSION = "2025-03-26"  # what a server assumes without the header


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


def _as_body(message: RpcBody | RpcMessage | None) -> RpcBody | None:
    if message is None or isinstance(message, RpcBody):
        return message
    if message.kind == "batch":
        return RpcBody(message.members, True)
    return RpcBody((message,), False)


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


def check_routing_headers(message: RpcMessage, headers: HeaderLookup | Mapping[str, str] | None) -> Era:
    """The proxy's one call for a POST: era cross-check, then the routing headers.

    A modern request (a ``_meta`` version claim) must carry matching ``MCP-Protocol-Version``,
    ``Mcp-Method`` and ``Mcp-Name``; on a legacy request those headers are not defined,
    so they are compared only when sent, and a mismatch is refused either way: the
    gateway authorizes from the body, and no later hop may be routed by a different
    story. Raises `ProtocolError` -32020. Returns the request's era (its usage label too).
    """
    era = detect_era("POST", headers, message)
    check_modern_headers(headers, message, required=era.source == "claim")
    return era
