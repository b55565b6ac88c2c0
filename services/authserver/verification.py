"""Access-token verification for the proxy's hot path (a verified-token cache in front of
RS256) and this instance's copy of the revocation set it checks."""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt

from config import Config
from services.authserver.claims import ACCESS_TOKEN_TYPES, InvalidToken, claim_type_problem
from services.authserver.keys import KeyRing, token_hash
from services.common.cache import TtlCache
from storage.base import RevokedAccessToken, Storage

VERIFIED_CACHE_SIZE = 20000
REVOCATION_REFRESH = 3.0  # revocations made on another instance apply within this bound
# iat/nbf a little in the future are accepted: a token issued by another instance whose clock runs
# a few seconds ahead (or in the same second, before this clock ticks) is valid. exp has none.
ISSUED_LEEWAY = 60


def family_marker(family_id: str) -> str:
    """The revocation entry (in the revoked access tokens) that stops a whole family."""
    return "fid:" + family_id


class AccessTokenVerifier:
    """Claims of valid, unrevoked access tokens of this issuer. A token is verified once;
    its claims are then cached by the token's hash until its `exp` (wall clock `now`), so a
    warm check is a hash, a dict hit, an `exp` comparison and two set lookups."""

    def __init__(self, storage: Storage, keyring: KeyRing, config: Config, *,
                 now: Callable[[], float] = time.time):
        self._storage = storage
        self._keys = keyring
        self._config = config
        self._now = now
        self.cache = TtlCache(VERIFIED_CACHE_SIZE, clock=now)
        # jti and fid: markers of unexpired revocations: reloaded every REVOCATION_REFRESH
        # seconds, and added to at once by revocations made here.
        self.revoked: set[str] = set()

    async def verify(self, token: str) -> dict:
        """Claims of a valid, unrevoked access token (audience is the caller's check)."""
        key = token_hash(token)
        claims = self.cache.get(key)
        if claims is None:
            claims = await self.decode(token)  # checks exp too
            self.cache.set(key, claims)
        elif claims["exp"] <= self._now():
            # Entries carry no TTL of their own (one clock read per hit, not two): an
            # expired one goes when it is next seen, or as the least recently used.
            self.cache.pop(key)
            raise InvalidToken("the access token has expired")
        revoked = self.revoked
        if claims["jti"] in revoked or ("fid:" + claims.get("fid", "")) in revoked:
            raise InvalidToken("the access token has been revoked")
        return claims

    async def decode(self, token: str, verify_exp: bool = True) -> dict:
        """The claims of a JWT this gateway signed as an access token (RFC 9068), checked
        for issuer, required claims and their types, and (`verify_exp`) for being valid
        now by the service's clock; InvalidToken otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the access token is not a JWT") from None
        if header.get("alg") != "RS256" or not isinstance(header.get("kid"), str):
            raise InvalidToken("the access token is not signed by this gateway")
        # RFC 9068 §4: the gateway signs other JWTs with the same key (identity assertions
        # for upstreams, typ JWT); only typ at+jwt is an access token.
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
            raise InvalidToken("the token is not an access token (typ must be at+jwt)")
        if not await self._keys.ensure_kid(header["kid"]):
            raise InvalidToken("the access token is signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                self._keys.public_key(header["kid"]),
                algorithms=["RS256"],
                issuer=self._config.issuer,
                # Times are checked below against the service's clock, not PyJWT's.
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["exp", "iat", "sub", "aud", "jti", "iss"],
                },
            )
        except jwt.PyJWTError:
            raise InvalidToken("the access token did not verify") from None
        problem = claim_type_problem(claims)
        if problem:
            raise InvalidToken(f"the access token is malformed: {problem}")
        if verify_exp:
            now = self._now()
            if claims["exp"] <= now:
                raise InvalidToken("the access token has expired")
            if claims["iat"] > now + ISSUED_LEEWAY or claims.get("nbf", now) > now + ISSUED_LEEWAY:
                raise InvalidToken("the access token did not verify (not valid yet)")
        return claims

    async def refresh_revocations(self) -> None:
        """Run every REVOCATION_REFRESH seconds by the app, off the request path."""
        revoked = await self._storage.revoked_access_tokens(self._now())
        self.revoked = {r.jti for r in revoked}

    async def store_revocation(self, jti: str, expires_at: float) -> None:
        """Revoke a jti (or a family marker) in storage and here at once."""
        await self._storage.revoke_access_token(RevokedAccessToken(jti, expires_at))
        self.revoked.add(jti)

    async def family_marked_revoked(self, family_id: str) -> bool:
        """Whether a family's marker was stored, on any instance. Reads the (small, bounded
        by the access-token lifetime) revocation set from storage and refreshes this
        instance's copy with it on the way."""
        marker = family_marker(family_id)
        if marker in self.revoked:
            return True
        revoked = {r.jti for r in await self._storage.revoked_access_tokens(self._now())}
        self.revoked |= revoked
        return marker in revoked
