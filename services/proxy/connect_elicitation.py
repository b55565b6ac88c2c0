"""The 2026-07-28 way to ask for a connected account: a URL-mode elicitation in an `input_required`
result (multi round-trip requests), and the retry that brings the user's answer back. Pure, no I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

# Only these may answer input_required (MRTR §Supported Requests).
MRTR_METHODS = frozenset({"tools/call", "prompts/get", "resources/read"})
META_CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
# The gateway's own requestState starts with this, so an upstream's own input_required round
# (its requestState, its inputResponses) passes through untouched.
STATE_PREFIX = "mcpgw-connect."
INPUT_KEY = "mcpgw_connect_account"  # the key of the gateway's elicitation in inputRequests
STATE_TTL = 600.0  # seconds: as long as a pending upstream authorization lives
MAX_ROUNDS = 3  # elicitations for one call; then the tool error with the link ends the loop
ACTIONS = frozenset({"accept", "decline", "cancel"})


class SecretBox(Protocol):
    """`services.authserver.keys.SecretBox` (AES-GCM; `context` is the associated data)."""

    def seal(self, plaintext: bytes, context: str = "") -> str: ...

    def open(self, token: str, context: str = "") -> bytes: ...


class InvalidRequestState(ValueError):
    """The gateway's requestState on a retry does not open for this user, server and request, or
    has expired: attacker-controlled input (MRTR §Server Requirements), refused with -32602."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A retry that carries the gateway's requestState."""

    rounds: int  # elicitations already answered for this call
    action: str  # the user's answer: "accept", "decline", "cancel", or "" when none is readable
    body: bytes  # the request as the upstream gets it: without the gateway's state and answer


def accepts_url_elicitation(message) -> bool:
    """A 2026 request that may be answered with a URL-mode elicitation: one of the MRTR methods,
    from a client that declared `elicitation.url` in this request's capabilities (never ask for
    an input type the client did not declare)."""
    if message is None or message.kind != "request" or message.method not in MRTR_METHODS:
        return False
    meta = (message.params or {}).get("_meta")
    capabilities = meta.get(META_CLIENT_CAPABILITIES) if isinstance(meta, dict) else None
    elicitation = capabilities.get("elicitation") if isinstance(capabilities, dict) else None
    return isinstance(elicitation, dict) and isinstance(elicitation.get("url"), dict)


def _context(user_sub: str, server_id: str, message) -> str:
    # The principal, the server and the originating request (method, tool/prompt/resource and
    # its arguments): a state handed to another user, server or call does not open.
    arguments = json.dumps((message.params or {}).get("arguments"), sort_keys=True, separators=(",", ":"))
    return json.dumps(["mcpgw connect elicitation v1", user_sub, server_id, message.method, message.target or "",
                       hashlib.sha256(arguments.encode()).hexdigest()],
                      separators=(",", ":"))


def input_required(box: SecretBox, message, user_sub: str, server_id: str, url: str, text: str,
                   *, rounds: int, now: float) -> dict:
    """The JSON-RPC answer asking the user to open `url` (the gateway's connect page); its
    requestState is sealed with an expiry and the number of rounds so far."""
    state = box.seal(json.dumps({"exp": now + STATE_TTL, "n": rounds + 1}).encode(),
                     _context(user_sub, server_id, message))
    elicitation = {"method": "elicitation/create", "params": {"mode": "url", "message": text, "url": url}}
    result = {"resultType": "input_required", "inputRequests": {INPUT_KEY: elicitation},
              "requestState": STATE_PREFIX + state}
    return {"jsonrpc": "2.0", "id": message.id, "result": result}


def take_retry(box: SecretBox, message, user_sub: str, server_id: str, *, now: float) -> Retry | None:
    """The retry of a call the gateway answered with `input_required`, or None when the request
    carries no state of the gateway's (a first call, or an upstream's own round)."""
    if message is None or message.kind != "request":
        return None
    params = message.params or {}
    state = params.get("requestState")
    if not isinstance(state, str) or not state.startswith(STATE_PREFIX):
        return None
    try:
        payload = json.loads(box.open(state[len(STATE_PREFIX):], _context(user_sub, server_id, message)))
        expires, rounds = float(payload["exp"]), int(payload["n"])
    except Exception:  # noqa: BLE001 - not base64, wrong key or context, tampered, not our JSON
        raise InvalidRequestState("the requestState is not valid for this request") from None
    if expires < now:
        raise InvalidRequestState("the requestState has expired: call again") from None
    # The gateway asked for nothing else in that round: the upstream gets neither the state nor
    # any input response.
    forwarded = {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}
    responses = params.get("inputResponses")
    answer: Any = responses.get(INPUT_KEY) if isinstance(responses, dict) else None
    action = answer.get("action") if isinstance(answer, dict) else None
    body = json.dumps({"jsonrpc": "2.0", "id": message.id, "method": message.method, "params": forwarded},
                      separators=(",", ":")).encode()
    return Retry(rounds=rounds, action=action if action in ACTIONS else "", body=body)
