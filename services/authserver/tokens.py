"""Authorization codes, access tokens (RS256 JWT), refresh-token rotation with reuse
detection, revocation, and access-token verification for the proxy's hot path.

Rotation rule (DESIGN.md): redeeming RT0 returns RT1 and marks RT0 used. Presenting RT0
again while RT1 is unused and within GRACE seconds returns the same RT1 (a retry after a
lost response); any other reuse is theft and revokes the whole family. Concurrent
redemptions of one token in one process are single-flight; across processes the
conditional write in storage decides and the loser takes the grace path.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from urllib.parse import urlsplit

import jwt

from config import Config
from services.authserver.claims import (
    ACCESS_TOKEN_TYPES,
    VERIFIER_RE,
    Audience,
    InvalidToken,
    claim_type_problem,
    principal_of,
    s256,
)
from services.authserver.keys import KeyRing, SecretBox, token_hash
from services.common.access import AccessPolicy
from services.common.errors import (
    AccessDenied,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    UnsupportedGrantType,
)
from services.common.scopes import MCP_SCOPES, SUPPORTED_SCOPES
from storage.base import (
    AuthCode,
    Client,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Storage,
    User,
)

CODE_TTL = 60
GRACE = 30.0
VERIFIED_CACHE_SIZE = 20000
REVOCATION_REFRESH = 3.0  # revocations made on another instance apply within this bound


class TokenService:
    def __init__(
        self,
        storage: Storage,
        keyring: KeyRing,
        box: SecretBox,
        access: AccessPolicy,
        config: Config,
    ):
        self._storage = storage
        self._keys = keyring
        self._box = box
        self._access = access
        self._config = config
        self._verified: OrderedDict[str, dict] = OrderedDict()
        self._revoked: set[str] = set()
        self._inflight: dict[str, asyncio.Future] = {}

    # ----------------------------------------------------------------- audiences

    async def resolve_audience(self, resource: str | None) -> Audience:
        """RFC 8707: no resource means the base resource; otherwise it must name a known
        server or the base. Scheme and host compare case-insensitively; a trailing slash
        is tolerated."""
        base = self._config.base_resource
        if not resource:
            return Audience(base, "")
        try:
            parts = urlsplit(resource)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            raise InvalidTarget("resource is not a valid URL") from None
        if parts.fragment:
            raise InvalidTarget("resource must not have a fragment")
        origin = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        path = parts.path.rstrip("/")
        if origin == self._config.public_url and not parts.query:
            if path in ("", "/mcp"):
                return Audience(base, "")
            if path.startswith("/mcp/") and "/" not in path[5:]:
                server_id = path[5:]
                if await self._access.server(server_id) is not None:
                    return Audience(self._config.server_resource(server_id), server_id)
        raise InvalidTarget("resource does not name an MCP server of this gateway")

    def audience_for(self, value: str) -> Audience:
        if value.startswith(self._config.base_resource) and value != self._config.base_resource:
            return Audience(value, value[len(self._config.base_resource) :])
        return Audience(value, "")

    async def check_access(self, user: User, audience: Audience) -> None:
        if audience.server_id:
            decision = await self._access.decide(principal_of(user), audience.server_id)
            if not decision.allowed:
                raise AccessDenied(decision.reason)

    # ------------------------------------------------------------------- codes

    async def issue_code(
        self,
        *,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        user_sub: str,
        scope: str,
        audience: str,
    ) -> str:
        code = secrets.token_urlsafe(32)
        await self._storage.put_code(
            AuthCode(
                code_hash=token_hash(code),
                client_id=client_id,
                redirect_uri=redirect_uri,
                code_challenge=code_challenge,
                user_sub=user_sub,
                scope=scope,
                audience=audience,
                expires_at=time.time() + CODE_TTL,
                family_id=secrets.token_urlsafe(16),
            )
        )
        return code

    async def grant(self, client: Client, form: Mapping[str, str]) -> dict:
        """The token endpoint's answer for an authenticated client's form (RFC 6749 §3.2),
        dispatched on grant_type: authorization_code or refresh_token."""
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            if not form.get("code") or not form.get("code_verifier"):
                raise InvalidRequest("code and code_verifier are required")
            return await self.exchange_code(
                client, form["code"], form.get("redirect_uri"), form["code_verifier"], form.get("resource")
            )
        if grant_type == "refresh_token":
            if not form.get("refresh_token"):
                raise InvalidRequest("refresh_token is required")
            return await self.refresh(client, form["refresh_token"], form.get("scope"), form.get("resource"))
        if not grant_type:
            raise InvalidRequest("grant_type is required")
        raise UnsupportedGrantType("use authorization_code or refresh_token")

    async def exchange_code(
        self,
        client: Client,
        code: str,
        redirect_uri: str | None,
        code_verifier: str,
        resource: str | None,
    ) -> dict:
        if not VERIFIER_RE.match(code_verifier):
            raise InvalidRequest("code_verifier must be 43-128 characters of [A-Za-z0-9-._~]"
            )
        record, first_use = await self._storage.redeem_code(token_hash(code))
        if record is None:
            raise InvalidGrant("unknown authorization code")
        if not first_use:
            # RFC 6749 §4.1.2: a replayed code revokes what it issued.
            await self.revoke_family(record.family_id)
            raise InvalidGrant("authorization code already used")
        if record.expires_at < time.time():
            raise InvalidGrant("authorization code expired")
        if record.client_id != client.client_id:
            raise InvalidGrant("authorization code was issued to another client")
        if redirect_uri is not None and redirect_uri != record.redirect_uri:
            raise InvalidGrant("redirect_uri differs from the authorization request")
        if not hmac.compare_digest(s256(code_verifier), record.code_challenge):
            raise InvalidGrant("code_verifier does not match the code_challenge")
        user, audience = await self._still_allowed(record.user_sub, record.audience, resource)

        now = time.time()
        refresh = secrets.token_urlsafe(32)
        family = RefreshFamily(
            family_id=record.family_id,
            client_id=client.client_id,
            user_sub=user.sub,
            audience=audience.value,
            scope=record.scope,
            created_at=now,
            expires_at=now + self._config.refresh_absolute_ttl,
            last_used_at=now,
        )
        await self._storage.create_family(family, self._refresh_record(refresh, family, now))
        if await self._family_marked_revoked(family.family_id):
            # A replay of this code came in while it was being redeemed: its revoke_family
            # found no family row yet, but its marker (written first) is seen here, so the
            # family is revoked all the same. The response still goes out (this request
            # won; the replay revokes what it issued): its tokens are dead on arrival.
            await self._storage.revoke_family(family.family_id, time.time())
        return self._token_response(user, client.client_id, record.scope, audience, family, refresh)

    async def _narrow_audience(self, audience: Audience, resource: str | None) -> Audience:
        """A token request may repeat the audience, or name one server of a base grant."""
        if not resource:
            return audience
        wanted = await self.resolve_audience(resource)
        if wanted.value == audience.value or (not audience.server_id and wanted.server_id):
            return wanted
        raise InvalidTarget("resource differs from the one authorized")

    # ----------------------------------------------------------- refresh tokens

    async def refresh(
        self, client: Client, refresh_token: str, scope: str | None, resource: str | None
    ) -> dict:
        key = token_hash(refresh_token)
        # Only identical requests share a result: a concurrent request by another client
        # (or for another scope or resource) goes through every check itself.
        flight = (key, client.client_id, scope or "", resource or "")
        pending = self._inflight.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            result = await self._refresh(client, key, scope, resource)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may not exist
            raise
        finally:
            del self._inflight[flight]

    async def _refresh(
        self, client: Client, key: str, scope: str | None, resource: str | None
    ) -> dict:
        now = time.time()
        record = await self._storage.get_refresh_token(key)
        if record is None or record.client_id != client.client_id:
            raise InvalidGrant("unknown refresh token")
        family = await self._storage.get_family(record.family_id)
        if (family is None or family.revoked_at or family.expires_at < now
                or _family_marker(family.family_id) in self._revoked):
            raise InvalidGrant("this authorization was revoked or has expired")
        if record.expires_at < now:
            raise InvalidGrant("refresh token expired (unused for too long)")
        granted = record.scope.split()
        requested = scope.split() if scope else granted
        if not set(requested) <= set(granted):
            raise InvalidScope("scope may only narrow on refresh")
        if not any(s in requested for s in MCP_SCOPES):
            # A token without mcp:connect or mcp:invoke could not reach any MCP server.
            raise InvalidScope("a refreshed scope must keep mcp:connect or mcp:invoke")
        token_scope = " ".join(s for s in SUPPORTED_SCOPES if s in requested)
        user, audience = await self._still_allowed(record.user_sub, family.audience, resource)

        if not record.used_at:
            successor = secrets.token_urlsafe(32)
            sealed = self._box.seal(successor.encode(), "refresh:" + key)
            if await self._storage.rotate_refresh_token(
                key, self._refresh_record(successor, family, now), sealed, now
            ):
                return self._token_response(
                    user, client.client_id, token_scope, audience, family, successor
                )
            record = await self._storage.get_refresh_token(key)  # another instance won
        successor = await self._grace_successor(record, now)
        if successor is None:
            await self.revoke_family(family.family_id)
            raise InvalidGrant("refresh token reused: the authorization is revoked")
        return self._token_response(user, client.client_id, token_scope, audience, family, successor)

    async def _grace_successor(self, record: RefreshToken, now: float) -> str | None:
        """The successor of a just-rotated token, if this reuse is a lost-response retry."""
        if not record.successor_enc or now - record.used_at > GRACE:
            return None
        successor = await self._storage.get_refresh_token(record.replaced_by)
        if successor is None or successor.used_at:
            return None
        return self._box.open(record.successor_enc, "refresh:" + record.token_hash).decode()

    def _refresh_record(self, token: str, family: RefreshFamily, now: float) -> RefreshToken:
        return RefreshToken(
            token_hash=token_hash(token),
            family_id=family.family_id,
            client_id=family.client_id,
            user_sub=family.user_sub,
            scope=family.scope,
            audience=family.audience,
            created_at=now,
            expires_at=min(now + self._config.refresh_idle_ttl, family.expires_at),
            family_expires_at=family.expires_at,
        )

    # ------------------------------------------------------------ access tokens

    def _token_response(
        self,
        user: User,
        client_id: str,
        scope: str,
        audience: Audience,
        family: RefreshFamily,
        refresh_token: str,
    ) -> dict:
        ttl = self._config.access_token_ttl
        return {
            "access_token": self.mint_access_token(user, client_id, scope, audience.value, family.family_id),
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": scope,
            "refresh_token": refresh_token,
        }

    def mint_access_token(
        self, user: User, client_id: str, scope: str, audience: str, family_id: str
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": self._config.issuer,
            "sub": user.sub,
            "aud": audience,
            "scope": " ".join(s for s in scope.split() if s in MCP_SCOPES),
            "client_id": client_id,
            "iat": now,
            "exp": now + self._config.access_token_ttl,
            "jti": secrets.token_urlsafe(16),
            "fid": family_id,
        }
        # Only a verified e-mail is carried: sharing rules trust what the token says.
        if user.email and user.email_verified:
            claims["email"] = user.email
        if user.hd:
            claims["hd"] = user.hd
        return self._keys.sign(claims)

    async def verify_access_token(self, token: str) -> dict:
        """Claims of a valid, unrevoked access token of this issuer (audience is the
        caller's check). In memory when warm: a verified-token LRU keyed by hash."""
        key = token_hash(token)
        claims = self._verified.get(key)
        if claims is None:
            claims = await self._decode(token)
            self._verified[key] = claims
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        if claims["exp"] <= time.time():
            self._verified.pop(key, None)
            raise InvalidToken("the access token has expired")
        if claims["jti"] in self._revoked or _family_marker(claims.get("fid", "")) in self._revoked:
            raise InvalidToken("the access token has been revoked")
        return claims

    async def _decode(self, token: str, verify_exp: bool = True) -> dict:
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
                options={
                    "verify_aud": False,
                    "verify_exp": verify_exp,
                    "require": ["exp", "iat", "sub", "aud", "jti", "iss"],
                },
                leeway=0 if verify_exp else 10**9,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the access token has expired") from None
        except jwt.PyJWTError:
            raise InvalidToken("the access token did not verify") from None
        problem = claim_type_problem(claims)
        if problem:
            raise InvalidToken(f"the access token is malformed: {problem}")
        return claims

    async def refresh_revocations(self) -> None:
        """Run every REVOCATION_REFRESH seconds by the app, off the request path."""
        revoked = await self._storage.revoked_access_tokens(time.time())
        self._revoked = {r.jti for r in revoked}

    # --------------------------------------------------------------- revocation

    async def revoke_family(self, family_id: str) -> None:
        """Stops the refresh family and every access token minted from it.

        The family id is fixed on the code when it is issued, so a replayed code may revoke
        a family whose row its winning redemption has not written yet. Hence the order:
        the `fid:` marker is stored first, then the row is revoked; exchange_code writes
        the row first, then reads the markers (_family_marked_revoked). Whatever the
        interleaving, one of the two sees the other's write and the family ends revoked
        (both backends read their own and each other's writes: SQLite is one file,
        DynamoDB reads are strongly consistent)."""
        marker = _family_marker(family_id)
        await self._storage.revoke_access_token(
            RevokedAccessToken(marker, time.time() + self._config.access_token_ttl + 60)
        )
        self._revoked.add(marker)
        await self._storage.revoke_family(family_id, time.time())

    async def _family_marked_revoked(self, family_id: str) -> bool:
        """Whether revoke_family ran for this id, on any instance. Reads the (small, bounded
        by the access-token lifetime) revocation set from storage, once per code exchange,
        and refreshes this instance's copy with it on the way."""
        marker = _family_marker(family_id)
        if marker in self._revoked:
            return True
        revoked = {r.jti for r in await self._storage.revoked_access_tokens(time.time())}
        self._revoked |= revoked
        return marker in revoked

    async def revoke(self, client: Client, token: str, hint: str | None) -> None:
        """RFC 7009: refresh tokens revoke their family, access tokens their jti. Tokens
        that are unknown or belong to another client are ignored (200 either way). The
        hint only orders the search (§2.1): a wrong hint still finds the token."""
        record = await self._storage.get_refresh_token(token_hash(token))
        if record is not None:
            if record.client_id == client.client_id:
                await self.revoke_family(record.family_id)
            return
        try:
            claims = await self._decode(token, verify_exp=False)
        except InvalidToken:
            return
        if claims.get("client_id") == client.client_id and claims["exp"] > time.time():
            await self._storage.revoke_access_token(RevokedAccessToken(claims["jti"], claims["exp"]))
            self._revoked.add(claims["jti"])

    async def _still_allowed(self, user_sub: str, granted: str, resource: str | None):
        """The user and the token audience, if the sharing rules still let them in."""
        audience = await self._narrow_audience(self.audience_for(granted), resource)
        user = await self._user(user_sub)
        try:
            await self.check_access(user, audience)
        except OAuthError as exc:
            raise InvalidGrant(exc.description) from None
        return user, audience

    async def _user(self, sub: str) -> User:
        user = await self._storage.get_user(sub)
        if user is None:
            raise InvalidGrant("the user of this grant no longer exists")
        return user


def _family_marker(family_id: str) -> str:
    """The revocation entry (in the revoked access tokens) that stops a whole family."""
    return "fid:" + family_id


