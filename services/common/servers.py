"""ServerRegistry: registering upstream MCP servers and their sharing rules (grants),
with the validation both the CLI and the dashboard rely on."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from services.authserver.keys import SecretBox
from services.common.access import AccessPolicy, Principal, decide_for
from services.common.cache import TtlCache
from services.common.errors import InvalidInput
from services.common.logs import security_event
from services.common.upstream_settings import (
    UpstreamAuthChange,
    UpstreamAuthStatus,
    check_consistent,
    checked_fields,
    redirect_uri,
)
from services.common.validation import check_text
from services.proxy.upstream.errors import UpstreamError, UpstreamRefused, UpstreamUnreachable
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream.urls import parse_upstream_url
from services.proxy.upstream_auth.discovery import foreign_authorization_server
from services.proxy.upstream_auth.errors import UpstreamAuthError
from storage.base import Conflict, Grant, Server, Storage

if TYPE_CHECKING:
    from services.proxy.upstream_auth.service import UpstreamAuth

__all__ = ["InvalidInput", "ServerRegistry", "check_domain", "check_email", "check_name", "check_upstream_url",
           "parse_header"]

SERVER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{3,64}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
DOMAIN_RE = re.compile(r"^(?=.{3,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
FORBIDDEN_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "mcp-session-id"}
RESOLVE_TIMEOUT = 5.0  # seconds a registration waits for DNS
# The public internet and nothing else: what an upstream of someone who is not an
# administrator may resolve to.
PUBLIC_ONLY = AddressPolicy(())
HEADERS_CACHE_SIZE = 10000
DISCOVERY_WAIT = 10.0  # seconds an owner's page or command waits for the upstream's metadata
STATUS_TTL = 60.0  # a discovery result (or failure) shown to owners is this old at most


def check_name(value: object, field: str = "name") -> str:
    name = check_text(value, field, limit=1000, label="the name").strip()
    if not 0 < len(name) <= 100:
        raise InvalidInput("the name must be 1 to 100 characters", field)
    return name


def check_email(value: object, field: str = "email") -> str:
    value = check_text(value, field, limit=400, label="the e-mail address").strip().lower()
    if not EMAIL_RE.match(value):
        raise InvalidInput(f"{value!r} is not an e-mail address", field)
    return value


def check_domain(value: object, field: str = "domain") -> str:
    value = check_text(value, field, limit=400, label="the domain").strip().lower().lstrip("@")
    if not DOMAIN_RE.match(value):
        raise InvalidInput(f"{value!r} is not a domain name", field)
    return value


def check_upstream_url(value: object, field: str = "upstream_url") -> str:
    value = check_text(value, field, limit=2000, label="the upstream URL").strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise InvalidInput("the upstream URL is malformed (host or port)", field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("the upstream URL must be an http(s) URL", field)
    if parts.username or parts.password or parts.fragment:
        raise InvalidInput("the upstream URL must not carry user information or a fragment", field)
    return value


def parse_header(line: object, field: str = "headers") -> tuple[str, str]:
    line = check_text(line, field, limit=8000, label="an upstream header")
    name, sep, value = line.partition(":")
    name, value = name.strip(), value.strip()
    # Values go on the wire to the upstream as they are: visible ASCII and spaces only.
    if not sep or not HEADER_NAME_RE.match(name) or not value or not (value.isascii() and value.isprintable()):
        raise InvalidInput(f"{line!r} is not a 'Name: value' header (printable ASCII)", field)
    if name.lower() in FORBIDDEN_HEADERS:
        raise InvalidInput(f"the {name} header is managed by the gateway", field)
    return name, value


class ServerRegistry:
    def __init__(self, storage: Storage, box: SecretBox, access: AccessPolicy, policy: AddressPolicy, *,
                 now: Callable[[], float] = time.time, upstream_auth: UpstreamAuth | None = None,
                 public_url: str = ""):
        self._storage = storage
        # Connected accounts: discovery shown to owners, credentials dropped with access.
        self.upstream_auth = upstream_auth
        self.redirect_uri = redirect_uri(public_url)
        self._status_cache = TtlCache(1000, STATUS_TTL)
        self._box = box
        self._access = access
        self._policy = policy  # MCPGW_UPSTREAM_ALLOW, the same guard the proxy connects through
        self._now = now
        # Decrypted upstream headers by ciphertext: the proxy needs them on every call, and
        # an edit makes a new ciphertext, so entries never go stale (no TTL).
        self._headers_cache = TtlCache(HEADERS_CACHE_SIZE)

    async def add(
        self,
        *,
        name: str,
        upstream_url: str,
        owner_email: str,
        server_id: str | None = None,
        headers: list[str] | None = None,
        forward_identity: bool = False,
        owner_sub: str = "",
        internal_allowed: bool = False,
        upstream: UpstreamAuthChange | None = None,
    ) -> Server:
        """Register a server. `upstream`: its upstream authorization (connected accounts);
        discovery runs after it is stored (`upstream_status`: a failure is a warning). `internal_allowed`: the caller is the operator (CLI) or an
        administrator, who may point it at allow-listed internal addresses; anyone else
        gets public addresses only (see check_upstream_address), now and at every later
        connection (recorded as `Server.internal_upstream`)."""
        name = check_name(name)
        if server_id is None:
            server_id = "srv_" + secrets.token_urlsafe(9).replace("-", "x").replace("_", "y")
        elif not isinstance(server_id, str) or not SERVER_ID_RE.match(server_id):
            raise InvalidInput("the id must be 3 to 64 letters, digits, '-' or '_'", "server_id")
        parsed = dict(parse_header(h) for h in headers or [])
        upstream_url = check_upstream_url(upstream_url)
        owner_email = check_email(owner_email, "owner_email")
        await self.check_upstream_address(upstream_url, internal_allowed=internal_allowed)
        server = Server(
            server_id=server_id,
            name=name,
            upstream_url=upstream_url,
            owner_sub=owner_sub,
            owner_email=owner_email,
            upstream_headers_enc=self.seal_headers(server_id, parsed) if parsed else "",
            forward_identity=forward_identity,
            created_at=self._now(),
            internal_upstream=internal_allowed,
        )
        if upstream is not None:
            server = replace(server, **checked_fields(upstream, server_id, self._box, None))
        check_consistent(server, parsed)
        try:
            await self._storage.create_server(server)
        except Conflict:
            raise InvalidInput(f"a server with id {server_id} exists already", "server_id") from None
        return server

    async def update(
        self,
        server_id: str,
        *,
        name: str | None = None,
        upstream_url: str | None = None,
        headers: list[str] | None = None,
        forward_identity: bool | None = None,
        internal_allowed: bool = False,
        upstream: UpstreamAuthChange | None = None,
    ) -> Server:
        """Change what is given (only those fields are written over the stored record,
        read again just before the write, so a tool rule edited meanwhile is kept); `headers` (when not None) replaces every upstream header.
        A new upstream URL passes the same address check as `add`; an unchanged one is
        not checked again (an owner may rename a server the operator pointed inward).

        `internal_upstream` follows whoever last chose the URL: an `internal_allowed`
        caller (administrator, CLI) giving the URL, changed or not, sets it (approves the
        server for internal addresses); anyone else giving a different URL clears it (the
        proxy then reaches public addresses only). Edits that keep the URL keep the flag."""
        server = await self.get(server_id)
        changes: dict = {}
        if name is not None:
            changes["name"] = check_name(name)
        if upstream_url is not None:
            upstream_url = check_upstream_url(upstream_url)
            if upstream_url != server.upstream_url:
                await self.check_upstream_address(upstream_url, internal_allowed=internal_allowed)
                changes["internal_upstream"] = internal_allowed
            elif internal_allowed:
                changes["internal_upstream"] = True
            changes["upstream_url"] = upstream_url
        if headers is not None:
            parsed = dict(parse_header(h) for h in headers)
            changes["upstream_headers_enc"] = self.seal_headers(server_id, parsed) if parsed else ""
        if forward_identity is not None:
            changes["forward_identity"] = forward_identity
        if upstream is not None:
            changes.update(checked_fields(upstream, server_id, self._box, server))
        headers_now = (self.upstream_headers(replace(server, **changes)) if "upstream_headers_enc" in changes
                       else self.upstream_headers(server))
        check_consistent(replace(server, **changes), headers_now)
        fresh = await self._storage.get_server(server_id)
        if fresh is None:
            raise InvalidInput(f"there is no server {server_id}")
        updated = replace(fresh, **changes)
        try:
            await self._storage.update_server(updated)
        except KeyError:
            raise InvalidInput(f"there is no server {server_id}") from None
        self._access.forget(server_id)
        if fresh.upstream_auth == "oauth" and updated.upstream_auth != "oauth":
            # No account is needed any more: the users' upstream tokens are of no use here.
            await self._forget(server_id, None, "upstream_auth_off")
        return updated

    # ------------------------------------------------------ connected accounts

    async def upstream_status(self, server: Server, *, fresh: bool = False) -> UpstreamAuthStatus | None:
        """What the owner is shown of an oauth server (None for others): discovery of its
        authorization server, a failure as a warning (the upstream may just be down), kept
        STATUS_TTL so that owner pages do not ask the upstream every time."""
        if server.upstream_auth != "oauth":
            return None
        key = (server.server_id, server.upstream_url, server.upstream_issuer, bool(server.upstream_client_id))
        status = None if fresh else self._status_cache.get(key)
        if status is not None:
            return status
        client = "static" if server.upstream_client_id else "discovery"
        if self.upstream_auth is None:
            return UpstreamAuthStatus(self.redirect_uri, client=client)
        try:
            found = await asyncio.wait_for(self.upstream_auth.discover(server, fresh=fresh), DISCOVERY_WAIT)
            status = UpstreamAuthStatus(self.redirect_uri, found.server.issuer,
                                        foreign_authorization_server(found, server.upstream_url), client=client)
        except (UpstreamAuthError, UpstreamError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {DISCOVERY_WAIT:.0f} s"
            status = UpstreamAuthStatus(self.redirect_uri, server.upstream_issuer, client=client, warning=(
                f"the upstream's authorization server could not be discovered ({reason}); users cannot "
                "connect their accounts until it can be (the server is saved)"))
        self._status_cache.set(key, status)
        return status

    async def forget_lost_access(self, server_id: str) -> int:
        """After a sharing rule went: the upstream credentials of the users the rules no
        longer admit to this server (its owner always is), deleted; how many."""
        server = await self._storage.get_server(server_id)
        if server is None:
            return 0
        grants = tuple(await self._storage.grants_for(server_id))
        lost = []
        for credential in await self._storage.upstream_auth.credentials_of_server(server_id):
            user = await self._storage.get_user(credential.user_sub)
            principal = Principal(sub=credential.user_sub, email=user.email if user and user.email_verified else "",
                                  hd=user.hd if user else "")
            if user is None or not decide_for(principal, server, grants).allowed:
                lost.append(credential.user_sub)
        return await self._forget(server_id, lost, "access_removed")

    async def forget_credentials(self, user_sub: str, server_ids: list[str] | None = None) -> int:
        """The user's upstream credentials for these servers (None: every server) deleted:
        their authorizations were revoked, or the user was removed."""
        store = self._storage.upstream_auth
        if server_ids is None:
            count = await store.delete_user_credentials(user_sub)
        else:
            count = sum([await store.delete_credential(user_sub, server_id) for server_id in server_ids])
        if count:
            security_event("upstream_credentials_deleted", "connected accounts deleted with the user's access",
                           user_sub=user_sub, reason="authorization_revoked", count=count)
        return count

    async def _forget(self, server_id: str, users: list[str] | None, reason: str) -> int:
        store = self._storage.upstream_auth
        if users is None:
            users = [c.user_sub for c in await store.credentials_of_server(server_id)]
        count = sum([await store.delete_credential(sub, server_id) for sub in users])
        if count:
            security_event("upstream_credentials_deleted", "connected accounts deleted with the users' access",
                           server_id=server_id, reason=reason, count=count)
        return count

    async def check_upstream_address(self, url: str, *, internal_allowed: bool, field: str = "upstream_url") -> None:
        """Where `url` leads must pass the address guard (MCPGW_UPSTREAM_ALLOW) the proxy
        connects through, checked here so that the CLI, the API and the dashboard refuse the
        same URLs at the same moment. Internal destinations (allow-listed but not public:
        loopback, private ranges, names allow-listed as such) are for `internal_allowed`
        callers only: the operator's CLI and administrators; anyone else could otherwise
        read internal services through the proxy.

        Host names are resolved now, without blocking the loop; the proxy resolves and
        checks again at every connection, with the same rule (`Server.internal_upstream`):
        a name of someone else's server that later points inward (DNS rebinding) is
        refused there even when the allow-list covers the address. A name that does not resolve is accepted from
        the operator (the proxy decides once it does) and refused from anyone else (it
        cannot be shown to be public).
        """
        try:
            target = parse_upstream_url(url)
        except UpstreamRefused as exc:
            raise InvalidInput(str(exc), field) from None
        try:
            addresses = await asyncio.wait_for(self._policy.resolve(target.host, target.port), RESOLVE_TIMEOUT)
        except UpstreamRefused as exc:
            raise InvalidInput(f"Refused by the gateway's address guard (SSRF protection): {exc}", field) from None
        except (UpstreamUnreachable, TimeoutError):
            if internal_allowed:
                return
            raise InvalidInput(
                f"the upstream host {target.host} could not be resolved, so it cannot be checked "
                "to be a public address", field
            ) from None
        if internal_allowed:
            return
        internal = [address for address in addresses if PUBLIC_ONLY.refusal(address) is not None]
        if internal or self._policy.allows_host(target.host):
            where = ", ".join(internal) or target.host
            raise InvalidInput(
                f"only administrators may register an upstream on an internal address ({where}); "
                "use a public address or ask an administrator", field
            )

    def seal_headers(self, server_id: str, headers: dict[str, str]) -> str:
        return self._box.seal(json.dumps(headers).encode(), "upstream-headers:" + server_id)

    def upstream_headers(self, server: Server) -> Mapping[str, str]:
        """The server's upstream headers, decrypted (read-only: it is a shared cache entry)."""
        sealed = server.upstream_headers_enc
        if not sealed:
            return {}
        headers = self._headers_cache.get(sealed)
        if headers is None:
            headers = MappingProxyType(json.loads(self._box.open(sealed, "upstream-headers:" + server.server_id)))
            self._headers_cache.set(sealed, headers)
        return headers

    async def get(self, server_id: str) -> Server:
        server = await self._storage.get_server(server_id)
        if server is None:
            raise InvalidInput(f"there is no server {server_id}")
        return server

    async def list(self) -> list[Server]:
        return await self._storage.list_servers()

    async def remove(self, server_id: str) -> None:
        if not await self._storage.delete_server(server_id):
            raise InvalidInput(f"there is no server {server_id}")
        self._access.forget(server_id)
        security_event("server_removed", "server removed with its grants and sessions",
                       server_id=server_id)

    async def add_grant(self, server_id: str, kind: str, value: str) -> Grant:
        await self.get(server_id)
        value = check_email(value, "value") if kind == "email" else check_domain(value, "value")
        grant = Grant(server_id, kind, value, self._now())
        await self._storage.add_grant(grant)
        self._access.forget(server_id)
        security_event("grant_added", "server shared",
                       server_id=server_id, kind=kind, value=value)
        return grant

    async def remove_grant(self, server_id: str, kind: str, value: str) -> None:
        value = check_text(value, "value", limit=400, label="the grant").strip().lower()
        value = value.lstrip("@") if kind == "domain" else value
        if not await self._storage.remove_grant(server_id, kind, value):
            raise InvalidInput(f"{server_id} has no {kind} grant for {value}")
        self._access.forget(server_id)
        security_event("grant_removed", "server no longer shared",
                       server_id=server_id, kind=kind, value=value)
        await self.forget_lost_access(server_id)

    async def grants(self, server_id: str) -> list[Grant]:
        await self.get(server_id)
        return await self._storage.grants_for(server_id)

    async def visible_to(self, sub: str) -> list[tuple[Server, str]]:
        """(server, why) for every server this user owns or may use."""
        user = await self._storage.get_user(sub)
        found: dict[str, tuple[Server, str]] = {
            s.server_id: (s, "owner") for s in await self._storage.servers_owned_by(sub)
        }
        if user is not None:
            principal = Principal(sub=sub, email=user.email if user.email_verified else "", hd=user.hd)
            rules = []
            if principal.email:
                rules.append(("email", principal.email))
            if principal.hd:
                rules.append(("domain", principal.hd))
            for kind, value in rules:  # the candidates; decide_for decides
                for grant in await self._storage.grants_matching(kind, value):
                    if grant.server_id not in found:
                        server = await self._storage.get_server(grant.server_id)
                        decision = decide_for(principal, server, (grant,)) if server is not None else None
                        if decision is not None and decision.allowed:
                            found[server.server_id] = (server, decision.reason)
        return sorted(found.values(), key=lambda pair: pair[0].name.lower())
