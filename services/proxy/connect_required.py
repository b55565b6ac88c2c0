"""The proxy's answers when a user's upstream account is missing or unusable (issue 11): told to
the MCP client as a tool error or JSON-RPC error with the connect link, never a bare 401."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass

from services.common.cache import TtlCache
from services.proxy.upstream_auth.discovery import parse_www_authenticate
from services.proxy.upstream_auth.errors import (
    ConnectRequired,
    DiscoveryError,
    UpstreamAuthError,
    UpstreamAuthTemporarilyUnavailable,
)
from services.proxy.upstream_auth.service import more_scopes

log = logging.getLogger("gateway.proxy")

# The MCP "URL elicitation required" error (2025-11-25): clients that know it offer the link to
# open; the others show the message, which carries the link too.
URL_ELICITATION_REQUIRED = -32042
# 2026-07-28 removed -32042 and elicitationId and reserves -32020..-32099 for the spec; a gateway
# may still use the implementation-defined legacy range, so its clients get this code with the
# link in the message, on requests that cannot carry a URL elicitation (an input_required result,
# services/proxy/connect_elicitation.py: tools/call, prompts/get, resources/read only).
CONNECT_REQUIRED_2026 = -32001
TEMPORARY_CODE = -32603
# A 401 whose challenge names metadata re-reads the upstream's auth setup at most this often per
# server: an upstream that answers 401 to everything must not make each call a discovery.
REDISCOVER_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    outcome: str  # for the usage record
    retry_after: int = 0


def _error(request_id, code: int, message: str, data: dict | None = None) -> dict:
    error: dict = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _connect_reply(member, exc: ConnectRequired, era: str) -> dict:
    text = f"{exc} — connect your account: {exc.url}"
    if member.method == "tools/call":
        # A tool result the model and the user both see; the call did not reach the upstream.
        result: dict = {"content": [{"type": "text", "text": text}], "isError": True}
        if era == "2026":
            result["resultType"] = "complete"  # 2026-07-28 results say what they are
        return {"jsonrpc": "2.0", "id": member.id, "result": result}
    if era == "2026":
        return _error(member.id, CONNECT_REQUIRED_2026, text, {"url": exc.url})
    elicitation = {"mode": "url", "elicitationId": secrets.token_urlsafe(12), "url": exc.url, "message": text}
    return _error(member.id, URL_ELICITATION_REQUIRED, text, {"elicitations": [elicitation]})


def connect_required(message, exc: ConnectRequired, era: str = "2025") -> Answer:
    """The answer to `message` (None for GET/DELETE; a batch answers each request in it).
    `era`: "2026" for 2026-07-28 clients."""
    members = (message.members if message.kind == "batch" else (message,)) if message is not None else ()
    replies = [_connect_reply(m, exc, era) for m in members if m.kind == "request"]
    code = str(CONNECT_REQUIRED_2026 if era == "2026" else URL_ELICITATION_REQUIRED)
    if not replies:
        # A GET, DELETE, notification or response: no id to answer, so an HTTP error (not 401,
        # which would send the client back through the gateway's own authorization).
        body = _error(None, int(code), f"{exc} — connect your account: {exc.url}")
        return Answer(403, json.dumps(body).encode(), code)
    if message.kind == "batch":
        return Answer(200, json.dumps(replies).encode(), code)
    reply = replies[0]
    return Answer(200, json.dumps(reply).encode(), "tool_error" if "result" in reply else code)


def answer_for(message, exc: UpstreamAuthError, era: str = "2025") -> Answer:
    """`connect_required`, else 503 + Retry-After: the upstream's authorization server failed
    or its metadata cannot be read now (the account is kept; the message says which)."""
    if isinstance(exc, ConnectRequired):
        return connect_required(message, exc, era)
    retry_after = exc.retry_after if isinstance(exc, UpstreamAuthTemporarilyUnavailable) else 5
    request_id = message.id if message is not None and message.kind != "batch" else None
    body = _error(request_id, TEMPORARY_CODE, f"the upstream sign-in is temporarily unavailable: {exc}")
    return Answer(503, json.dumps(body).encode(), "503", retry_after)


def needs_more_scope(upstream_auth, server_id: str, challenge: str) -> ConnectRequired | None:
    """After an upstream 403: for `insufficient_scope`, connect again, asking for the scope the
    challenge names (dropped when it is not a short list of OAuth scopes). The account is kept:
    it still serves what it was granted for. None for any other challenge."""
    params = parse_www_authenticate(challenge)
    if params.get("error") != "insufficient_scope":
        return None
    try:
        scope = more_scopes(params.get("scope", ""))
    except ValueError:
        scope = ""
    return ConnectRequired("the server needs more permissions from your account for this; connect again "
                           "to grant them", upstream_auth.connect_url(server_id, scope))


_rediscovered = TtlCache(10_000, REDISCOVER_EVERY)  # server id -> True while re-read recently


async def token_after_401(upstream_auth, user_sub: str, server, rejected: str, challenge: str) -> str:
    """After an upstream 401: a token other than the rejected one, re-reading the upstream's
    auth setup first when the challenge names its metadata (at most once a minute per server)."""
    if parse_www_authenticate(challenge).get("resource_metadata"):
        if server.server_id not in _rediscovered:
            _rediscovered.set(server.server_id, True)
            try:
                # A moved authorization server makes get_token drop the account (ConnectRequired).
                await upstream_auth.discover(server, challenge, fresh=True)
            except DiscoveryError as exc:
                log.warning("upstream %s: re-reading its auth metadata after a 401 failed: %s", server.server_id, exc)
    return await upstream_auth.get_token(user_sub, server, rejected=rejected)
