"""`UpstreamAuth`: a user's connected account at one server's upstream, from the browser trip
(`begin`, `complete`) to a fresh access token on every call (`get_token`: refreshed once per
(user, server) across instances under a storage lease) and `disconnect`."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

from services.common.cache import TtlCache
from services.common.logs import security_event
from services.common.metrics import Metrics
from services.proxy.upstream.policy import AddressPolicy
from storage.base import Pending, Storage
from storage.upstream_auth import UpstreamCredential

from .clients import ClientIdentification, ClientIdentity, UpstreamAuthSettings, client_metadata_document
from .discovery import Discoverer, Discovery, same_issuer
from .errors import AuthorizationFailed, ConnectRequired, UpstreamAuthTemporarilyUnavailable
from .http import AuthHttp
from .sealing import SecretBox, TokenSet, Unreadable, open_tokens, seal_tokens
from .tokens import TokenAnswer, TokenRefused, revoke, token_request, userinfo_subject

log = logging.getLogger("gateway.upstream_auth")

PENDING_KIND = "upstream"
PENDING_TTL = 600.0  # the browser trip to the upstream and back
DISCOVERY_TTL = 600.0  # metadata is re-read this often (and after a failure)
TOKEN_CACHE_TTL = 5.0  # how long another instance's disconnect may go unseen here
LEASE_TTL = 15.0  # a refresher that died holds (user, server) this long at most
LEASE_POLL = 0.1  # a waiter looks for the holder's result this often
REFRESH_MARGIN = 30.0  # refresh this long before expiry (a quarter of short lifetimes)
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,200}")  # RFC 6749 §3.3 scope-token
MAX_MORE_SCOPES = 20


@dataclass(frozen=True)
class _Fresh:
    access_token: str
    expires_at: float
    updated_at: float


class UpstreamAuth:
    """Connected accounts. `server` arguments are Server records (`server_id`, `upstream_url`,
    `internal_upstream`, and the upstream auth fields `UpstreamAuthSettings.of` reads)."""

    def __init__(self, storage: Storage, box: SecretBox, policy: AddressPolicy, public_url: str, *,
                 now: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, http: AuthHttp | None = None,
                 metrics: Metrics | None = None) -> None:
        self.store = storage.upstream_auth
        self.metrics = metrics
        self.pending = storage
        self.box = box
        self.now, self.clock, self.sleep = now, clock, sleep
        self.http = http or AuthHttp(policy)
        base = public_url.rstrip("/")
        self.public_url = base
        self.redirect_uri = base + "/oauth/upstream/callback"
        # A CIMD client id must be an https URL with a path (draft-ietf-oauth-client-id-metadata-document).
        self.client_id_url = base + "/oauth/upstream/client.json" if base.startswith("https://") else ""
        self.discoverer = Discoverer(self.http)
        self.clients = ClientIdentification(self.store, box, self.http, self.redirect_uri, self.client_id_url, now=now)
        self.holder = os.urandom(9).hex()  # this instance, as a lease holder
        self._discovered = TtlCache(1024, DISCOVERY_TTL, clock=clock)
        self._tokens = TtlCache(10000, TOKEN_CACHE_TTL, clock=clock)
        self._refreshing: dict[tuple[str, str], asyncio.Future] = {}

    def connect_url(self, server_id: str, scope: str = "") -> str:
        """Where a user (re)connects their account for a server (a gateway page); `scope`: what
        the upstream said it needs besides (an insufficient_scope answer)."""
        url = f"{self.public_url}/oauth/upstream/connect/{server_id}"
        return f"{url}?{urlencode({'scope': scope})}" if scope else url

    def client_metadata(self) -> dict:
        """The client ID metadata document to serve at `client_id_url`."""
        return client_metadata_document(self.client_id_url, self.redirect_uri)

    def close(self) -> None:
        self.http.close()

    # ----------------------------------------------------------------- discovery

    async def discover(self, server: object, www_authenticate: str = "", *, fresh: bool = False) -> Discovery:
        """The upstream's auth setup (cached per server and URL; `fresh` after an upstream 401)."""
        key = (server.server_id, server.upstream_url)  # type: ignore[attr-defined]
        found = None if fresh else self._discovered.get(key)
        if found is None:
            settings = UpstreamAuthSettings.of(server, self.box)
            found = await self.discoverer.discover(server.upstream_url, www_authenticate=www_authenticate,  # type: ignore[attr-defined]
                                                   public_only=_public_only(server), issuer=settings.issuer)
            self._discovered.set(key, found)
        return found

    async def _client(self, server: object, discovery: Discovery) -> ClientIdentity:
        settings = UpstreamAuthSettings.of(server, self.box)
        return await self.clients.identify(server.server_id, discovery.server, settings, _public_only(server))  # type: ignore[attr-defined]

    # ------------------------------------------------------------- browser trip

    async def begin(self, user_sub: str, server: object, browser: str, return_to: str = "",
                    more_scope: str = "") -> str:
        """The upstream authorization URL to send the browser to (PKCE S256, state, resource).
        `browser`: a digest of the user's browser session; the callback must present it.
        `more_scope`: scopes to ask for besides the usual (`more_scopes`-checked)."""
        discovery = await self.discover(server)
        client = await self._client(server, discovery)
        settings = UpstreamAuthSettings.of(server, self.box)
        state, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        scope = " ".join(dict.fromkeys([*(settings.scope.split() or discovery.scopes), *more_scope.split()]))
        query = {
            "response_type": "code", "client_id": client.client_id, "redirect_uri": self.redirect_uri,
            "state": state, "code_challenge": _s256(verifier), "code_challenge_method": "S256",
        }
        if scope:
            query["scope"] = scope
        if settings.send_resource:
            query["resource"] = discovery.resource
        if settings.audience:
            query["audience"] = settings.audience
        await self.pending.put_pending(Pending(PENDING_KIND, _state_key(state), {
            "sub": user_sub, "server_id": server.server_id, "issuer": discovery.server.issuer,  # type: ignore[attr-defined]
            "verifier": verifier, "browser": browser, "return_to": return_to, "scope": scope,
        }, self.now() + PENDING_TTL))
        endpoint = urlsplit(discovery.server.authorization_endpoint)
        joined = f"{endpoint.query}&{urlencode(query)}" if endpoint.query else urlencode(query)
        return urlunsplit((endpoint.scheme, endpoint.netloc, endpoint.path, joined, ""))

    async def complete(self, params: dict[str, str], user_sub: str, browser: str,
                       server_of: Callable[[str], Awaitable[object | None]]) -> tuple[str, str]:
        """The callback: (server_id, return_to) once the code is exchanged and the credential
        stored. `params`: the callback's query; `server_of(server_id)` reads the server."""
        state = params.get("state", "")
        found = await self.pending.get_pending(PENDING_KIND, _state_key(state), self.now()) if state else None
        if found is None:
            raise AuthorizationFailed("this sign-in link is unknown, was used already or has expired; start again")
        payload = found.payload
        if not hmac.compare_digest(str(payload.get("browser", "")), browser) or payload.get("sub") != user_sub:
            security_event("upstream_state_mismatch", "upstream callback from another browser or user",
                           user_sub=user_sub, server_id=payload.get("server_id", ""), reason="browser_mismatch")
            raise AuthorizationFailed("this sign-in was started in another browser session; start again")
        if await self.pending.take_pending(PENDING_KIND, _state_key(state), self.now()) is None:
            raise AuthorizationFailed("this sign-in link was used already; start again")
        server = await server_of(payload["server_id"])
        if server is None:
            raise AuthorizationFailed("the server no longer exists")
        if params.get("error"):
            raise AuthorizationFailed(f"the upstream did not authorize: {params['error'][:100]}")
        discovery = await self.discover(server)
        issuer = payload["issuer"]
        if not same_issuer(discovery.server.issuer, issuer):
            raise AuthorizationFailed("the upstream's authorization server changed meanwhile; start again")
        iss = params.get("iss", "")
        if (iss and not same_issuer(iss, issuer)) or (discovery.server.iss_parameter and not iss):
            raise AuthorizationFailed("the answer came from another authorization server (iss); start again")
        code = params.get("code", "")
        if not code:
            raise AuthorizationFailed("the upstream sent no authorization code")
        client = await self._client(server, discovery)
        settings = UpstreamAuthSettings.of(server, self.box)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                "code_verifier": payload["verifier"]}
        if settings.send_resource:
            form["resource"] = discovery.resource
        try:
            answer = await token_request(self.http, discovery.server, client, form, public_only=_public_only(server))
        except TokenRefused as exc:
            raise AuthorizationFailed(f"the upstream refused the authorization code ({exc.error or exc.status})") \
                from None
        credential = self._credential(user_sub, server.server_id, issuer, answer, "",  # type: ignore[attr-defined]
                                      payload.get("scope", ""), previous=None)
        # "Connected as who": only what the AS itself answers for this token (never an unverified
        # id_token); an AS without userinfo leaves it empty.
        subject = await userinfo_subject(self.http, discovery.server, answer.access_token,
                                         public_only=_public_only(server))
        if subject:
            credential = dataclasses.replace(credential, upstream_subject=subject)
        await self.store.put_credential(credential)
        self._tokens.pop((user_sub, credential.server_id))
        return credential.server_id, str(payload.get("return_to", ""))

    # -------------------------------------------------------------- hot path

    async def get_token(self, user_sub: str, server: object, rejected: str = "") -> str:
        """A fresh access token of this user at this server's upstream, else `ConnectRequired`
        (with the link) or `UpstreamAuthTemporarilyUnavailable`. `rejected`: a token the
        upstream just answered 401 to (expired early, revoked): never returned again."""
        server_id = server.server_id  # type: ignore[attr-defined]
        cached: _Fresh | None = self._tokens.get((user_sub, server_id))
        if cached is not None and cached.access_token != rejected \
                and not self._due(cached.expires_at, cached.updated_at):
            return cached.access_token
        credential = await self.store.get_credential(user_sub, server_id)
        if credential is None:
            raise ConnectRequired("connect your account for this server first", self.connect_url(server_id))
        tokens = self._open(credential)
        if tokens.access_token != rejected and not self._due(credential.expires_at, credential.updated_at):
            self._remember(credential, tokens)
            return tokens.access_token
        key = (user_sub, server_id)
        running = self._refreshing.get(key)
        if running is None:
            running = asyncio.ensure_future(self._refresh(user_sub, server, credential, tokens, rejected))
            self._refreshing[key] = running
            running.add_done_callback(lambda _: self._refreshing.pop(key, None))
        return await asyncio.shield(running)

    def _due(self, expires_at: float, updated_at: float) -> bool:
        if not expires_at:
            return False  # the AS gave no lifetime: used until the upstream refuses it
        margin = min(REFRESH_MARGIN, max(0.0, expires_at - updated_at) / 4)
        return self.now() >= expires_at - margin

    def _open(self, credential: UpstreamCredential) -> TokenSet:
        try:
            return open_tokens(self.box, credential)
        except Unreadable:
            security_event("upstream_credential_unreadable", "a stored upstream credential does not open",
                           user_sub=credential.user_sub, server_id=credential.server_id, reason="unreadable")
            raise ConnectRequired("your connected account must be connected again",
                                  self.connect_url(credential.server_id)) from None

    def _remember(self, credential: UpstreamCredential, tokens: TokenSet) -> None:
        self._tokens.set((credential.user_sub, credential.server_id),
                         _Fresh(tokens.access_token, credential.expires_at, credential.updated_at))

    async def _refresh(self, user_sub: str, server: object, seen: UpstreamCredential, tokens: TokenSet,
                       rejected: str) -> str:
        server_id = server.server_id  # type: ignore[attr-defined]
        deadline = self.clock() + LEASE_TTL
        # Another instance holds the lease: take its result when it is stored, or the lease
        # when it is given back without one (its refresh failed: this one tries, and says so).
        while not await self.store.take_refresh_lease(user_sub, server_id, self.holder, self.now() + LEASE_TTL,
                                                      self.now()):
            if self.clock() >= deadline:
                if seen.expires_at > self.now() and tokens.access_token != rejected:
                    return tokens.access_token  # not expired yet: usable while the refresh is stuck
                raise UpstreamAuthTemporarilyUnavailable("the upstream token is being refreshed; try again shortly")
            await self.sleep(LEASE_POLL)
            current = await self.store.get_credential(user_sub, server_id)
            if current is None:
                raise ConnectRequired("connect your account for this server again", self.connect_url(server_id))
            if current.updated_at != seen.updated_at:
                fresh = self._open(current)
                if fresh.access_token != rejected:
                    self._remember(current, fresh)
                    return fresh.access_token
        try:
            current = await self.store.get_credential(user_sub, server_id)
            if current is None:
                raise ConnectRequired("your account was disconnected", self.connect_url(server_id))
            tokens = self._open(current)
            if current.updated_at != seen.updated_at and tokens.access_token != rejected \
                    and not self._due(current.expires_at, current.updated_at):
                self._remember(current, tokens)
                return tokens.access_token  # another instance refreshed just before us
            if not tokens.refresh_token:
                await self.store.delete_credential(user_sub, server_id)
                raise ConnectRequired("your upstream sign-in expired; connect again", self.connect_url(server_id))
            return await self._refresh_now(user_sub, server, current, tokens)
        finally:
            await self.store.release_refresh_lease(user_sub, server_id, self.holder)

    async def _refresh_now(self, user_sub: str, server: object, current: UpstreamCredential,
                           tokens: TokenSet) -> str:
        server_id = server.server_id  # type: ignore[attr-defined]
        discovery = await self.discover(server)
        if not same_issuer(discovery.server.issuer, current.issuer):
            await self.store.delete_credential(user_sub, server_id)
            raise ConnectRequired("the upstream moved to another authorization server; connect again",
                                  self.connect_url(server_id))
        client = await self._client(server, discovery)
        form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        if UpstreamAuthSettings.of(server, self.box).send_resource:
            form["resource"] = discovery.resource
        try:
            answer = await token_request(self.http, discovery.server, client, form, public_only=_public_only(server))
        except UpstreamAuthTemporarilyUnavailable:
            self._count_refresh("unavailable")
            raise
        except TokenRefused as exc:
            self._count_refresh("rejected")
            # The grant is gone (revoked, expired, rotated elsewhere): the user reconnects.
            await self.store.delete_credential(user_sub, server_id)
            self._tokens.pop((user_sub, server_id))
            if exc.error == "invalid_client" and client.kind == "dcr":
                await self.clients.forget(server_id, current.issuer)
            log.info("upstream refresh refused (%s): credential dropped", exc,
                     extra={"user_sub": user_sub, "server_id": server_id})
            raise ConnectRequired("the upstream no longer accepts your sign-in; connect again",
                                  self.connect_url(server_id)) from None
        self._count_refresh("ok")
        fresh = self._credential(user_sub, server_id, current.issuer, answer, tokens.refresh_token, current.scope,
                                 previous=current)
        if not await self.store.put_credential(fresh, if_updated_at=current.updated_at):
            raise ConnectRequired("your account was disconnected", self.connect_url(server_id))
        self._remember(fresh, TokenSet(answer.access_token))
        return answer.access_token

    def _count_refresh(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("upstream_token_refreshes_total", outcome=outcome)

    def _credential(self, user_sub: str, server_id: str, issuer: str, answer: TokenAnswer, old_refresh: str,
                    scope: str, previous: UpstreamCredential | None) -> UpstreamCredential:
        now = self.now()
        if previous is not None:
            now = max(now, previous.updated_at + 1e-3)  # a new version, even on a coarse clock
        # Keep the old refresh token when the AS returned none (no rotation).
        tokens = TokenSet(answer.access_token, answer.refresh_token or old_refresh)
        return UpstreamCredential(
            user_sub=user_sub, server_id=server_id, issuer=issuer,
            token_enc=seal_tokens(self.box, user_sub, server_id, issuer, tokens),
            expires_at=now + answer.expires_in if answer.expires_in is not None else 0.0,
            scope=answer.scope or scope,
            upstream_subject=previous.upstream_subject if previous else "",
            updated_at=now,
        )

    # ------------------------------------------------------------- disconnect

    async def disconnect(self, user_sub: str, server: object) -> bool:
        """Forget the user's credential, revoking it at the upstream when it offers revocation."""
        server_id = server.server_id  # type: ignore[attr-defined]
        credential = await self.store.get_credential(user_sub, server_id)
        self._tokens.pop((user_sub, server_id))
        if credential is None:
            return False
        deleted = await self.store.delete_credential(user_sub, server_id)
        try:
            tokens = open_tokens(self.box, credential)
            discovery = await self.discover(server)
            client = await self._client(server, discovery)
            for token, hint in ((tokens.refresh_token, "refresh_token"), (tokens.access_token, "access_token")):
                await revoke(self.http, discovery.server, client, token, hint, public_only=_public_only(server))
        except Exception as exc:  # revocation is a courtesy: the credential is gone either way
            log.info("upstream revocation skipped: %s", exc, extra={"user_sub": user_sub, "server_id": server_id})
        return deleted


def more_scopes(text: str) -> str:
    """`text` as space-separated scope tokens (RFC 6749 §3.3), at most MAX_MORE_SCOPES; ValueError
    for anything else (it comes from a link or an upstream's challenge)."""
    tokens = text.split(" ") if text else []
    if len(tokens) > MAX_MORE_SCOPES or not all(SCOPE_TOKEN.fullmatch(t) for t in tokens):
        raise ValueError("not a list of OAuth scopes")
    return " ".join(dict.fromkeys(tokens))


def _state_key(state: str) -> str:
    # Stored hashed, like every other secret: a leaked pending row cannot finish the trip.
    return hashlib.sha256(state.encode()).hexdigest()


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _public_only(server: object) -> bool:
    return not bool(getattr(server, "internal_upstream", False))
