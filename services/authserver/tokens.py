"""TokenService: authorization codes, the token endpoint's grants, RS256 access tokens, refresh
rotation with reuse detection (docs/architecture.md §3), revocation; the hot-path check is `verification`."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

from config import Config
from services.authserver.audiences import Audiences
from services.authserver.claims import VERIFIER_RE, Audience, InvalidToken, s256
from services.authserver.keys import KeyRing, SecretBox, token_hash
from services.authserver.verification import AccessTokenVerifier, family_marker
from services.common.access import AccessPolicy
from services.common.errors import InvalidGrant, InvalidRequest, InvalidScope, UnsupportedGrantType
from services.common.logs import security_event
from services.common.metrics import Metrics
from services.common.scopes import MCP_SCOPES, SUPPORTED_SCOPES
from storage.base import AuthCode, Client, RefreshFamily, RefreshToken, Storage, User

CODE_TTL = 60
GRACE = 30.0
REVOCATION_MESSAGES = {  # revoke_family's security event -> its line
    "token_revoked": "authorization revoked: its refresh and access tokens stop working",
    "refresh_reuse": "refresh token reused after its rotation: the authorization is revoked",
    "code_reuse": "authorization code replayed: what it issued is revoked",
}


class TokenService:
    def __init__(
        self,
        storage: Storage,
        keyring: KeyRing,
        box: SecretBox,
        access: AccessPolicy,
        config: Config,
        *,
        metrics: Metrics | None = None,
        now: Callable[[], float] = time.time,
    ):
        self._storage = storage
        self._keys = keyring
        self._box = box
        self._config = config
        self._metrics = metrics or Metrics()
        self._now = now
        self._inflight: dict[str, asyncio.Future] = {}
        self.verifier = AccessTokenVerifier(storage, keyring, config, now=now)
        self._verified = self.verifier.cache  # the verified-token cache (bench/ clears it)
        # The hot path calls the verifier's bound methods directly: no extra frame.
        self.verify_access_token = self.verifier.verify
        self.refresh_revocations = self.verifier.refresh_revocations
        self.audiences = Audiences(storage, access, config)
        self.resolve_audience = self.audiences.resolve
        self.audience_for = self.audiences.of
        self.check_access = self.audiences.check_access

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
                expires_at=self._now() + CODE_TTL,
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
            await self.revoke_family(record.family_id, event="code_reuse", reason="replay",
                                     user_sub=record.user_sub, client_id=client.client_id)
            raise InvalidGrant("authorization code already used")
        if record.expires_at < self._now():
            raise InvalidGrant("authorization code expired")
        if record.client_id != client.client_id:
            raise InvalidGrant("authorization code was issued to another client")
        if redirect_uri is not None and redirect_uri != record.redirect_uri:
            raise InvalidGrant("redirect_uri differs from the authorization request")
        if not hmac.compare_digest(s256(code_verifier), record.code_challenge):
            raise InvalidGrant("code_verifier does not match the code_challenge")
        user, audience = await self.audiences.still_allowed(record.user_sub, record.audience, resource)

        now = self._now()
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
        if await self.verifier.family_marked_revoked(family.family_id):
            # A replay of this code came in while it was being redeemed: its revoke_family
            # found no family row yet, but its marker (written first) is seen here, so the
            # family is revoked all the same. The response still goes out (this request
            # won; the replay revokes what it issued): its tokens are dead on arrival.
            await self._storage.revoke_family(family.family_id, self._now())
        self._metrics.inc("tokens_total", event="issued")
        return self._token_response(user, client.client_id, record.scope, audience, family, refresh)

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
        now = self._now()
        record = await self._storage.get_refresh_token(key)
        if record is None or record.client_id != client.client_id:
            raise InvalidGrant("unknown refresh token")
        family = await self._storage.get_family(record.family_id)
        if (family is None or family.revoked_at or family.expires_at < now
                or family_marker(family.family_id) in self.verifier.revoked):
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
        user, audience = await self.audiences.still_allowed(record.user_sub, family.audience, resource)

        if not record.used_at:
            successor = secrets.token_urlsafe(32)
            sealed = self._box.seal(successor.encode(), "refresh:" + key)
            if await self._storage.rotate_refresh_token(
                key, self._refresh_record(successor, family, now), sealed, now
            ):
                self._metrics.inc("tokens_total", event="refreshed")
                return self._token_response(
                    user, client.client_id, token_scope, audience, family, successor
                )
            record = await self._storage.get_refresh_token(key)  # another instance won
        successor = await self._grace_successor(record, now)
        if successor is None:
            self._metrics.inc("tokens_total", event="refresh_reuse")
            await self.revoke_family(family.family_id, event="refresh_reuse", reason="reuse",
                                     user_sub=family.user_sub, client_id=client.client_id,
                                     server_id=audience.server_id)
            raise InvalidGrant("refresh token reused: the authorization is revoked")
        self._metrics.inc("tokens_total", event="refreshed")
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
        now = int(self._now())
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

    # --------------------------------------------------------------- revocation

    async def revoke_family(self, family_id: str, *, event: str = "token_revoked", reason: str = "user_or_admin",
                            user_sub: str = "", client_id: str = "", server_id: str = "") -> None:
        """Stops the refresh family and every access token minted from it; one security
        event (`event`: token_revoked, refresh_reuse, code_reuse) says who and why.

        The family id is fixed on the code when it is issued, so a replayed code may revoke
        a family whose row its winning redemption has not written yet. Hence the order:
        the `fid:` marker is stored first, then the row is revoked; exchange_code writes
        the row first, then reads the markers (verifier.family_marked_revoked). Whatever the
        interleaving, one of the two sees the other's write and the family ends revoked
        (both backends read their own and each other's writes: SQLite is one file,
        DynamoDB reads are strongly consistent)."""
        now = self._now()
        await self.verifier.store_revocation(family_marker(family_id), now + self._config.access_token_ttl + 60)
        await self._storage.revoke_family(family_id, now)
        self._metrics.inc("tokens_total", event="revoked")
        if not (user_sub and client_id):  # a revocation from the dashboard or the CLI
            family = await self._storage.get_family(family_id)
            if family is not None:
                user_sub, client_id = family.user_sub, family.client_id
                server_id = server_id or self.audiences.of(family.audience).server_id
        security_event(event, REVOCATION_MESSAGES[event], user_sub=user_sub, client_id=client_id,
                       server_id=server_id, reason=reason)

    async def revoke(self, client: Client, token: str, hint: str | None) -> None:
        """RFC 7009: refresh tokens revoke their family, access tokens their jti. Tokens
        that are unknown or belong to another client are ignored (200 either way). The
        hint only orders the search (§2.1): a wrong hint still finds the token."""
        record = await self._storage.get_refresh_token(token_hash(token))
        if record is not None:
            if record.client_id == client.client_id:
                await self.revoke_family(record.family_id, reason="client",
                                         user_sub=record.user_sub, client_id=client.client_id,
                                         server_id=self.audiences.of(record.audience).server_id)
            return
        try:
            claims = await self.verifier.decode(token, verify_exp=False)
        except InvalidToken:
            return
        if claims.get("client_id") == client.client_id and claims["exp"] > self._now():
            await self.verifier.store_revocation(claims["jti"], claims["exp"])
            self._metrics.inc("tokens_total", event="revoked")
            server_id = self.audiences.of(str(claims["aud"])).server_id
            security_event("token_revoked", "access token revoked by its client", user_sub=claims["sub"],
                           client_id=client.client_id, server_id=server_id, reason="client")
