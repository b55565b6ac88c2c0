"""What an access token says: the scopes and their parsing, PKCE S256, the claim types the gateway
mints, and the Principal a token or a user stands for. Pure, no I/O."""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass

from services.common.access import Principal
from services.common.errors import (
    InvalidScope,
)
from services.common.scopes import MCP_SCOPES, SUPPORTED_SCOPES
from storage.base import (
    User,
)

VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]+$")
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")  # RFC 9068 §4, compared lower-cased
# Claim types of an access token (the audience is one string: the gateway mints no lists).
REQUIRED_STRING_CLAIMS = ("iss", "sub", "aud", "jti")
OPTIONAL_STRING_CLAIMS = ("scope", "client_id", "fid", "email", "hd")
NUMERIC_CLAIMS = ("exp", "iat", "nbf")  # exp and iat are required by the decoder


class InvalidToken(Exception):
    """A bearer token the proxy must refuse with 401 invalid_token."""


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def parse_scope(requested: str | None) -> str:
    """The scope granted for a request: known scopes in a fixed order; unknown ones are
    dropped (a subset grant, RFC 6749 §3.3); no MCP scope at all means both."""
    words = (requested or "").split()
    for word in words:
        if not SCOPE_TOKEN_RE.match(word):
            raise InvalidScope("scope contains characters RFC 6749 forbids")
    granted = [s for s in SUPPORTED_SCOPES if s in words]
    if not any(s in granted for s in MCP_SCOPES):
        granted = [*MCP_SCOPES, *granted]
    return " ".join(granted)


@dataclass(frozen=True)
class Audience:
    value: str  # the `aud` claim
    server_id: str  # empty for the base resource


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def claim_type_problem(claims: dict) -> str:
    """Why a signature-checked claim set does not have the shape the gateway mints, or ""
    when it does. Checked once per token (before the verified-token cache), so that no
    later use of a claim meets a type it does not expect."""
    for name in REQUIRED_STRING_CLAIMS:
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            return f"{name} must be a non-empty string"
    for name in OPTIONAL_STRING_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            return f"{name} must be a string"
    for name in NUMERIC_CLAIMS:
        if name in claims and not _is_number(claims[name]):
            return f"{name} must be a number"
    return ""


def principal_of(user: User) -> Principal:
    return Principal(sub=user.sub, email=user.email if user.email_verified else "", hd=user.hd)
