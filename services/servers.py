"""ServerRegistry: registering upstream MCP servers and their sharing rules (grants),
with the validation both the CLI and the dashboard rely on."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from urllib.parse import urlsplit

from services.access import AccessPolicy
from services.keys import SecretBox
from storage.base import Conflict, Grant, Server, Storage

SERVER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{3,64}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
DOMAIN_RE = re.compile(r"^(?=.{3,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
FORBIDDEN_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "mcp-session-id"}


class InvalidInput(ValueError):
    """A value a person typed that cannot be used; the message says which and why."""


def check_email(value: str) -> str:
    value = value.strip().lower()
    if not EMAIL_RE.match(value):
        raise InvalidInput(f"{value!r} is not an e-mail address")
    return value


def check_domain(value: str) -> str:
    value = value.strip().lower().lstrip("@")
    if not DOMAIN_RE.match(value):
        raise InvalidInput(f"{value!r} is not a domain name")
    return value


def check_upstream_url(value: str) -> str:
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("the upstream URL must be an http(s) URL")
    if parts.username or parts.password or parts.fragment:
        raise InvalidInput("the upstream URL must not carry user information or a fragment")
    if len(value) > 2000:
        raise InvalidInput("the upstream URL is too long")
    return value


def parse_header(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not HEADER_NAME_RE.match(name) or not value or any(c in value for c in "\r\n\0"):
        raise InvalidInput(f"{line!r} is not a 'Name: value' header")
    if name.lower() in FORBIDDEN_HEADERS:
        raise InvalidInput(f"the {name} header is managed by the gateway")
    return name, value


class ServerRegistry:
    def __init__(self, storage: Storage, box: SecretBox, access: AccessPolicy):
        self._storage = storage
        self._box = box
        self._access = access
        # Decrypted upstream headers by ciphertext: the proxy needs them on every call, and
        # an edit makes a new ciphertext, so entries never go stale.
        self._headers_cache: dict[str, Mapping[str, str]] = {}

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
    ) -> Server:
        name = name.strip()
        if not 0 < len(name) <= 100:
            raise InvalidInput("the name must be 1 to 100 characters")
        if server_id is None:
            server_id = "srv_" + secrets.token_urlsafe(9).replace("-", "x").replace("_", "y")
        elif not SERVER_ID_RE.match(server_id):
            raise InvalidInput("the id must be 3 to 64 letters, digits, '-' or '_'")
        parsed = dict(parse_header(h) for h in headers or [])
        server = Server(
            server_id=server_id,
            name=name,
            upstream_url=check_upstream_url(upstream_url),
            owner_sub=owner_sub,
            owner_email=check_email(owner_email),
            upstream_headers_enc=self.seal_headers(server_id, parsed) if parsed else "",
            forward_identity=forward_identity,
            created_at=time.time(),
        )
        try:
            await self._storage.create_server(server)
        except Conflict:
            raise InvalidInput(f"a server with id {server_id} exists already") from None
        return server

    async def update(
        self,
        server_id: str,
        *,
        name: str | None = None,
        upstream_url: str | None = None,
        headers: list[str] | None = None,
        forward_identity: bool | None = None,
    ) -> Server:
        """Change what is given; `headers` (when not None) replaces every upstream header."""
        server = await self.get(server_id)
        changes: dict = {}
        if name is not None:
            name = name.strip()
            if not 0 < len(name) <= 100:
                raise InvalidInput("the name must be 1 to 100 characters")
            changes["name"] = name
        if upstream_url is not None:
            changes["upstream_url"] = check_upstream_url(upstream_url)
        if headers is not None:
            parsed = dict(parse_header(h) for h in headers)
            changes["upstream_headers_enc"] = self.seal_headers(server_id, parsed) if parsed else ""
        if forward_identity is not None:
            changes["forward_identity"] = forward_identity
        updated = replace(server, **changes)
        try:
            await self._storage.update_server(updated)
        except KeyError:
            raise InvalidInput(f"there is no server {server_id}") from None
        self._access.forget(server_id)
        return updated

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
            if len(self._headers_cache) >= 10000:
                self._headers_cache.clear()
            self._headers_cache[sealed] = headers
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

    async def add_grant(self, server_id: str, kind: str, value: str) -> Grant:
        await self.get(server_id)
        value = check_email(value) if kind == "email" else check_domain(value)
        grant = Grant(server_id, kind, value, time.time())
        await self._storage.add_grant(grant)
        self._access.forget(server_id)
        return grant

    async def remove_grant(self, server_id: str, kind: str, value: str) -> None:
        value = value.strip().lower().lstrip("@") if kind == "domain" else value.strip().lower()
        if not await self._storage.remove_grant(server_id, kind, value):
            raise InvalidInput(f"{server_id} has no {kind} grant for {value}")
        self._access.forget(server_id)

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
            rules = []
            if user.email and user.email_verified:
                rules.append(("email", user.email))
            if user.hd:
                rules.append(("domain", user.hd))
            for kind, value in rules:
                for grant in await self._storage.grants_matching(kind, value):
                    if grant.server_id not in found:
                        server = await self._storage.get_server(grant.server_id)
                        if server is not None:
                            found[server.server_id] = (server, kind)
        return sorted(found.values(), key=lambda pair: pair[0].name.lower())
