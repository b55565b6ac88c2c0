"""Connected accounts on SQLite: the upstream_credentials, upstream_registrations and
upstream_refresh_leases tables (migration 6; a trigger deletes them with their server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..upstream_auth import UpstreamAuthStore, UpstreamCredential, UpstreamRegistration
from .codecs import _Table

if TYPE_CHECKING:
    from .store import SqliteStorage

CREDENTIALS = _Table("upstream_credentials", UpstreamCredential, ("user_sub", "server_id"))
REGISTRATIONS = _Table("upstream_registrations", UpstreamRegistration, ("server_id", "issuer"))


class SqliteUpstreamAuth(UpstreamAuthStore):
    """`UpstreamAuthStore` through the connections of its `SqliteStorage`."""

    def __init__(self, store: SqliteStorage) -> None:
        self._store = store

    async def get_credential(self, user_sub: str, server_id: str) -> UpstreamCredential | None:
        # The writer's connection: a refresher waiting on another's lease must see its write.
        return await self._store._run(self._store._one, CREDENTIALS, "user_sub = ? AND server_id = ?",
                                      user_sub, server_id)

    async def put_credential(self, credential: UpstreamCredential, if_updated_at: float | None = None) -> bool:
        if if_updated_at is None:
            await self._store._run(self._store._upsert, CREDENTIALS, credential)
            return True
        sets = ", ".join(f'"{c}" = ?' for c in CREDENTIALS.columns)
        changed = await self._store._run(
            self._store._change,
            f"UPDATE upstream_credentials SET {sets} WHERE user_sub = ? AND server_id = ? AND updated_at = ?",
            *CREDENTIALS.encode(credential), credential.user_sub, credential.server_id, if_updated_at,
        )
        return changed > 0

    async def delete_credential(self, user_sub: str, server_id: str) -> bool:
        return await self._store._run(
            self._store._change, "DELETE FROM upstream_credentials WHERE user_sub = ? AND server_id = ?",
            user_sub, server_id,
        ) > 0

    async def credentials_of_user(self, user_sub: str) -> list[UpstreamCredential]:
        return await self._store._read(self._store._all, CREDENTIALS, "user_sub = ? ORDER BY server_id", user_sub)

    async def credentials_of_server(self, server_id: str) -> list[UpstreamCredential]:
        return await self._store._read(self._store._all, CREDENTIALS, "server_id = ? ORDER BY user_sub", server_id)

    async def count_credentials(self, server_id: str) -> int:
        rows = await self._store._read(
            self._store._select, "SELECT count(*) FROM upstream_credentials WHERE server_id = ?", server_id
        )
        return int(rows[0][0])

    async def delete_user_credentials(self, user_sub: str) -> int:
        return await self._store._run(
            self._store._change, "DELETE FROM upstream_credentials WHERE user_sub = ?", user_sub
        )

    async def get_registration(self, server_id: str, issuer: str) -> UpstreamRegistration | None:
        return await self._store._run(self._store._one, REGISTRATIONS, "server_id = ? AND issuer = ?",
                                      server_id, issuer)

    async def add_registration(self, registration: UpstreamRegistration) -> bool:
        return await self._store._run(
            self._store._change, f"{REGISTRATIONS.insert} ON CONFLICT DO NOTHING", *REGISTRATIONS.encode(registration)
        ) > 0

    async def delete_registration(self, server_id: str, issuer: str) -> bool:
        return await self._store._run(
            self._store._change, "DELETE FROM upstream_registrations WHERE server_id = ? AND issuer = ?",
            server_id, issuer,
        ) > 0

    async def take_refresh_lease(self, user_sub: str, server_id: str, holder: str, until: float,
                                 now: float) -> bool:
        return await self._store._run(
            self._store._change,
            "INSERT INTO upstream_refresh_leases (user_sub, server_id, holder, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_sub, server_id) DO UPDATE SET holder = excluded.holder, "
            "expires_at = excluded.expires_at WHERE expires_at <= ? OR holder = excluded.holder",
            user_sub, server_id, holder, until, now,
        ) > 0

    async def release_refresh_lease(self, user_sub: str, server_id: str, holder: str) -> None:
        await self._store._run(
            self._store._change,
            "DELETE FROM upstream_refresh_leases WHERE user_sub = ? AND server_id = ? AND holder = ?",
            user_sub, server_id, holder,
        )
