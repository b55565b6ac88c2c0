"""`SqliteStorage`: `Storage` on one SQLite file (stdlib sqlite3, WAL), its blocking work on
threads it owns, one connection each. How it handles locks, faults and several processes:
docs/storage.md."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ..base import (
    Conflict,
    Pending,
    Storage,
    StorageError,
    StorageUnavailable,
    User,
)
from .codecs import PENDING, USERS, R, _Table
from .connection import (
    _RECONNECT_ON,
    _UNAVAILABLE,
    BUSY_TIMEOUT_MS,
    MEMORY,
    MIN_SQLITE_VERSION,
    PROBE_BUDGET,
    PROBE_EVERY,
    READ_BUSY_TIMEOUT_MS,
    RETRY_AFTER,
    WRITE_BUDGET,
    T,
    _create_private_file,
    _enable_wal,
    _Slot,
    _transaction,
)
from .oauth import OAuthRecords
from .schema import migrate
from .servers import ServerRecords
from .tools import SqliteTools
from .upstream_auth import SqliteUpstreamAuth
from .usage import PURGE_OLD_HOURS, SqliteUsage


class SqliteStorage(ServerRecords, OAuthRecords, Storage):
    """`Storage` on one SQLite file; `":memory:"` gives a private in-memory database."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: _Slot | None = None
        self._reader: _Slot | None = None  # None for ":memory:": one connection is the database
        self._prober: _Slot | None = None
        self._local = threading.local()  # the connection of the call running on this thread
        self._probe: asyncio.Future | None = None
        self._probed: tuple[float, StorageUnavailable | None] | None = None
        self.usage = SqliteUsage(self)
        self.tools = SqliteTools(self)
        self.upstream_auth = SqliteUpstreamAuth(self)

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """A write (or a read that must see this instance's own latest write)."""
        return await self._submit(self._writer, time.monotonic() + WRITE_BUDGET, fn, args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(self._reader or self._writer, None, fn, args)

    async def _submit(self, slot: _Slot | None, deadline: float | None, fn: Callable[..., T],
                      args: tuple) -> T:
        if slot is None:
            raise StorageError("sqlite storage is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(slot.executor, self._call, slot, deadline, fn, args)

    def _call(self, slot: _Slot, deadline: float | None, fn: Callable[..., T], args: tuple) -> T:
        """Runs on the slot's thread: the one place sqlite3 errors become storage errors."""
        try:
            with slot.lock:
                if deadline is not None:
                    # The budget counts the time spent queued behind other writes too.
                    remaining_ms = int((deadline - time.monotonic()) * 1000)
                    if remaining_ms <= 0:
                        raise StorageUnavailable(
                            "sqlite: the database is busy (writes are queued)", RETRY_AFTER
                        )
                conn = slot.conn
                if conn is None:
                    conn = slot.conn = self._connect(slot.busy_timeout_ms)
                if deadline is not None:
                    conn.execute(f"PRAGMA busy_timeout = {remaining_ms}")
                self._local.conn = conn
                try:
                    result = fn(*args)
                finally:
                    self._local.conn = None
                if deadline is not None and self._probed is not None and self._probed[1] is not None:
                    self._probed = None  # a write went through: the kept failure is old news
                return result
        except sqlite3.Error as exc:
            primary = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
            if primary in _RECONNECT_ON and self.path != MEMORY:
                self._reconnect_all()
            if primary in _UNAVAILABLE:
                self._probed = None  # news for readiness: the next /readyz probes afresh
                raise StorageUnavailable(f"sqlite: {_UNAVAILABLE[primary]} ({exc})", RETRY_AFTER) from exc
            raise StorageError(f"sqlite: {exc}") from exc

    def _reconnect_all(self) -> None:
        """Close every connection at one moment (they reopen on their next use), after a
        fault a connection keeps. Locks are taken in one fixed order, and only by a thread
        that holds none, so this cannot deadlock."""
        slots = [slot for slot in (self._writer, self._reader, self._prober) if slot is not None]
        for slot in slots:
            slot.lock.acquire()
        try:
            for slot in slots:
                slot.close_connection()
        finally:
            for slot in reversed(slots):
                slot.lock.release()

    @property
    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            raise StorageError("sqlite storage is not open")
        return conn

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return _transaction(self._db)

    def _one(self, table: _Table[R], where: str, *args: Any) -> R | None:
        row = self._db.execute(f"{table.select} WHERE {where}", args).fetchone()
        return None if row is None else table.decode(row)

    def _all(self, table: _Table[R], where: str, *args: Any) -> list[R]:
        rows = self._db.execute(f"{table.select} WHERE {where}", args).fetchall()
        return [table.decode(row) for row in rows]

    def _insert(self, table: _Table[R], record: R) -> None:
        try:
            with self._write() as conn:
                conn.execute(table.insert, table.encode(record))
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"{table.name}: {exc}") from exc

    def _upsert(self, table: _Table[R], record: R) -> None:
        with self._write() as conn:
            conn.execute(table.upsert, table.encode(record))

    def _change(self, sql: str, *args: Any) -> int:
        with self._write() as conn:
            return conn.execute(sql, args).rowcount

    def _select(self, sql: str, *args: Any) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._writer is not None:
            return
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            wanted = ".".join(map(str, MIN_SQLITE_VERSION))
            raise StorageError(
                f"SQLite {sqlite3.sqlite_version} is too old; the gateway needs {wanted}+"
            )
        writer = _Slot("writer", BUSY_TIMEOUT_MS)
        loop = asyncio.get_running_loop()
        try:
            writer.conn = await loop.run_in_executor(writer.executor, self._open_writer)
        except BaseException as exc:
            writer.executor.shutdown(wait=False)
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"sqlite: cannot open {self.path}: {exc}") from exc
            raise
        self._writer = writer
        if self.path != MEMORY:
            self._reader = _Slot("reader", READ_BUSY_TIMEOUT_MS)
            self._prober = _Slot("prober", int(PROBE_BUDGET * 1000))

    def _open_writer(self) -> sqlite3.Connection:
        if self.path != MEMORY:
            _create_private_file(self.path)
        conn = self._connect(BUSY_TIMEOUT_MS)
        try:
            migrate(conn, self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=busy_timeout_ms / 1000,
            # Transactions are explicit (BEGIN IMMEDIATE); sqlite3's implicit ones would
            # start deferred and could fail to upgrade under contention.
            isolation_level=None,
            check_same_thread=False,  # used by one thread at a time, under its slot's lock
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            if self.path != MEMORY:
                _enable_wal(conn)
            # FULL rather than NORMAL: a crash must never forget that a code was
            # redeemed or a refresh token rotated; write volume here is small.
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        slots = [slot for slot in (self._writer, self._reader, self._prober) if slot is not None]
        if not slots:
            return
        self._writer = self._reader = self._prober = None
        loop = asyncio.get_running_loop()
        for slot in slots:
            try:
                # On the slot's own thread, after the work already queued there.
                await loop.run_in_executor(slot.executor, slot.close_connection)
            finally:
                slot.executor.shutdown(wait=False)

    async def ping(self) -> None:
        """Readiness: can this store take a write right now? A real write (a probe row in
        `pending`, purged like any other) on the prober's own connection with a short
        budget, so it answers at once while writers wait; at most one probe per
        PROBE_EVERY seconds, shared by concurrent callers."""
        if self._writer is None:
            raise StorageError("sqlite storage is not open")
        now = time.monotonic()
        if self._probed is not None and now - self._probed[0] < PROBE_EVERY:
            if self._probed[1] is not None:
                raise self._probed[1]
            return
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._probe_once())
        probe = self._probe
        failure = await asyncio.shield(probe)
        if failure is not None:
            raise failure

    async def _probe_once(self) -> StorageUnavailable | None:
        failure: StorageUnavailable | None = None
        try:
            await self._submit(self._prober or self._writer, time.monotonic() + PROBE_BUDGET,
                               self._probe_write, ())
        except StorageUnavailable as exc:
            failure = exc
        except StorageError as exc:
            failure = StorageUnavailable(str(exc), RETRY_AFTER)
        finally:
            self._probe = None
        self._probed = (time.monotonic(), failure)
        return failure

    def _probe_write(self) -> None:
        probe = Pending("readyz", "probe", {}, time.time() + 60)
        with self._write() as conn:
            conn.execute(PENDING.upsert, PENDING.encode(probe))


    # ------------------------------------------------------- removing a user

    async def list_users(self) -> list[User]:
        return await self._read(self._all, USERS, "1 ORDER BY email, sub")

    async def delete_user(self, sub: str) -> bool:
        return await self._run(self._change, "DELETE FROM users WHERE sub = ?", sub) > 0

    async def delete_user_sessions(self, sub: str) -> int:
        # No index by user: the sessions table holds live sessions only (purged at expiry).
        return await self._run(self._change, "DELETE FROM sessions WHERE user_sub = ?", sub)

    # -------------------------------------------------------------- housekeeping

    async def purge_expired(self, now: float) -> int:
        return await self._run(self._purge_expired, now)

    def _purge_expired(self, now: float) -> int:
        # Families themselves stay: "my authorizations" lists revoked ones too, and a
        # family row is small. Usage events are history, not expiring state.
        statements = (
            "DELETE FROM pending WHERE expires_at <= ?",
            "DELETE FROM codes WHERE expires_at <= ?",
            "DELETE FROM sessions WHERE expires_at <= ?",
            "DELETE FROM revoked_access_tokens WHERE expires_at <= ?",
            "DELETE FROM upstream_refresh_leases WHERE expires_at <= ?",
            PURGE_OLD_HOURS,
            """DELETE FROM refresh_tokens WHERE family_expires_at <= ?1 OR family_id IN (
                SELECT family_id FROM refresh_families WHERE revoked_at > 0 OR expires_at <= ?1
            )""",
        )
        with self._write() as conn:
            return sum(conn.execute(sql, (now,)).rowcount for sql in statements)
