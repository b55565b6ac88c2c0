"""SessionMap: the gateway's own Mcp-Session-Id <-> the upstream's, bound to user and server (the
upstream id never reaches the client); an in-process LRU, any instance continues any session."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import replace

from services.common.cache import TtlCache
from storage.base import McpSession, Storage

IDLE_TTL = 8 * 3600.0  # a session unused this long is forgotten
TOUCH_EVERY = 600.0  # storage is told of activity at most this often per session
CACHE_SIZE = 50000


class SessionMap:
    def __init__(self, storage: Storage, *, now: Callable[[], float] = time.time):
        self._storage = storage
        self._now = now
        # LRU; no TTL of its own: resolve checks the session's idle expiry (one clock read).
        self._cache = TtlCache(CACHE_SIZE, clock=now)

    async def create(
        self, *, user_sub: str, server_id: str, upstream_session_id: str, protocol_version: str
    ) -> McpSession:
        now = self._now()
        session = McpSession(
            session_id="mcpgw-" + secrets.token_urlsafe(24),
            upstream_session_id=upstream_session_id,
            user_sub=user_sub,
            server_id=server_id,
            protocol_version=protocol_version,
            created_at=now,
            expires_at=now + IDLE_TTL,
        )
        await self._storage.put_session(session)
        self._remember(session)
        return session

    async def resolve(self, session_id: str, user_sub: str, server_id: str) -> McpSession | None:
        """The session if it exists and belongs to this user on this server."""
        now = self._now()
        session = self._cache.get(session_id)
        if session is None or session.expires_at <= now:
            session = await self._storage.get_session(session_id, now) if len(session_id) <= 128 else None
            if session is None:
                self._cache.pop(session_id)
                return None
            self._remember(session)
        if session.user_sub != user_sub or session.server_id != server_id:
            return None
        if session.expires_at - now < IDLE_TTL - TOUCH_EVERY:
            session = replace(session, expires_at=now + IDLE_TTL)
            await self._storage.touch_session(session_id, session.expires_at)
            self._remember(session)
        return session

    async def drop(self, session_id: str) -> None:
        self._cache.pop(session_id, None)
        await self._storage.delete_session(session_id)

    def _remember(self, session: McpSession) -> None:
        self._cache.set(session.session_id, session)
