"""SQLite: users, servers, grants, pending states and MCP sessions."""

from __future__ import annotations

from ..base import (
    Grant,
    McpSession,
    Pending,
    Server,
    User,
)
from .codecs import GRANTS, PENDING, SERVERS, SESSIONS, USERS, _encode, _quoted


class ServerRecords:
    """Users, servers and their sharing rules, pending states and MCP sessions (a mixin of
    SqliteStorage, whose plumbing it uses)."""

    # --------------------------------------------------------------------- users

    async def upsert_user(self, user: User) -> User:
        return await self._run(self._upsert_user, user)

    def _upsert_user(self, user: User) -> User:
        updates = ", ".join(
            f'"{c}" = excluded."{c}"' for c in USERS.columns if c not in ("sub", "created_at")
        )
        sql = (
            f"{USERS.insert} ON CONFLICT (sub) DO UPDATE SET {updates} "
            f"RETURNING {_quoted(USERS.columns)}"
        )
        with self._write() as conn:
            row = conn.execute(sql, USERS.encode(user)).fetchone()
        return USERS.decode(row)

    async def get_user(self, sub: str) -> User | None:
        return await self._read(self._one, USERS, "sub = ?", sub)

    # ------------------------------------------------------------------- servers

    async def create_server(self, server: Server) -> None:
        await self._run(self._insert, SERVERS, server)

    async def update_server(self, server: Server) -> None:
        await self._run(self._update_server, server)

    def _update_server(self, server: Server) -> None:
        columns = [c for c in SERVERS.columns if c != "server_id"]
        assignments = ", ".join(f'"{c}" = ?' for c in columns)
        values = [_encode(getattr(server, c)) for c in columns]
        changed = self._change(
            f"UPDATE servers SET {assignments} WHERE server_id = ?", *values, server.server_id
        )
        if not changed:
            raise KeyError(server.server_id)

    async def get_server(self, server_id: str) -> Server | None:
        return await self._read(self._one, SERVERS, "server_id = ?", server_id)

    async def list_servers(self) -> list[Server]:
        return await self._read(self._all, SERVERS, "1 ORDER BY created_at, server_id")

    async def servers_owned_by(self, sub: str) -> list[Server]:
        return await self._read(
            self._all, SERVERS, "owner_sub = ? ORDER BY created_at, server_id", sub
        )

    async def bind_owner(self, email: str, sub: str) -> int:
        return await self._run(
            self._change,
            "UPDATE servers SET owner_sub = ? WHERE owner_email = ? AND owner_sub = ''",
            sub,
            email,
        )

    async def delete_server(self, server_id: str) -> bool:
        return await self._run(self._delete_server, server_id)

    def _delete_server(self, server_id: str) -> bool:
        with self._write() as conn:
            conn.execute("DELETE FROM grants WHERE server_id = ?", (server_id,))
            conn.execute("DELETE FROM sessions WHERE server_id = ?", (server_id,))
            conn.execute("DELETE FROM tool_catalog WHERE server_id = ?", (server_id,))
            conn.execute("DELETE FROM tool_history WHERE server_id = ?", (server_id,))
            return (
                conn.execute("DELETE FROM servers WHERE server_id = ?", (server_id,)).rowcount > 0
            )

    async def add_grant(self, grant: Grant) -> bool:
        sql = f"{GRANTS.insert} ON CONFLICT DO NOTHING"
        return await self._run(self._change, sql, *GRANTS.encode(grant)) > 0

    async def remove_grant(self, server_id: str, kind: str, value: str) -> bool:
        changed = await self._run(
            self._change,
            "DELETE FROM grants WHERE server_id = ? AND kind = ? AND value = ?",
            server_id,
            kind,
            value,
        )
        return changed > 0

    async def grants_for(self, server_id: str) -> list[Grant]:
        return await self._read(self._all, GRANTS, "server_id = ? ORDER BY kind, value", server_id)

    async def grants_matching(self, kind: str, value: str) -> list[Grant]:
        return await self._read(
            self._all, GRANTS, "kind = ? AND value = ? ORDER BY server_id", kind, value
        )

    async def users_matching(self, kind: str, value: str) -> list[User]:
        if kind == "email":
            where = "email = ? AND email_verified = 1 ORDER BY last_login_at DESC, sub"
        elif kind == "domain":
            where = "hd = ? ORDER BY last_login_at DESC, sub"
        else:
            raise ValueError(f"unknown grant kind {kind!r}")
        return await self._read(self._all, USERS, where, value)

    # ------------------------------------------------------------------- pending

    async def put_pending(self, pending: Pending) -> None:
        await self._run(self._upsert, PENDING, pending)

    async def get_pending(self, kind: str, key: str, now: float) -> Pending | None:
        return await self._read(
            self._one, PENDING, '"kind" = ? AND "key" = ? AND expires_at > ?', kind, key, now
        )

    async def take_pending(self, kind: str, key: str, now: float) -> Pending | None:
        return await self._run(self._take_pending, kind, key, now)

    def _take_pending(self, kind: str, key: str, now: float) -> Pending | None:
        returning = _quoted(PENDING.columns)
        with self._write() as conn:
            # fetchall(): the statement must run to completion before COMMIT.
            rows = conn.execute(
                f'DELETE FROM pending WHERE "kind" = ? AND "key" = ? AND expires_at > ? '
                f"RETURNING {returning}",
                (kind, key, now),
            ).fetchall()
        return PENDING.decode(rows[0]) if rows else None

    # -------------------------------------------------------------- MCP sessions

    async def put_session(self, session: McpSession) -> None:
        await self._run(self._upsert, SESSIONS, session)

    async def get_session(self, session_id: str, now: float) -> McpSession | None:
        return await self._read(
            self._one, SESSIONS, "session_id = ? AND expires_at > ?", session_id, now
        )

    async def touch_session(self, session_id: str, expires_at: float) -> None:
        await self._run(
            self._change,
            "UPDATE sessions SET expires_at = ? WHERE session_id = ?",
            expires_at,
            session_id,
        )

    async def delete_session(self, session_id: str) -> bool:
        changed = await self._run(
            self._change, "DELETE FROM sessions WHERE session_id = ?", session_id
        )
        return changed > 0

    async def count_sessions(self, server_id: str, now: float) -> int:
        rows = await self._read(
            self._select,
            "SELECT count(*) FROM sessions WHERE server_id = ? AND expires_at > ?",
            server_id,
            now,
        )
        return rows[0][0]
