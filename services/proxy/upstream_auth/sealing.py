"""Upstream secrets at rest: token sets sealed with (user, server, issuer) as associated data, so a
row copied to another user, server or issuer does not open; client secrets bound likewise."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from storage.upstream_auth import UpstreamCredential


class SecretBox(Protocol):
    """What sealing needs of `services.authserver.keys.SecretBox` (AES-GCM, `context` the
    associated data); `services/app.py` hands that one in (proxy does not import authserver)."""

    def seal(self, plaintext: bytes, context: str = "") -> str: ...

    def open(self, token: str, context: str = "") -> bytes: ...


class Unreadable(ValueError):
    """A sealed value that does not open under the key it is stored under (copied, tampered,
    or sealed under another master secret)."""


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str = ""


def _context(*parts: str) -> str:
    # JSON: no choice of parts can make two different tuples the same string.
    return json.dumps(parts, separators=(",", ":"))


def credential_context(user_sub: str, server_id: str, issuer: str) -> str:
    return _context("mcpgw upstream credential v1", user_sub, server_id, issuer)


def seal_tokens(box: SecretBox, user_sub: str, server_id: str, issuer: str, tokens: TokenSet) -> str:
    plain = json.dumps({"a": tokens.access_token, "r": tokens.refresh_token}).encode()
    return box.seal(plain, credential_context(user_sub, server_id, issuer))


def open_tokens(box: SecretBox, credential: UpstreamCredential) -> TokenSet:
    """The token set of a stored credential, opened under its own (user, server, issuer)."""
    context = credential_context(credential.user_sub, credential.server_id, credential.issuer)
    return TokenSet(**_open_json(box, credential.token_enc, context, ("a", "r"), ("access_token", "refresh_token")))


def seal_client_secret(box: SecretBox, server_id: str, issuer: str, secret: str) -> str:
    """A client secret for (server, issuer); issuer "" for the owner's static client."""
    return box.seal(secret.encode(), _context("mcpgw upstream client secret v1", server_id, issuer)) if secret else ""


def open_client_secret(box: SecretBox, server_id: str, issuer: str, sealed: str) -> str:
    if not sealed:
        return ""
    try:
        return box.open(sealed, _context("mcpgw upstream client secret v1", server_id, issuer)).decode()
    except Exception:
        raise Unreadable("a stored upstream client secret does not open") from None


def _open_json(box: SecretBox, sealed: str, context: str, keys: tuple[str, ...], names: tuple[str, ...]) -> dict:
    try:
        data = json.loads(box.open(sealed, context))
        return {name: str(data[key]) for key, name in zip(keys, names, strict=True)}
    except Exception:
        # InvalidTag (another user's row, tampering), a bad prefix or base64, bad JSON.
        raise Unreadable("a stored upstream credential does not open under its own user, server and issuer") from None
