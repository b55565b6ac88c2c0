"""Connected accounts as the signed-in user sees them (issue 11): the Connections page's view model,
connect / callback / disconnect, and the consent step's `Detour` over the proxy's UpstreamAuth."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.authserver.authorization import browser_of
from services.common.access import AccessPolicy, Principal
from services.common.errors import NotFound, PageError
from services.common.servers import ServerRegistry
from services.proxy.upstream_auth.errors import (
    AuthorizationFailed,
    ConnectRequired,
    DiscoveryError,
    UpstreamAuthError,
    UpstreamAuthTemporarilyUnavailable,
)
from services.proxy.upstream_auth.sealing import Unreadable, open_tokens
from services.proxy.upstream_auth.service import UpstreamAuth, more_scopes
from storage.base import Server, Storage

log = logging.getLogger("gateway.connections")


def needs_account(server: object) -> bool:
    """Each user connects their own account at this server's upstream."""
    return getattr(server, "upstream_auth", "none") == "oauth"


@dataclass(frozen=True)
class ConnectionView:
    """One server that needs an account, and this user's account there."""

    server_id: str
    name: str
    status: str  # connected | needs_reconnect | not_connected
    upstream_subject: str = ""  # who the upstream says the account is, when it says
    expires_at: float = 0.0  # the access token's (renewed without the user while it can be)
    connected_at: float = 0.0
    renewable: bool = False  # a refresh token is held

    def as_dict(self) -> dict:
        return dict(vars(self))


