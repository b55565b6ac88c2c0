"""The upstream identity provider (OIDC, Google by default): discovery, the authorization
URL, the code exchange and ID-token verification.

The HTTP work is asynchronous (Tornado's client); ID tokens are verified with google-auth
against a JWKS this module fetched and cached by its Cache-Control header, so no
blocking call happens on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from google.oauth2 import id_token as google_id_token
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from services.servers import InvalidInput, check_email
from storage.base import Pending, User

log = logging.getLogger("gateway.identity")

DISCOVERY_TTL = 3600.0
DEFAULT_JWKS_TTL = 3600.0
CLOCK_SKEW = 60


class IdentityError(Exception):
    """The IdP could not sign the user in; the message is safe to show."""


@dataclass(frozen=True)
class IdentityClaims:
    sub: str
    email: str
    email_verified: bool
    hd: str
    name: str
    picture: str


@dataclass(frozen=True)
class LoginStart:
    url: str
    state: str
    nonce: str
    code_verifier: str


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return verifier, challenge.decode()


class _CachedCertsRequest:
    """google-auth's transport.Request shape, answering from JWKS bytes already fetched."""

    def __init__(self, body: bytes):
        self.status = 200
        self.data = body

    def __call__(self, url, method="GET", **kwargs):
        return self


class OidcIdentityProvider:
    def __init__(self, issuer: str, client_id: str, client_secret: str, redirect_uri: str):
        self.issuer = issuer
        self.client_id = client_id
        self._client_secret = client_secret
        self.redirect_uri = redirect_uri
        self._discovery: dict | None = None
        self._discovery_expires = 0.0
        self._jwks: bytes | None = None
        self._jwks_expires = 0.0
        self._http = AsyncHTTPClient()

    async def _get_json(self, url: str) -> tuple[dict, float]:
        try:
            response = await self._http.fetch(
                HTTPRequest(url, connect_timeout=5, request_timeout=10, follow_redirects=False)
            )
        except HTTPClientError as exc:
            raise IdentityError(f"the identity provider answered HTTP {exc.code} for {url}") from None
        except OSError as exc:
            raise IdentityError(f"the identity provider is unreachable: {exc}") from None
        match = re.search(r"max-age=(\d+)", response.headers.get("Cache-Control", ""))
        ttl = float(match.group(1)) if match else DEFAULT_JWKS_TTL
        try:
            return json.loads(response.body), ttl
        except ValueError:
            raise IdentityError(f"the identity provider sent invalid JSON at {url}") from None

    async def discovery(self) -> dict:
        if self._discovery is None or time.monotonic() > self._discovery_expires:
            document, _ = await self._get_json(self.issuer + "/.well-known/openid-configuration")
            if document.get("issuer", "").rstrip("/") != self.issuer:
                raise IdentityError("the identity provider's discovery document names another issuer")
            for needed in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(document.get(needed), str):
                    raise IdentityError(f"the identity provider's discovery lacks {needed}")
            self._discovery = document
            self._discovery_expires = time.monotonic() + DISCOVERY_TTL
        return self._discovery

    async def _jwks_body(self, force: bool = False) -> bytes:
        if force or self._jwks is None or time.monotonic() > self._jwks_expires:
            document, ttl = await self._get_json((await self.discovery())["jwks_uri"])
            self._jwks = json.dumps(document).encode()
            self._jwks_expires = time.monotonic() + min(max(ttl, 60.0), 86400.0)
        return self._jwks

    async def start_login(self, login_hint: str = "", force_login: bool = False) -> LoginStart:
        discovery = await self.discovery()
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": "openid email profile",
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if login_hint:
            params["login_hint"] = login_hint
        if force_login:
            params["prompt"] = "login"
        else:
            params["prompt"] = "select_account" if "accounts.google.com" in self.issuer else ""
        params = {k: v for k, v in params.items() if v}
        url = discovery["authorization_endpoint"]
        return LoginStart(f"{url}{'&' if '?' in url else '?'}{urlencode(params)}", state, nonce, verifier)

    async def finish_login(self, code: str, code_verifier: str, nonce: str) -> IdentityClaims:
        discovery = await self.discovery()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": code_verifier,
        }
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        methods = discovery.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        if "client_secret_post" in methods:
            form.update(client_id=self.client_id, client_secret=self._client_secret)
        else:
            basic = f"{quote(self.client_id, safe='')}:{quote(self._client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
        body = urlencode(form)
        try:
            response = await self._http.fetch(
                HTTPRequest(
                    discovery["token_endpoint"],
                    method="POST",
                    body=body,
                    headers=headers,
                    connect_timeout=5,
                    request_timeout=10,
                    follow_redirects=False,
                )
            )
            tokens = json.loads(response.body)
        except HTTPClientError as exc:
            log.warning("IdP token endpoint answered HTTP %s", exc.code)
            raise IdentityError("the identity provider refused the sign-in code") from None
        except (OSError, ValueError):
            raise IdentityError("the identity provider's token endpoint failed") from None
        raw = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(raw, str):
            raise IdentityError("the identity provider returned no ID token")
        return await self.verify_id_token(raw, nonce)

    async def verify_id_token(self, raw: str, nonce: str) -> IdentityClaims:
        claims = None
        for force in (False, True):  # a key rotation at the IdP: refetch the JWKS once
            try:
                claims = google_id_token.verify_token(
                    raw,
                    _CachedCertsRequest(await self._jwks_body(force)),
                    audience=self.client_id,
                    clock_skew_in_seconds=CLOCK_SKEW,
                )
                break
            except Exception as exc:  # google-auth and PyJWT raise many types
                if force or "signing key" not in str(exc):
                    log.warning("ID token rejected: %s", type(exc).__name__)
                    raise IdentityError("the identity provider's ID token did not verify") from None
        if claims.get("iss", "").rstrip("/") != self.issuer and not (
            self.issuer == "https://accounts.google.com" and claims.get("iss") == "accounts.google.com"
        ):
            raise IdentityError("the ID token was issued by another issuer")
        if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise IdentityError("the ID token's nonce does not match this sign-in")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise IdentityError("the ID token has no subject")
        verified = claims.get("email_verified") in (True, "true")
        return IdentityClaims(
            sub=claims["sub"],
            email=str(claims.get("email", "")).lower(),
            email_verified=verified,
            hd=str(claims.get("hd", "")).lower(),
            name=str(claims.get("name", ""))[:200],
            picture=str(claims.get("picture", ""))[:1000],
        )


