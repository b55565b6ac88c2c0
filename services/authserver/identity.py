"""The upstream identity provider (OIDC, Google by default): discovery, the authorization
URL, the code exchange and ID-token verification.

The HTTP work is asynchronous (Tornado's client). ID tokens are verified with PyJWT against
a JWKS this module fetched and cached by its Cache-Control header, so no blocking call
happens on the event loop; a token with or without `kid` is accepted as OpenID Connect
Core §10.1 allows, within the clock leeway.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import jwt
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from services.common.errors import IdentityError, InvalidInput, PageError
from services.common.servers import check_email
from services.common.validation import max_age
from storage.base import Pending, User

log = logging.getLogger("gateway.identity")

DISCOVERY_TTL = 3600.0
DEFAULT_JWKS_TTL = 3600.0
CLOCK_SKEW = 60  # seconds of leeway on exp, iat and nbf: the IdP's clock is not ours
CONNECT_TIMEOUT, REQUEST_TIMEOUT = 5.0, 10.0

# The signature algorithms an ID token may use, and the JWK type (and curve) each needs.
# Asymmetric only: "none" is never acceptable and HS* would make the client secret a
# verification key (OIDC Core §10.1), which a confidential web client must not accept.
SIGNING_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat"]  # OIDC Core §2


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


def fetch_failure(exc: Exception, what: str) -> IdentityError:
    """Name the fault as it was: Tornado reports a timeout and a dropped connection as
    HTTP 599, which is no answer from the IdP at all."""
    timed_out = isinstance(exc, HTTPClientError) and exc.code == 599 and "timeout" in str(exc).lower()
    if isinstance(exc, HTTPTimeoutError) or timed_out:
        return IdentityError(f"the identity provider did not answer in time ({what} timed out)", 504)
    if isinstance(exc, HTTPStreamClosedError) or (isinstance(exc, HTTPClientError) and exc.code == 599):
        return IdentityError(f"the identity provider closed the connection before answering ({what})")
    if isinstance(exc, HTTPClientError):
        return IdentityError(f"the identity provider answered HTTP {exc.code} ({what})")
    if isinstance(exc, TimeoutError):
        return IdentityError(f"the identity provider did not answer in time ({what} timed out)", 504)
    return IdentityError(f"the identity provider is unreachable ({what}: {exc.strerror or exc})")


def signing_keys(jwks: dict, alg: str, kid: str | None) -> list[jwt.PyJWK]:
    """The keys of `jwks` that may have signed a token with this header: the key named by
    `kid`; without `kid`, every signing key of the algorithm's type (OIDC Core §10.1 lets
    a provider leave `kid` out; when its set holds several keys, try each)."""
    kty, crv = SIGNING_KEY_TYPES[alg]
    found = []
    for jwk in jwks.get("keys", []) if isinstance(jwks.get("keys"), list) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != kty:
            continue
        if kid is not None and jwk.get("kid") != kid:
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", alg) != alg:
            continue  # an encryption key, or one published for another algorithm
        if crv is not None and jwk.get("crv") != crv:
            continue
        if kty == "OKP" and jwk.get("crv") not in ("Ed25519", "Ed448"):
            continue
        try:
            found.append(jwt.PyJWK(jwk, algorithm=alg))
        except jwt.PyJWTError:
            continue  # a malformed member must not hide the good ones
    return found


class OidcIdentityProvider:
    def __init__(self, issuer: str, client_id: str, client_secret: str, redirect_uri: str,
                 timeout: float = REQUEST_TIMEOUT):
        self.issuer = issuer
        self.client_id = client_id
        self._client_secret = client_secret
        self.redirect_uri = redirect_uri
        self._timeout = timeout
        self._discovery: dict | None = None
        self._discovery_expires = 0.0
        self._jwks: dict | None = None
        self._jwks_expires = 0.0
        self._http = AsyncHTTPClient()

    def _request(self, url: str, **kwargs) -> HTTPRequest:
        return HTTPRequest(url, connect_timeout=min(CONNECT_TIMEOUT, self._timeout),
                           request_timeout=self._timeout, follow_redirects=False, **kwargs)

    async def _get_json(self, url: str, what: str) -> tuple[dict, float]:
        try:
            response = await self._http.fetch(self._request(url))
        except (HTTPClientError, OSError) as exc:
            raise fetch_failure(exc, what) from None
        seconds = max_age(response.headers.get("Cache-Control"))
        ttl = float(seconds) if seconds is not None else DEFAULT_JWKS_TTL
        try:
            document = json.loads(response.body)
        except ValueError:
            raise IdentityError(f"the identity provider sent invalid JSON ({what})") from None
        if not isinstance(document, dict):
            raise IdentityError(f"the identity provider sent no JSON object ({what})")
        return document, ttl

    async def discovery(self) -> dict:
        if self._discovery is None or time.monotonic() > self._discovery_expires:
            document, _ = await self._get_json(self.issuer + "/.well-known/openid-configuration", "discovery")
            if document.get("issuer", "").rstrip("/") != self.issuer:
                raise IdentityError("the identity provider's discovery document names another issuer")
            for needed in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(document.get(needed), str):
                    raise IdentityError(f"the identity provider's discovery lacks {needed}")
            self._discovery = document
            self._discovery_expires = time.monotonic() + DISCOVERY_TTL
        return self._discovery

    async def _key_set(self, force: bool = False) -> dict:
        if force or self._jwks is None or time.monotonic() > self._jwks_expires:
            document, ttl = await self._get_json((await self.discovery())["jwks_uri"], "key set")
            self._jwks = document
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
        try:
            response = await self._http.fetch(
                self._request(discovery["token_endpoint"], method="POST", body=urlencode(form), headers=headers)
            )
        except HTTPClientError as exc:
            if 400 <= exc.code < 500:
                # invalid_grant and friends: the code was refused (used, expired, not ours).
                log.warning("IdP token endpoint answered HTTP %s", exc.code)
                raise IdentityError("the identity provider refused the sign-in code") from None
            raise fetch_failure(exc, "token endpoint") from None
        except OSError as exc:
            raise fetch_failure(exc, "token endpoint") from None
        try:
            tokens = json.loads(response.body)
        except ValueError:
            raise IdentityError("the identity provider's token endpoint sent invalid JSON") from None
        raw = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(raw, str):
            raise IdentityError("the identity provider returned no ID token")
        return await self.verify_id_token(raw, nonce)

    def _issuers(self) -> tuple[str, ...]:
        issuers = (self.issuer, self.issuer + "/")
        if self.issuer == "https://accounts.google.com":
            issuers += ("accounts.google.com",)  # Google documents both spellings
        return issuers

    async def verify_id_token(self, raw: str, nonce: str) -> IdentityClaims:
        """OIDC Core §3.1.3.7: signature by a key of the IdP's set, iss, aud (and azp when
        there are several audiences), exp/iat/nbf within CLOCK_SKEW, then the nonce."""
        try:
            header = jwt.get_unverified_header(raw)
        except jwt.PyJWTError:
            raise IdentityError("the identity provider's ID token is malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in SIGNING_KEY_TYPES:
            log.warning("ID token rejected: algorithm %r", alg)
            raise IdentityError("the identity provider's ID token uses an algorithm the gateway does not accept")
        if kid is not None and not isinstance(kid, str):
            raise IdentityError("the identity provider's ID token is malformed")
        claims = None
        # Refetch the key set once: a rotation at the IdP (an unknown kid, or, without kid,
        # a signature no cached key verifies).
        for force in (False, True):
            keys = signing_keys(await self._key_set(force), alg, kid)
            claims = self._decode(raw, alg, keys)
            if claims is not None:
                break
            if force or (keys and kid is not None):
                log.warning("ID token rejected: no key of the set verifies it (kid %r, %d candidates)",
                            kid, len(keys))
                raise IdentityError("the identity provider's ID token did not verify")
        audience = claims["aud"]
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != self.client_id:
            raise IdentityError("the ID token was issued to another client")
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

    def _decode(self, raw: str, alg: str, keys: list[jwt.PyJWK]) -> dict | None:
        """The verified claims; None when no key's signature matches (try another set);
        IdentityError when a key verifies the signature but a claim is wrong."""
        for key in keys:
            try:
                return jwt.decode(
                    raw,
                    key.key,
                    algorithms=[alg],
                    audience=self.client_id,
                    issuer=self._issuers(),
                    leeway=CLOCK_SKEW,
                    options={"require": REQUIRED_CLAIMS},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise IdentityError("the identity provider's ID token has expired") from None
            except jwt.ImmatureSignatureError:
                raise IdentityError("the identity provider's ID token is not valid yet (check the clocks)") from None
            except jwt.InvalidAudienceError:
                raise IdentityError("the ID token was issued to another client") from None
            except jwt.InvalidIssuerError:
                raise IdentityError("the ID token was issued by another issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise IdentityError(f"the ID token lacks the {exc.claim} claim") from None
            except jwt.PyJWTError as exc:
                log.warning("ID token rejected: %s", type(exc).__name__)
                raise IdentityError("the identity provider's ID token did not verify") from None
        return None


def dev_subject(email: str) -> str:
    """The stable subject of a local dev sign-in (no IdP to issue one)."""
    return "dev-" + hashlib.sha256(email.lower().encode()).hexdigest()[:24]


LOGIN_TTL = 600  # a person may take ten minutes at the identity provider
SESSION_CHECK_TTL = 1.0  # a positive session check is reused this long, on this instance only
SESSION_CACHE_SIZE = 10000
_BROWSER_KEY = re.compile(r"[A-Za-z0-9_-]{32,64}")


def secret_digest(secret: str) -> str:
    """What storage keeps of a browser secret (a session id, a login binding): a reader
    of the database cannot replay it."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class LoginRedirect:
    """Where to send the browser, and the value of the login-binding cookie that must come
    back with the IdP's answer (RFC 6749 §10.12: the state is bound to this browser)."""

    url: str
    browser_key: str