class Connections:
    """Every method takes the signed-in user as the sign-in cookie's dict (sub, sid, …)."""

    def __init__(self, storage: Storage, access: AccessPolicy, servers: ServerRegistry, upstream_auth: UpstreamAuth,
                 *, now: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._access = access
        self._servers = servers
        self._auth = upstream_auth
        self._now = now

    @classmethod
    def of(cls, services) -> Connections:
        """Over a Services' parts (cheap: a request builds one)."""
        return cls(services.storage, services.access, services.servers, services.upstream_auth, now=services.now)

    # ------------------------------------------------------------------ page

    async def overview(self, user: dict) -> list[ConnectionView]:
        """Every server this user may use that needs an account, with the account's status."""
        sub = _sub(user)
        views = []
        for server, _ in await self._servers.visible_to(sub):
            if needs_account(server):
                views.append(await self._view(sub, server))
        return views

    async def _view(self, sub: str, server: Server) -> ConnectionView:
        credential = await self._storage.upstream_auth.get_credential(sub, server.server_id)
        if credential is None:
            return ConnectionView(server.server_id, server.name, "not_connected")
        try:
            tokens = open_tokens(self._auth.box, credential)
        except Unreadable:
            return ConnectionView(server.server_id, server.name, "needs_reconnect")
        expired = bool(credential.expires_at) and credential.expires_at <= self._now()
        status = "needs_reconnect" if expired and not tokens.refresh_token else "connected"
        return ConnectionView(server.server_id, server.name, status, credential.upstream_subject,
                              credential.expires_at, credential.updated_at, bool(tokens.refresh_token))

    async def server_to_connect(self, user: dict, server_id: str) -> tuple[Server, str]:
        """The server (one this user may use, that needs an account) and the host of its
        upstream's sign-in ("" when it cannot be found now); NotFound otherwise."""
        server = await self._usable(_sub(user), server_id)
        return server, await self._sign_in_host(server)

    @staticmethod
    def more_scope(scope: str | None) -> str:
        """The scopes a connect link asks for besides the usual ones (the upstream said it needs
        them); a 400 page for anything that is not a short list of OAuth scopes."""
        try:
            return more_scopes(scope or "")
        except ValueError:
            raise PageError(400, "This connect link is not valid",
                            "It asks for permissions in a form the gateway does not pass on. "
                            "Open Connections from the dashboard instead.") from None

    # ----------------------------------------------------------- the trip

    async def begin(self, user: dict, server_id: str, return_to: str, scope: str = "") -> str:
        """The upstream authorization URL for this user's browser (the connect button); `scope`:
        what a connect link asks for besides (checked with `more_scope`)."""
        server = await self._usable(_sub(user), server_id)
        return await self._begin(_sub(user), server, browser_of(user), return_to, self.more_scope(scope))

    async def complete(self, user: dict | None, query: dict[str, str]) -> tuple[str, str]:
        """The callback: (server_id, return_to) once the account is stored. A PageError
        (400, nothing stored) for a wrong, reused, expired or foreign state or an AS error."""
        if not user or not user.get("sub"):
            raise PageError(400, "Connecting your account did not work",
                            "You are not signed in to the gateway in this browser; sign in and start again.")
        sub = _sub(user)

        async def server_of(server_id: str) -> Server | None:
            try:  # only a server the user still may use
                return await self._usable(sub, server_id)
            except NotFound:
                return None

        try:
            return await self._auth.complete(query, sub, browser_of(user), server_of)
        except AuthorizationFailed as exc:
            raise PageError(400, "Connecting your account did not work", str(exc)) from None
        except UpstreamAuthError as exc:
            raise _page_error(exc) from None

    async def disconnect(self, user: dict, server_id: str) -> bool:
        """Forget this user's account at the server (revoked at the upstream when it offers
        revocation). A server the user can no longer see can still be disconnected."""
        sub = _sub(user)
        server = await self._storage.get_server(server_id) if server_id else None
        if server is None:
            raise NotFound("there is no such server")
        return await self._auth.disconnect(sub, server)

    # ------------------------------------------------------ consent's Detour

    async def needed(self, user_sub: str, server_id: str) -> str | None:
        """authserver.authorization.Detour: the upstream sign-in host when this user has no
        usable account for the server; None when the server needs none or it is usable."""
        server = await self._access.server(server_id)
        if server is None or not needs_account(server):
            return None
        try:
            await self._auth.get_token(user_sub, server)
        except ConnectRequired:
            return await self._sign_in_host(server)
        except UpstreamAuthError as exc:  # the AS is failing now: the account stays; calls say so
            log.info("upstream account of %s not checked at sign-in: %s", server_id, exc,
                     extra={"user_sub": user_sub, "server_id": server_id})
        return None

    async def start(self, user_sub: str, server_id: str, browser: str, return_to: str) -> str:
        """authserver.authorization.Detour: the upstream authorization URL."""
        server = await self._access.server(server_id)
        if server is None:
            raise PageError(400, "This server no longer exists", "Go back to your application.")
        return await self._begin(user_sub, server, browser, return_to)

    # ------------------------------------------------------------ helpers

    async def _begin(self, sub: str, server: Server, browser: str, return_to: str, scope: str = "") -> str:
        try:
            return await self._auth.begin(sub, server, browser=browser, return_to=return_to, more_scope=scope)
        except UpstreamAuthError as exc:
            raise _page_error(exc) from None

    async def _usable(self, sub: str, server_id: str) -> Server:
        user = await self._storage.get_user(sub)
        server = await self._access.server(server_id) if server_id and user else None
        if server is None or not needs_account(server):
            raise NotFound("there is no such server, or it needs no account")
        principal = Principal(sub, user.email.lower() if user.email and user.email_verified else "", user.hd)
        if not (await self._access.decide(principal, server_id)).allowed:
            raise NotFound("there is no such server, or it needs no account")  # ids are not disclosed
        return server

    async def _sign_in_host(self, server: Server) -> str:
        try:
            discovery = await self._auth.discover(server)
        except UpstreamAuthError:
            return ""  # shown as "the upstream's sign-in page"; connecting says what failed
        return urlsplit(discovery.server.authorization_endpoint).netloc


def _sub(user: dict | None) -> str:
    if not user or not user.get("sub"):
        raise PageError(401, "Please sign in", "Sign in to connect your accounts.")
    return str(user["sub"])


def _page_error(exc: UpstreamAuthError) -> PageError:
    if isinstance(exc, UpstreamAuthTemporarilyUnavailable):
        return PageError(503, "The server's sign-in is unavailable", f"{exc} Try again in a moment.")
    if isinstance(exc, DiscoveryError):
        return PageError(502, "The server's sign-in cannot be used",
                         f"{exc}. The owner of this server should check its settings.")
    return PageError(400, "Connecting your account did not work", str(exc))