def dev_subject(email: str) -> str:
    """The stable subject of a local dev sign-in (no IdP to issue one)."""
    return "dev-" + hashlib.sha256(email.lower().encode()).hexdigest()[:24]


class SignInError(Exception):
    """A sign-in that cannot go on: shown to the person as a page (status, title, message)."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


LOGIN_TTL = 600  # a person may take ten minutes at the identity provider


class Accounts:
    """Signing people in: the identity provider's leg (a single-use, server-side state
    created right before the redirect), the local dev sign-in, and what a successful
    sign-in changes (the user row keyed by `sub`; servers registered for this e-mail
    before the person ever signed in get bound to them)."""

    def __init__(self, storage, identity: OidcIdentityProvider | None):
        self._storage = storage
        self._identity = identity

    async def begin(self, next_path: str, force_login: bool) -> str:
        """The identity provider URL to send the browser to."""
        try:
            start = await self._identity.start_login(force_login=force_login)
        except IdentityError as exc:
            raise SignInError(502, "Sign-in is unavailable", str(exc)) from None
        await self._storage.put_pending(
            Pending(
                kind="login",
                key=start.state,
                payload={"nonce": start.nonce, "verifier": start.code_verifier, "next": next_path},
                expires_at=time.time() + LOGIN_TTL,
            )
        )
        return start.url

    async def finish(self, state: str, code: str, error: str | None) -> tuple[User, str]:
        """The return from the identity provider: the signed-in user and where to go next."""
        pending = await self._storage.take_pending("login", state, time.time()) if state else None
        if error:  # some IdPs send no state with an error: nothing to look up then
            raise SignInError(403, "Sign-in was cancelled", f"The identity provider answered: {error[:100]}")
        if pending is None:
            raise SignInError(400, "This sign-in has expired", "Start again from your application or the dashboard.")
        if not code:
            raise SignInError(400, "Sign-in failed", "The identity provider sent no code.")
        try:
            claims = await self._identity.finish_login(code, pending.payload["verifier"], pending.payload["nonce"])
        except IdentityError as exc:
            raise SignInError(502, "Sign-in failed", str(exc)) from None
        return await self.sign_in(claims), pending.payload.get("next", "")

    async def dev_sign_in(self, email: str) -> User:
        """The local sign-in (MCPGW_DEV_LOGIN, loopback only): the address is trusted as typed."""
        try:
            email = check_email(email)
        except InvalidInput:
            raise SignInError(400, "Sign in", "Enter a valid e-mail address.") from None
        return await self.sign_in(
            IdentityClaims(sub=dev_subject(email), email=email, email_verified=True, hd="",
                           name=email.split("@")[0], picture="")
        )

    async def sign_in(self, claims: IdentityClaims) -> User:
        now = time.time()
        previous = await self._storage.get_user(claims.sub)
        user = await self._storage.upsert_user(
            User(
                sub=claims.sub,
                email=claims.email,
                email_verified=claims.email_verified,
                hd=claims.hd,
                name=claims.name,
                picture=claims.picture,
                created_at=previous.created_at if previous else now,
                last_login_at=now,
            )
        )
        if claims.email and claims.email_verified:
            await self._storage.bind_owner(claims.email, claims.sub)
        return user
