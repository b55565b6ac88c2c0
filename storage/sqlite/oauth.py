"""SQLite: clients, codes, refresh tokens, consents, signing keys, revocations."""

from __future__ import annotations

import sqlite3
import time

from ..base import (
    SIGNING_KEY_STATUSES,
    AuthCode,
    Client,
    Conflict,
    Consent,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    SigningKey,
)
from .codecs import CLIENTS, CODES, CONSENTS, FAMILIES, REFRESH_TOKENS, REVOKED, SIGNING_KEYS, _quoted


class OAuthRecords:
    """Clients, authorization codes, refresh families and tokens, consents, signing keys
    and revoked access tokens (a mixin of SqliteStorage, whose plumbing it uses)."""

    # ------------------------------------------------------------------- clients

    async def create_client(self, client: Client) -> None:
        await self._run(self._insert, CLIENTS, client)

    async def put_client(self, client: Client) -> None:
        await self._run(self._upsert, CLIENTS, client)

    async def get_client(self, client_id: str) -> Client | None:
        return await self._read(self._one, CLIENTS, "client_id = ?", client_id)

    async def touch_client(self, client_id: str, at: float) -> None:
        # max(): a late, out-of-order touch must not make a client look idler.
        await self._run(
            self._change,
            "UPDATE clients SET last_used_at = max(last_used_at, ?) WHERE client_id = ?",
            at,
            client_id,
        )

    async def delete_client(self, client_id: str) -> bool:
        return (
            await self._run(self._change, "DELETE FROM clients WHERE client_id = ?", client_id) > 0
        )

    async def reap_idle_clients(self, kind: str, unused_since: float, limit: int = 500) -> int:
        return await self._run(
            self._change,
            """DELETE FROM clients WHERE client_id IN (
                SELECT c.client_id FROM clients AS c
                WHERE c.kind = ? AND max(c.created_at, c.last_used_at) < ?
                AND NOT EXISTS (
                    SELECT 1 FROM refresh_families AS f
                    WHERE f.client_id = c.client_id AND f.revoked_at = 0 AND f.expires_at > ?
                )
                LIMIT ?
            )""",
            kind,
            unused_since,
            time.time(),
            limit,
        )

    # --------------------------------------------------------------------- codes

    async def put_code(self, code: AuthCode) -> None:
        # Insert-only: overwriting would resurrect a redeemed code.
        await self._run(self._insert, CODES, code)

    async def redeem_code(self, code_hash: str) -> tuple[AuthCode | None, bool]:
        return await self._run(self._redeem_code, code_hash)

    def _redeem_code(self, code_hash: str) -> tuple[AuthCode | None, bool]:
        with self._write() as conn:
            first_use = (
                conn.execute(
                    "UPDATE codes SET used = 1 WHERE code_hash = ? AND used = 0", (code_hash,)
                ).rowcount
                == 1
            )
            code = self._one(CODES, "code_hash = ?", code_hash)
        return code, first_use and code is not None

    # ------------------------------------------------------------ refresh tokens

    async def create_family(self, family: RefreshFamily, first: RefreshToken) -> None:
        await self._run(self._create_family, family, first)

    def _create_family(self, family: RefreshFamily, first: RefreshToken) -> None:
        try:
            with self._write() as conn:
                conn.execute(FAMILIES.insert, FAMILIES.encode(family))
                conn.execute(REFRESH_TOKENS.insert, REFRESH_TOKENS.encode(first))
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"refresh family: {exc}") from exc

    async def get_family(self, family_id: str) -> RefreshFamily | None:
        return await self._read(self._one, FAMILIES, "family_id = ?", family_id)

    async def families_of_user(self, user_sub: str) -> list[RefreshFamily]:
        return await self._read(
            self._all, FAMILIES, "user_sub = ? ORDER BY created_at DESC, family_id", user_sub
        )

    async def get_refresh_token(self, token_hash: str) -> RefreshToken | None:
        return await self._read(self._one, REFRESH_TOKENS, "token_hash = ?", token_hash)

    async def rotate_refresh_token(
        self, old_hash: str, successor: RefreshToken, successor_enc: str, now: float
    ) -> bool:
        if now <= 0:
            # used_at = 0 means "unused": rotating at 0 would leave the token reusable.
            raise ValueError("rotate_refresh_token needs a positive `now`")
        return await self._run(self._rotate, old_hash, successor, successor_enc, now)

    def _rotate(
        self, old_hash: str, successor: RefreshToken, successor_enc: str, now: float
    ) -> bool:
        try:
            with self._write() as conn:
                marked = conn.execute(
                    "UPDATE refresh_tokens SET used_at = ?, replaced_by = ?, successor_enc = ? "
                    "WHERE token_hash = ? AND used_at = 0",
                    (now, successor.token_hash, successor_enc, old_hash),
                ).rowcount
                if not marked:
                    return False
                conn.execute(REFRESH_TOKENS.insert, REFRESH_TOKENS.encode(successor))
                conn.execute(
                    "UPDATE refresh_families SET last_used_at = max(last_used_at, ?) "
                    "WHERE family_id = ?",
                    (now, successor.family_id),
                )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"refresh token successor: {exc}") from exc
        return True

    async def revoke_family(self, family_id: str, at: float) -> bool:
        # The first revocation time is kept: it is what the owner saw happen.
        changed = await self._run(
            self._change,
            "UPDATE refresh_families SET revoked_at = CASE WHEN revoked_at = 0 THEN ? "
            "ELSE revoked_at END WHERE family_id = ?",
            at,
            family_id,
        )
        return changed > 0

    # ------------------------------------------------------------------- consent

    async def get_consent(self, user_sub: str, client_id: str, audience: str) -> Consent | None:
        return await self._read(
            self._one,
            CONSENTS,
            "user_sub = ? AND client_id = ? AND audience = ?",
            user_sub,
            client_id,
            audience,
        )

    async def put_consent(self, consent: Consent) -> None:
        await self._run(self._upsert, CONSENTS, consent)

    async def delete_consents(self, user_sub: str, client_id: str) -> int:
        return await self._run(
            self._change,
            "DELETE FROM consents WHERE user_sub = ? AND client_id = ?",
            user_sub,
            client_id,
        )

    async def delete_user_consents(self, sub: str) -> int:
        # user_sub leads the primary key: one range of it.
        return await self._run(self._change, "DELETE FROM consents WHERE user_sub = ?", sub)

    # -------------------------------------------------------------- signing keys

    async def list_signing_keys(self) -> list[SigningKey]:
        return await self._read(self._all, SIGNING_KEYS, "1 ORDER BY created_at, kid")

    async def add_signing_key(self, key: SigningKey, only_if_none_active: bool = False) -> bool:
        return await self._run(self._add_signing_key, key, only_if_none_active)

    def _add_signing_key(self, key: SigningKey, only_if_none_active: bool) -> bool:
        values = SIGNING_KEYS.encode(key)
        try:
            if not only_if_none_active:
                self._insert(SIGNING_KEYS, key)
                return True
            columns = _quoted(SIGNING_KEYS.columns)
            marks = ", ".join("?" for _ in values)
            return (
                self._change(
                    f"INSERT INTO signing_keys ({columns}) SELECT {marks} WHERE NOT EXISTS "
                    "(SELECT 1 FROM signing_keys WHERE status = 'active')",
                    *values,
                )
                == 1
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"signing_keys: {exc}") from exc

    async def set_signing_key_status(self, kid: str, status: str, retire_at: float = 0.0) -> None:
        if status not in SIGNING_KEY_STATUSES:
            raise ValueError(f"unknown signing key status {status!r}")
        changed = await self._run(
            self._change,
            "UPDATE signing_keys SET status = ?, retire_at = ? WHERE kid = ?",
            status,
            retire_at,
            kid,
        )
        if not changed:
            raise KeyError(kid)

    # ----------------------------------------------------- revoked access tokens

    async def revoke_access_token(self, revoked: RevokedAccessToken) -> None:
        await self._run(
            self._change,
            f"{REVOKED.insert} ON CONFLICT (jti) DO UPDATE SET "
            "expires_at = max(expires_at, excluded.expires_at)",
            *REVOKED.encode(revoked),
        )

    async def revoked_access_tokens(self, now: float) -> list[RevokedAccessToken]:
        return await self._read(self._all, REVOKED, "expires_at > ? ORDER BY expires_at", now)
