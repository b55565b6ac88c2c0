"""AuthorizationRequests: the rules of /authorize and consent (validate, park during sign-in,
decide consent, issue the code; outcomes as values, client errors as a PageError never redirected)."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode, urlsplit

from config import Config
from services.authserver.claims import parse_scope
from services.authserver.clients import ClientRegistry
from services.authserver.redirect_uris import is_loopback_redirect, redirect_host, redirect_uri_matches
from services.authserver.tokens import TokenService
from services.common.access import AccessPolicy
from services.common.errors import InvalidRequest, OAuthError, PageError, RequestGone, UnsupportedResponseType
from services.common.logs import security_event
from storage.base import Client, Consent, Pending, Server, Storage

PENDING_TTL = 600  # an /authorize and its sign-in may take ten minutes
HELD_KIND = "authorize-connect"  # an approved request waiting for the upstream account
CHALLENGE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
PROMPTS = {"none", "login", "consent", "select_account"}


@dataclass(frozen=True)
class Redirect:
    url: str


@dataclass(frozen=True)
class ConsentPage:
    """The consent template's context, field for field."""

    req: str
    client: Client
    server: Server | None
    redirect_host: str
    loopback: bool
    custom_scheme: bool
    scopes: list[str]
    connect_host: str | None = None  # where the user connects an upstream account next, if they must


class Detour(Protocol):
    """Connected accounts as the consent step sees them. Given by the handler layer for each
    call (services.dashboard.connections over the proxy's UpstreamAuth): authserver never
    imports proxy."""

    async def needed(self, user_sub: str, server_id: str) -> str | None:
        """The upstream sign-in host when this user must connect an account for the server
        before a code is issued ("" when the host is unknown yet); None when not."""

    async def start(self, user_sub: str, server_id: str, browser: str, return_to: str) -> str:
        """The upstream authorization URL the browser goes to; it comes back to `return_to`."""


@dataclass(frozen=True)
class Denied:
    reason: str
    back_url: str  # hands access_denied back to the client


def add_query(uri: str, params: dict[str, str | None]) -> str:
    parts = urlsplit(uri)
    query = urlencode({k: v for k, v in params.items() if v is not None})
    joined = f"{parts.query}&{query}" if parts.query else query
    return parts._replace(query=joined).geturl()


def signin_time(now: Callable[[], float] = time.time) -> float:
    """The clock of the sign-in cookie's auth_time (see BaseHandler.set_signin_cookie)."""
    return round(now(), 3)


def browser_of(user: dict) -> str:
    """A digest of the browser's sign-in session (its sid): what binds a trip through an
    upstream's sign-in to this browser. Never the sid itself, which is a bearer secret."""
    return hashlib.sha256(b"mcpgw browser binding\0" + str(user.get("sid", "")).encode()).hexdigest()


def signed_in_after(user: dict, payload: dict) -> bool:
    """prompt=login: only a sign-in completed after the request counts."""
    return float(user.get("auth_time", 0)) >= float(payload.get("login_after", 0))


