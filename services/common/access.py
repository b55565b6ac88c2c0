"""AccessPolicy: who may use which server (owner, e-mail grant, Workspace domain grant), from a
per-process cache with read-ahead and bounded stale serving (docs/architecture.md §2, §5)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.cache import TtlCache
from storage.base import Grant, Server, Storage

log = logging.getLogger("gateway.access")

CACHE_TTL = 3.0  # a removed grant is refused within this many seconds on every instance…
STALE_FOR = 30.0  # …or within this many more while storage is slow or failing
CACHE_SIZE = 10000
RETRY_EVERY = 1.0  # seconds between background refreshes of a server after one failed
STALE_WAIT = 0.2  # how long a caller with expired rules waits for storage before using them


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


@dataclass(frozen=True)
class _Entry:
    fresh_until: float
    server: Server | None
    grants: tuple[Grant, ...]


class AccessPolicy:
    def __init__(self, storage: Storage, *, clock: Callable[[], float] = time.monotonic,
                 ttl: float = CACHE_TTL, stale_for: float = STALE_FOR, stale_wait: float = STALE_WAIT):
        self._storage = storage
        self._clock = clock
        self._ttl = ttl
        self._stale_for = stale_for
        self._stale_wait = stale_wait
        # LRU when full. No TTL of its own: _entry reads the clock once and decides from the
        # entry's fresh_until whether it is fresh, usable stale, or past the bound.
        self._cache = TtlCache(CACHE_SIZE, clock=clock)
        # One storage read per server at a time, shared by every caller that needs it.
        self._refreshing: dict[str, asyncio.Task[_Entry]] = {}
        self._retry_at: dict[str, float] = {}

    async def server(self, server_id: str) -> Server | None:
        return (await self._entry(server_id)).server

    async def rules(self, server_id: str) -> tuple[Server | None, tuple[Grant, ...]]:
        """The cached server and its grants (the very same objects while cached: the tool
        policy cache keys on their identity)."""
        entry = await self._entry(server_id)
        return entry.server, entry.grants

    async def decide(self, principal: Principal, server_id: str) -> Decision:
        entry = await self._entry(server_id)
        if entry.server is None:
            return Decision(False, "this server does not exist")
        return decide_for(principal, entry.server, entry.grants)

    def forget(self, server_id: str) -> None:
        """Drop the cached rules after a local change, so this instance sees it at once.
        A refresh already reading is disowned: what it read may predate the change."""
        self._cache.pop(server_id, None)
        self._refreshing.pop(server_id, None)
        self._retry_at.pop(server_id, None)

    async def _entry(self, server_id: str) -> _Entry:
        now = self._clock()
        entry = self._cache.get(server_id)
        if entry is not None and now < entry.fresh_until - self._ttl / 2:
            return entry
        usable = entry is not None and now < entry.fresh_until + self._stale_for
        refresh = self._refreshing.get(server_id)
        if refresh is None and not (usable and now < self._retry_at.get(server_id, 0.0)):
            refresh = self._refreshing[server_id] = asyncio.create_task(self._refresh(server_id))
            refresh.add_done_callback(_retrieve)
        if entry is not None and now < entry.fresh_until:
            return entry  # fresh: the read-ahead runs in the background
        # shield(): a caller that goes away must not cancel the read others wait for.
        if not usable:  # cold, or stale beyond the bound: wait, and fail closed on an error
            return await asyncio.shield(refresh)
        if refresh is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(refresh), self._stale_wait)
            except Exception:  # slow or failing storage (logged in _refresh): the bound holds
                pass
        return entry

    async def _refresh(self, server_id: str) -> _Entry:
        me = asyncio.current_task()
        try:
            server = await self._storage.get_server(server_id)
            grants = tuple(await self._storage.grants_for(server_id)) if server else ()
        except Exception as exc:
            # Background refreshes after a failure wait a moment: under an outage the
            # storage is not asked (and the log not written) on every request.
            self._retry_at[server_id] = self._clock() + RETRY_EVERY
            if server_id in self._cache:
                log.warning("sharing rules of %s not refreshed, serving the cached ones: %s",
                            server_id, exc)
            raise
        else:
            entry = _Entry(self._clock() + self._ttl, server, grants)
            if self._refreshing.get(server_id) is me:  # not disowned by forget() meanwhile
                self._cache.set(server_id, entry)
                self._retry_at.pop(server_id, None)
            return entry
        finally:
            if self._refreshing.get(server_id) is me:
                del self._refreshing[server_id]


def _retrieve(task: asyncio.Task) -> None:
    # A background refresh's failure is logged in _refresh; retrieving it here keeps
    # asyncio from reporting "exception was never retrieved" when nobody awaited it.
    if not task.cancelled():
        task.exception()


def decide_for(principal: Principal, server: Server, grants: tuple[Grant, ...]) -> Decision:
    """The one sharing rule (the proxy, the dashboard and the server registry all ask it):
    the owner, then an e-mail grant, then a Workspace domain grant."""
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
