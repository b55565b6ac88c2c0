"""AccessPolicy: who may use which server (owner, e-mail grant, Workspace domain grant),
answered from an in-process cache whose staleness is bounded by CACHE_TTL.

Domain membership is the ID token's `hd` claim, never the e-mail suffix; e-mail grants
need a verified e-mail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from storage.base import Grant, Server, Storage

CACHE_TTL = 3.0  # a removed grant is refused within this many seconds on every instance
CACHE_SIZE = 10000


@dataclass(frozen=True)
class Principal:
    """The person behind a request, as far as sharing rules care."""

    sub: str
    email: str = ""  # only when the IdP said it is verified
    hd: str = ""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # owner | email | domain, or why not


class AccessPolicy:
    def __init__(self, storage: Storage):
        self._storage = storage
        self._cache: dict[str, tuple[float, Server | None, tuple[Grant, ...]]] = {}

    async def server(self, server_id: str) -> Server | None:
        return (await self._entry(server_id))[1]

    async def _entry(self, server_id: str):
        now = time.monotonic()
        entry = self._cache.get(server_id)
        if entry is None or entry[0] < now:
            server = await self._storage.get_server(server_id)
            grants = tuple(await self._storage.grants_for(server_id)) if server else ()
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()  # crude but bounded; entries refill in one lookup each
            entry = (now + CACHE_TTL, server, grants)
            self._cache[server_id] = entry
        return entry

    def forget(self, server_id: str) -> None:
        """Drop the cached rules after a local change, so this instance sees it at once."""
        self._cache.pop(server_id, None)

    async def decide(self, principal: Principal, server_id: str) -> Decision:
        _, server, grants = await self._entry(server_id)
        if server is None:
            return Decision(False, "this server does not exist")
        return decide_for(principal, server, grants)


def decide_for(principal: Principal, server: Server, grants: tuple[Grant, ...]) -> Decision:
    if server.owner_sub and server.owner_sub == principal.sub:
        return Decision(True, "owner")
    email = principal.email.lower()
    if not server.owner_sub and email and email == server.owner_email:
        return Decision(True, "owner")
    for grant in grants:
        if grant.kind == "email" and email and grant.value == email:
            return Decision(True, "email")
        if grant.kind == "domain" and principal.hd and grant.value == principal.hd.lower():
            return Decision(True, "domain")
    return Decision(False, "this server has not been shared with your account")