@dataclass(frozen=True)
class SignInSession:
    """A browser sign-in: the cookie carries `sid`; storage holds its digest (Pending kind
    "signin"), so logout, "sign out everywhere" and user removal end it server-side."""

    sid: str
    started_at: float
    expires_at: float


class Accounts:
    """Signing people in: the identity provider's leg (a single-use, server-side state
    created right before the redirect and bound to the browser that started it), the local
    dev sign-in, what a successful sign-in changes (the user row keyed by `sub`; servers
    registered for this e-mail before the person ever signed in get bound to them), and
    the server-side sign-in sessions behind the browser cookie."""

    def __init__(self, storage, identity: OidcIdentityProvider | None, access=None, signin_ttl: int = 43200):
        self._storage = storage
        self._identity = identity
        self._access = access  # AccessPolicy: told at once when a sign-in binds servers
        self._signin_ttl = signin_ttl
        self._live: dict[str, tuple[float, str]] = {}  # sid digest -> (checked until, sub)

    # ------------------------------------------------------------- the IdP's leg

    async def begin(self, next_path: str, force_login: bool, browser_key: str | None = None) -> LoginRedirect:
        """The identity provider URL to send the browser to. `browser_key` is the login
        cookie the browser already holds (reused, so that two tabs signing in at once
        both finish), else a new one is made."""
        if not isinstance(browser_key, str) or not _BROWSER_KEY.fullmatch(browser_key):
            browser_key = secrets.token_urlsafe(32)
        try:
            start = await self._identity.start_login(force_login=force_login)
        except IdentityError as exc:
            raise PageError(exc.status, "Sign-in is unavailable", str(exc)) from None
        await self._storage.put_pending(
            Pending(
                kind="login",
                key=start.state,
                payload={"nonce": start.nonce, "verifier": start.code_verifier, "next": next_path,
                         "browser": secret_digest(browser_key)},
                expires_at=time.time() + LOGIN_TTL,
            )
        )
        return LoginRedirect(start.url, browser_key)

    async def finish(self, state: str, code: str, error: str | None,
                     browser_key: str | None = None) -> tuple[User, str]:
        """The return from the identity provider: the signed-in user and where to go next.

        The state must have been started by this browser (its login cookie). A callback
        URL opened in another browser is refused without consuming the state, so the
        browser it belongs to can still finish; nothing is signed in either way."""
        now = time.time()
        pending = await self._storage.get_pending("login", state, now) if state else None
        if pending is not None:
            expected = str(pending.payload.get("browser", ""))
            offered = secret_digest(browser_key) if isinstance(browser_key, str) and browser_key else ""
            if not expected or not secrets.compare_digest(expected, offered):
                log.warning("sign-in callback refused: its state was started in another browser")
                raise PageError(
                    403, "This sign-in was started in another browser",
                    "A sign-in must end in the browser where it began. "
                    "Start again from your application or the dashboard, in this browser.",
                )
            pending = await self._storage.take_pending("login", state, now)  # single use
        if error:  # some IdPs send no state with an error: nothing to look up then
            raise PageError(403, "Sign-in was cancelled", f"The identity provider answered: {error[:100]}")
        if pending is None:
            raise PageError(400, "This sign-in has expired", "Start again from your application or the dashboard.")
        if not code:
            raise PageError(400, "Sign-in failed", "The identity provider sent no code.")
        try:
            claims = await self._identity.finish_login(code, pending.payload["verifier"], pending.payload["nonce"])
        except IdentityError as exc:
            title = "Sign-in timed out" if exc.status == 504 else "Sign-in failed"
            raise PageError(exc.status, title, str(exc)) from None
        return await self.sign_in(claims), pending.payload.get("next", "")

    async def dev_sign_in(self, email: str) -> User:
        """The local sign-in (MCPGW_DEV_LOGIN, loopback only): the address is trusted as typed."""
        try:
            email = check_email(email)
        except InvalidInput:
            raise PageError(400, "Sign in", "Enter a valid e-mail address.") from None
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
            if await self._storage.bind_owner(claims.email, claims.sub) and self._access is not None:
                # Until now the e-mail alone made its holder the owner; from now on only
                # this `sub` is. The cached rules must not grant another account with the
                # same e-mail for the rest of their TTL.
                for server in await self._storage.servers_owned_by(claims.sub):
                    self._access.forget(server.server_id)
        return user

    # --------------------------------------------------------- browser sessions

    async def start_session(self, sub: str) -> SignInSession:
        now = time.time()
        sid = secrets.token_urlsafe(32)
        await self._storage.put_pending(
            Pending(kind="signin", key=secret_digest(sid), payload={"sub": sub, "started_at": now},
                    expires_at=now + self._signin_ttl)
        )
        return SignInSession(sid, now, now + self._signin_ttl)

    async def session_is_live(self, sid, sub) -> bool:
        """Whether the cookie's session still stands: not logged out, not older than the
        user's last "sign out everywhere", and the user still exists. Three key lookups,
        reused for SESSION_CHECK_TTL when positive."""
        if not isinstance(sid, str) or not sid or not isinstance(sub, str) or not sub:
            return False
        key = secret_digest(sid)
        cached = self._live.get(key)
        if cached is not None and cached[0] > time.monotonic() and cached[1] == sub:
            return True
        now = time.time()
        session, epoch, user = await asyncio.gather(
            self._storage.get_pending("signin", key, now),
            self._storage.get_pending("signout-all", sub, now),
            self._storage.get_user(sub),
        )
        live = (
            session is not None
            and session.payload.get("sub") == sub
            and user is not None
            and (epoch is None or float(session.payload.get("started_at", 0)) > float(epoch.payload.get("at", 0)))
        )
        if live:
            if len(self._live) >= SESSION_CACHE_SIZE:
                self._live.clear()
            self._live[key] = (time.monotonic() + SESSION_CHECK_TTL, sub)
        else:
            self._live.pop(key, None)
        return live

    async def end_session(self, sid) -> None:
        """Logout: the session stops working at once here, and on other instances within
        SESSION_CHECK_TTL."""
        if not isinstance(sid, str) or not sid:
            return
        key = secret_digest(sid)
        self._live.pop(key, None)
        await self._storage.take_pending("signin", key, time.time())

    async def end_all_sessions(self, sub: str) -> None:
        """"Sign out everywhere": every session of `sub` started before now stops working.
        Stored as an epoch (Pending kind "signout-all"), kept as long as a session lives."""
        now = time.time()
        for key, (_, owner) in list(self._live.items()):
            if owner == sub:
                self._live.pop(key, None)
        await self._storage.put_pending(
            Pending(kind="signout-all", key=sub, payload={"at": now}, expires_at=now + self._signin_ttl + 60)
        )
