"""The upstream identity provider (OIDC, Google by default): discovery, the authorization URL,
the code exchange, and ID-token verification with PyJWT against a JWKS cached by Cache-Control."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import jwt
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from services.common.errors import IdentityError
from services.common.validation import max_age

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
                 timeout: float = REQUEST_TIMEOUT, *, clock: Callable[[], float] = time.monotonic):
        self.issuer = issuer
        self._clock = clock
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
        if self._discovery is None or self._clock() > self._discovery_expires:
            document, _ = await self._get_json(self.issuer + "/.well-known/openid-configuration", "discovery")
            if document.get("issuer", "").rstrip("/") != self.issuer:
                raise IdentityError("the identity provider's discovery document names another issuer")
            for needed in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(document.get(needed), str):
                    raise IdentityError(f"the identity provider's discovery lacks {needed}")
            self._discovery = document
            self._discovery_expires = self._clock() + DISCOVERY_TTL
        return self._discovery

    async def _key_set(self, force: bool = False) -> dict:
        if force or self._jwks is None or self._clock() > self._jwks_expires:
            document, ttl = await self._get_json((await self.discovery())["jwks_uri"], "key set")
            self._jwks = document
            self._jwks_expires = self._clock() + min(max(ttl, 60.0), 86400.0)
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