class AuthorizationRequests:
    def __init__(self, storage: Storage, clients: ClientRegistry, tokens: TokenService,
                 access: AccessPolicy, config: Config, *, now: Callable[[], float] = time.time):
        self._storage = storage
        self._clients = clients
        self._tokens = tokens
        self._access = access
        self._issuer = config.issuer
        self._now = now

    # ------------------------------------------------------------------ /authorize

    async def start(self, params: dict[str, str], user: dict | None) -> Redirect:
        """Validate and park a request; where the browser goes next."""
        try:
            client = await self._clients.get(params.get("client_id", ""))
        except OAuthError as exc:  # the client is unknown or unusable
            raise PageError(400, "Unknown application", exc.description) from None
        redirect_uri = params.get("redirect_uri")
        if redirect_uri is None:
            if len(client.redirect_uris) != 1:
                raise PageError(400, "Invalid authorization request", "redirect_uri is required")
            redirect_uri = client.redirect_uris[0]
        if not redirect_uri_matches(client.redirect_uris, redirect_uri):
            raise PageError(400, "Invalid redirect URI",
                             "The redirect URI is not registered for this application.")

        state = params.get("state")
        try:
            request = await self._validate(params)
        except OAuthError as exc:
            return self._to_client(redirect_uri, state, error=exc.error, error_description=exc.description)
        await self._clients.touch(client)
        key = secrets.token_urlsafe(24)
        await self._storage.put_pending(
            Pending(
                kind="authorize",
                key=key,
                payload={
                    **request,
                    "client_id": client.client_id,
                    "redirect_uri": redirect_uri,
                    "state": state,
                    "login_after": signin_time(self._now) if request["prompt"] == "login" else 0,
                },
                expires_at=self._now() + PENDING_TTL,
            )
        )
        consent_url = "/authorize/consent?" + urlencode({"req": key})
        if request["prompt"] == "none" and user is None:
            return self._to_client(redirect_uri, state, error="login_required", error_description="sign-in needed")
        if user is None or request["prompt"] == "login":
            force = "1" if request["prompt"] == "login" else ""
            return Redirect("/login?" + urlencode({"next": consent_url, "force": force}))
        return Redirect(consent_url)

    async def _validate(self, params: dict[str, str]) -> dict:
        if params.get("response_type") != "code":
            raise UnsupportedResponseType("response_type must be code")
        challenge = params.get("code_challenge")
        if not challenge:
            raise InvalidRequest("PKCE is required: send code_challenge (S256)")
        if params.get("code_challenge_method") != "S256":
            raise InvalidRequest("code_challenge_method must be S256")
        if not CHALLENGE_RE.match(challenge):
            raise InvalidRequest("code_challenge is not a base64url SHA-256 digest")
        words = params.get("prompt", "").split()
        if not set(words) <= PROMPTS:
            raise InvalidRequest("unsupported prompt value")
        if "none" in words and len(words) > 1:
            raise InvalidRequest("prompt=none cannot be combined")
        scope = parse_scope(params.get("scope"))
        audience = await self._tokens.resolve_audience(params.get("resource"))
        for name in ("state", "nonce"):
            if len(params.get(name) or "") > 2000:
                raise InvalidRequest(f"{name} is too long")
        return {
            "code_challenge": challenge,
            "scope": scope,
            "audience": audience.value,
            "server_id": audience.server_id,
            "prompt": "login" if "login" in words else "consent" if "consent" in words else " ".join(words),
        }

    # ------------------------------------------------------------------- consent

    async def review(self, key: str | None, user: dict | None, uri: str,
                     detour: Detour | None = None) -> Redirect | ConsentPage | Denied:
        """What the consent step shows (or skips) for the signed-in `user`."""
        pending = await self._pending(key, take=False)
        payload = pending.payload
        if user is None or not signed_in_after(user, payload):
            force = "1" if user is not None else ""
            return Redirect("/login?" + urlencode({"next": uri, "force": force}))
        reason = await self._refusal(user, payload)
        if reason is not None:
            await self._pending(key, take=True)
            return Denied(reason, self._to_client_url(payload, error="access_denied", error_description=reason))
        if payload["prompt"] != "consent":
            consent = await self._storage.get_consent(user["sub"], payload["client_id"], payload["audience"])
            if consent and set(payload["scope"].split()) <= set(consent.scope.split()):
                await self._pending(key, take=True)  # single use, even when remembered
                return await self._issue(user, payload, detour)
        if payload["prompt"] == "none":
            await self._pending(key, take=True)
            return Redirect(self._to_client_url(payload, error="consent_required"))
        server = await self._access.server(payload["server_id"]) if payload["server_id"] else None
        return ConsentPage(
            req=key,
            client=await self._clients.get(payload["client_id"]),
            server=server,
            redirect_host=redirect_host(payload["redirect_uri"]),
            loopback=is_loopback_redirect(payload["redirect_uri"]),
            custom_scheme=urlsplit(payload["redirect_uri"]).scheme not in ("http", "https"),
            scopes=payload["scope"].split(),
            connect_host=await detour.needed(user["sub"], payload["server_id"])
            if detour is not None and payload["server_id"] else None,
        )

    async def decide(self, key: str | None, user: dict | None, approve: bool,
                     detour: Detour | None = None) -> Redirect:
        """The consent form's answer; the request is used up either way."""
        payload = (await self._pending(key, take=True)).payload
        if user is None or not signed_in_after(user, payload):
            raise PageError(401, "Not signed in", "Sign in again from your application.")
        if not approve:
            return Redirect(self._to_client_url(payload, error="access_denied",
                                                error_description="the user declined"))
        reason = await self._refusal(user, payload)
        if reason is not None:
            return Redirect(self._to_client_url(payload, error="access_denied", error_description=reason))
        await self._storage.put_consent(
            Consent(user["sub"], payload["client_id"], payload["audience"], payload["scope"], self._now())
        )
        return await self._issue(user, payload, detour)

    async def resume(self, key: str | None, user: dict | None, detour: Detour | None = None) -> Redirect:
        """The browser is back from the upstream's sign-in (`Detour`): the held request's code.
        Single use, and only for the browser session and user that started the detour."""
        held = await self._storage.get_pending(HELD_KIND, key, self._now()) if key else None
        if held is None:
            raise RequestGone()
        payload = held.payload
        if user is None or user.get("sub") != payload.get("sub") or \
                not secrets.compare_digest(browser_of(user), str(payload.get("browser", ""))):
            security_event("signin_refused", "a held authorization resumed from another browser",
                           user_sub=(user or {}).get("sub", ""), client_id=payload.get("client_id", ""),
                           server_id=payload.get("server_id", ""), reason="browser_mismatch")
            raise PageError(403, "Another browser", "This sign-in was started in another browser session. "
                            "Go back to your application and connect again.")
        if await self._storage.take_pending(HELD_KIND, key, self._now()) is None:
            raise RequestGone()
        reason = await self._refusal(user, payload)
        if reason is not None:
            return Redirect(self._to_client_url(payload, error="access_denied", error_description=reason))
        if detour is not None and await detour.needed(user["sub"], payload["server_id"]) is not None:
            raise PageError(400, "Account not connected", "Your account at this server's sign-in was not "
                            "connected. Go back to your application and connect again.")
        return await self._issue_code(user, payload)

    async def _pending(self, key: str | None, take: bool) -> Pending:
        pending = None
        if key:
            lookup = self._storage.take_pending if take else self._storage.get_pending
            pending = await lookup("authorize", key, self._now())
        if pending is None:
            raise RequestGone()
        return pending

    async def _refusal(self, user: dict, payload: dict) -> str | None:
        """None when the user may use the requested server; else why not (a security event)."""
        record = await self._storage.get_user(user["sub"])
        reason = None
        if record is None:
            reason = "your account is unknown here; sign in again"
        else:
            try:
                await self._tokens.check_access(record, self._tokens.audience_for(payload["audience"]))
            except OAuthError as exc:
                reason = exc.description
        if reason is not None:
            security_event("signin_refused", "authorization refused: the sharing rules do not admit this user",
                           user_sub=user["sub"], client_id=payload["client_id"],
                           server_id=payload.get("server_id", ""), reason=reason)
        return reason

    async def _issue(self, user: dict, payload: dict, detour: Detour | None) -> Redirect:
        """The code, or first the detour through the upstream's sign-in when the user must
        connect an account there: the approved request is held (10 min, single use, bound
        to this browser session) until `resume`."""
        if detour is not None and payload["server_id"] \
                and await detour.needed(user["sub"], payload["server_id"]) is not None:
            if payload["prompt"] == "none":  # the upstream's sign-in is a page: not allowed here
                return Redirect(self._to_client_url(payload, error="interaction_required",
                                                    error_description="an upstream account must be connected"))
            key = secrets.token_urlsafe(24)
            browser = browser_of(user)
            await self._storage.put_pending(Pending(HELD_KIND, key, {**payload, "sub": user["sub"], "browser": browser},
                                                    self._now() + PENDING_TTL))
            return Redirect(await detour.start(user["sub"], payload["server_id"], browser,
                                               "/authorize/continue?" + urlencode({"req": key})))
        return await self._issue_code(user, payload)

    async def _issue_code(self, user: dict, payload: dict) -> Redirect:
        code = await self._tokens.issue_code(
            client_id=payload["client_id"],
            redirect_uri=payload["redirect_uri"],
            code_challenge=payload["code_challenge"],
            user_sub=user["sub"],
            scope=payload["scope"],
            audience=payload["audience"],
        )
        return Redirect(self._to_client_url(payload, code=code))

    # ------------------------------------------------------------ back to the client

    def _to_client(self, redirect_uri: str, state: str | None, **params: str) -> Redirect:
        return Redirect(add_query(redirect_uri, {**params, "state": state, "iss": self._issuer}))

    def _to_client_url(self, payload: dict, **params: str) -> str:
        return self._to_client(payload["redirect_uri"], payload.get("state"), **params).url
