"""One request to an upstream token (or revocation) endpoint and how its answer is read: 4xx is a
refusal the user must act on (`TokenRefused`), 5xx, 429 and network trouble are temporary."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from services.proxy.upstream.errors import UpstreamError

from .clients import ClientIdentity
from .discovery import AuthServer
from .errors import UpstreamAuthTemporarilyUnavailable
from .http import AuthHttp

MAX_TOKEN = 16 * 1024  # longer "tokens" are not tokens (and would bloat every upstream request)


class TokenRefused(Exception):
    """The token endpoint answered 4xx (`error`: its OAuth error code, e.g. invalid_grant)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"HTTP {status} {error}".strip())
        self.status, self.error = status, error


@dataclass(frozen=True)
class TokenAnswer:
    access_token: str
    refresh_token: str  # "" when none was returned
    expires_in: float | None
    scope: str


async def token_request(http: AuthHttp, server: AuthServer, client: ClientIdentity, form: dict[str, str], *,
                        public_only: bool) -> TokenAnswer:
    form = dict(form)
    headers = [("Content-Type", "application/x-www-form-urlencoded"), *client.authenticate(form)]
    try:
        answer = await http.post(server.token_endpoint, headers, urlencode(form).encode(), public_only=public_only)
    except UpstreamError as exc:
        raise UpstreamAuthTemporarilyUnavailable(f"the token endpoint of {server.issuer} is unreachable: {exc}") \
            from None
    body = answer.json()
    if answer.status >= 500 or answer.status == 429:
        retry = answer.headers.get("retry-after", "")
        raise UpstreamAuthTemporarilyUnavailable(
            f"the token endpoint of {server.issuer} answered HTTP {answer.status}",
            int(retry) if retry.isdigit() and int(retry) <= 300 else 5)
    if answer.status != 200:
        error = body.get("error") if isinstance(body, dict) else ""
        raise TokenRefused(answer.status, str(error or "")[:100])
    if not isinstance(body, dict):
        raise UpstreamAuthTemporarilyUnavailable(f"the token endpoint of {server.issuer} answered no JSON object")
    access = body.get("access_token")
    refresh = body.get("refresh_token") or ""
    token_type = body.get("token_type", "")
    expires_in = body.get("expires_in")
    if not isinstance(access, str) or not access or len(access) > MAX_TOKEN or not access.isprintable() \
            or not isinstance(refresh, str) or len(refresh) > MAX_TOKEN \
            or not isinstance(token_type, str) or token_type.lower() != "bearer" \
            or (expires_in is not None and (not isinstance(expires_in, int | float) or isinstance(expires_in, bool)
                                            or expires_in < 0)):
        raise UpstreamAuthTemporarilyUnavailable(f"the token endpoint of {server.issuer} answered a malformed token")
    scope = body.get("scope")
    return TokenAnswer(access, refresh, float(expires_in) if expires_in is not None else None,
                       scope if isinstance(scope, str) else "")


async def revoke(http: AuthHttp, server: AuthServer, client: ClientIdentity, token: str, hint: str, *,
                 public_only: bool) -> bool:
    """RFC 7009 revocation, best effort: True when the AS said 200."""
    if not server.revocation_endpoint or not token:
        return False
    form = {"token": token, "token_type_hint": hint}
    headers = [("Content-Type", "application/x-www-form-urlencoded"), *client.authenticate(form)]
    try:
        answer = await http.post(server.revocation_endpoint, headers, urlencode(form).encode(),
                                 public_only=public_only)
    except UpstreamError:
        return False
    return answer.status == 200


MAX_SUBJECT = 200  # a display name, not a document


async def userinfo_subject(http: AuthHttp, server: AuthServer, access_token: str, *, public_only: bool) -> str:
    """Who the account is, from the AS's userinfo endpoint (the e-mail, else the preferred user
    name, else `sub`), asked with the token just issued; "" when the AS has none or will not say."""
    if not server.userinfo_endpoint:
        return ""
    try:
        answer = await http.send("GET", server.userinfo_endpoint,
                                 [("Accept", "application/json"), ("Authorization", f"Bearer {access_token}")],
                                 None, public_only=public_only)
    except UpstreamError:
        return ""
    body = answer.json()
    if answer.status != 200 or not isinstance(body, dict):
        return ""  # e.g. 401/403: the scope granted does not cover userinfo
    for claim in ("email", "preferred_username", "sub"):
        value = body.get(claim)
        if isinstance(value, str) and value.strip() and value.isprintable():
            return value.strip()[:MAX_SUBJECT]
    return ""
