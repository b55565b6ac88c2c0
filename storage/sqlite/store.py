"""The embedded default backend: `Storage` on one SQLite file (stdlib sqlite3, WAL).

Blocking work runs off the event loop on threads owned by the instance, each with its own
connection: one writer, one reader (WAL lets it read while a writer, ours or another
process's, holds the write lock) and one readiness prober. Writes have a bounded budget
(queue wait plus busy wait); a store that is locked, read-only, full or failing I/O
raises `StorageUnavailable` (mapped in one place, `_call`), never a bare sqlite3 error.
Several processes may share the file: every one-shot operation is a single conditional
write inside a `BEGIN IMMEDIATE` transaction.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, get_origin, get_type_hints

from ..base import (
    LATENCY_BUCKETS,
    AuthCode,
    Client,
    Conflict,
    Consent,
    Grant,
    McpSession,
    Pending,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Server,
    ServerUser,
    SigningKey,
    Storage,
    StorageError,
    StorageUnavailable,
    UsageAggregate,
    UsageEvent,
    UsagePeriod,
    UsageRollup,
    User,
    latency_bucket,
    latency_bucket_bounds,
    legacy_internal_upstream,
)

__all__ = ["MIGRATIONS", "SqliteStorage"]

MEMORY = ":memory:"
BUSY_TIMEOUT_MS = 5000  # opening and migrating, when another process may be doing the same
# A write waits at most this long in all (queued behind other writes plus waiting for
# another process's write lock): a request gets a fast 503 rather than a stall.
WRITE_BUDGET = 2.0
READ_BUSY_TIMEOUT_MS = 2000  # WAL readers wait only on rare recovery or checkpoint moments
PROBE_BUDGET = 0.5  # the readiness write probe; /readyz must answer at once
PROBE_EVERY = 1.0  # at most one probe write per second, however often /readyz is asked
RETRY_AFTER = 2  # seconds, sent to clients with the 503 of an unavailable store
# Primary result codes that mean the store, not the request, is at fault right now.
_UNAVAILABLE = {
    sqlite3.SQLITE_BUSY: "the database is locked by another writer",
    sqlite3.SQLITE_LOCKED: "the database is locked by another writer",
    sqlite3.SQLITE_READONLY: "the database is read-only",
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_IOERR: "a disk I/O error",
    sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
}
# Faults a connection can keep after they end (one opened read-only stays read-only), so
# every connection is reopened. All at once: the process's connections to one file
# share its -shm state, and one kept open would hand its read-only view to the new ones.
_RECONNECT_ON = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR}
# RETURNING (take_pending) and `ON CONFLICT ... DO UPDATE` with RETURNING need 3.35.
MIN_SQLITE_VERSION = (3, 35, 0)
SIGNING_KEY_STATUSES = ("active", "retiring", "retired")

T = TypeVar("T")
R = TypeVar("R")  # a record dataclass

HIST_COLUMNS = tuple(f"h{i}" for i in range(LATENCY_BUCKETS))
# The bucket of an event's latency, in SQL (the same bounds as latency_bucket).
_BUCKET_SQL = (
    "CASE "
    + " ".join(
        f"WHEN latency_ms <= {latency_bucket_bounds(i)[1]!r} THEN {i}" for i in range(LATENCY_BUCKETS - 1)
    )
    + f" ELSE {LATENCY_BUCKETS - 1} END"
)
HOURLY_KEPT_SECONDS = 3 * 86400  # hourly aggregates serve the 24-hour view only

# Forward migrations, applied in order; user_version is the number applied. Append
# new entries, never edit a released one. Each entry is a sequence of statements rather
# than one script because sqlite3's executescript() commits first, which would break
# the all-or-nothing migration transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            sub TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            email_verified INTEGER NOT NULL,
            hd TEXT NOT NULL,
            name TEXT NOT NULL,
            picture TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_login_at REAL NOT NULL
        )""",
        """CREATE TABLE clients (
            client_id TEXT PRIMARY KEY,
            client_name TEXT NOT NULL,
            redirect_uris TEXT NOT NULL,
            token_endpoint_auth_method TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            grant_types TEXT NOT NULL,
            response_types TEXT NOT NULL,
            application_type TEXT NOT NULL,
            scope TEXT NOT NULL,
            kind TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_used_at REAL NOT NULL
        )""",
        # The expression must match reap_idle_clients' WHERE clause for the index to
        # be used.
        """CREATE INDEX clients_by_kind_idle
            ON clients (kind, max(created_at, last_used_at))""",
        """CREATE TABLE servers (
            server_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            upstream_url TEXT NOT NULL,
            owner_sub TEXT NOT NULL,
            owner_email TEXT NOT NULL,
            upstream_headers_enc TEXT NOT NULL,
            forward_identity INTEGER NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX servers_by_owner_sub ON servers (owner_sub)",
        "CREATE INDEX servers_by_owner_email ON servers (owner_email)",
        """CREATE TABLE grants (
            server_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (server_id, kind, value)
        ) WITHOUT ROWID""",
        "CREATE INDEX grants_by_kind_value ON grants (kind, value)",
        """CREATE TABLE pending (
            kind TEXT NOT NULL,
            "key" TEXT NOT NULL,
            payload TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (kind, "key")
        ) WITHOUT ROWID""",
        "CREATE INDEX pending_by_expiry ON pending (expires_at)",
        """CREATE TABLE codes (
            code_hash TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            redirect_uri TEXT NOT NULL,
            code_challenge TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            scope TEXT NOT NULL,
            audience TEXT NOT NULL,
            expires_at REAL NOT NULL,
            family_id TEXT NOT NULL,
            used INTEGER NOT NULL
        )""",
        "CREATE INDEX codes_by_expiry ON codes (expires_at)",
        """CREATE TABLE refresh_families (
            family_id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            audience TEXT NOT NULL,
            scope TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL NOT NULL,
            last_used_at REAL NOT NULL
        )""",
        "CREATE INDEX families_by_user ON refresh_families (user_sub)",
        "CREATE INDEX families_by_client ON refresh_families (client_id)",
        """CREATE TABLE refresh_tokens (
            token_hash TEXT PRIMARY KEY,
            family_id TEXT NOT NULL,
            client_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            scope TEXT NOT NULL,
            audience TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            family_expires_at REAL NOT NULL,
            used_at REAL NOT NULL,
            replaced_by TEXT NOT NULL,
            successor_enc TEXT NOT NULL
        )""",
        "CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family_id)",
        """CREATE TABLE consents (
            user_sub TEXT NOT NULL,
            client_id TEXT NOT NULL,
            audience TEXT NOT NULL,
            scope TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (user_sub, client_id, audience)
        ) WITHOUT ROWID""",
        """CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            private_key_enc TEXT NOT NULL,
            public_jwk TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            retire_at REAL NOT NULL
        )""",
        "CREATE INDEX signing_keys_by_status ON signing_keys (status)",
        """CREATE TABLE revoked_access_tokens (
            jti TEXT PRIMARY KEY,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX revoked_access_tokens_by_expiry ON revoked_access_tokens (expires_at)",
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            upstream_session_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            server_id TEXT NOT NULL,
            protocol_version TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX sessions_by_server ON sessions (server_id)",
        "CREATE INDEX sessions_by_expiry ON sessions (expires_at)",
        # The explicit id orders events that share a timestamp.
        """CREATE TABLE usage_events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            server_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            user_email TEXT NOT NULL,
            client_id TEXT NOT NULL,
            method TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome TEXT NOT NULL,
            latency_ms REAL NOT NULL,
            bytes_in INTEGER NOT NULL,
            bytes_out INTEGER NOT NULL,
            era TEXT NOT NULL
        )""",
        "CREATE INDEX usage_events_by_server_at ON usage_events (server_id, at)",
        """CREATE TABLE usage_daily (
            day TEXT NOT NULL,
            server_id TEXT NOT NULL,
            target TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            calls INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            latency_ms_sum REAL NOT NULL,
            latency_ms_max REAL NOT NULL,
            PRIMARY KEY (day, server_id, target, user_sub)
        ) WITHOUT ROWID""",
        "CREATE INDEX usage_daily_by_server_day ON usage_daily (server_id, day)",
    ),
    # 2: the dashboard. A latency histogram in the daily aggregates (one integer column
    # per fixed bucket, so SQL can add histograms up); who has used each server and when;
    # user lookups by e-mail and Workspace domain for the sharing list.
    (
        # Rebuilt rather than altered: keyed by server first, so that a server's days are
        # one contiguous range of the table (the usage page reads them without lookups).
        f"""CREATE TABLE usage_daily_v2 (
            server_id TEXT NOT NULL,
            day TEXT NOT NULL,
            target TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            calls INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            latency_ms_sum REAL NOT NULL,
            latency_ms_max REAL NOT NULL,
            {", ".join(f"h{i} INTEGER NOT NULL DEFAULT 0" for i in range(LATENCY_BUCKETS))},
            PRIMARY KEY (server_id, day, target, user_sub)
        ) WITHOUT ROWID""",
        """INSERT INTO usage_daily_v2
            (server_id, day, target, user_sub, calls, errors, latency_ms_sum, latency_ms_max)
            SELECT server_id, day, target, user_sub, calls, errors, latency_ms_sum, latency_ms_max
            FROM usage_daily""",
        "DROP TABLE usage_daily",
        "ALTER TABLE usage_daily_v2 RENAME TO usage_daily",
        """CREATE TABLE usage_users (
            server_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            user_email TEXT NOT NULL,
            first_used_at REAL NOT NULL,
            last_used_at REAL NOT NULL,
            PRIMARY KEY (server_id, user_sub)
        ) WITHOUT ROWID""",
        """INSERT INTO usage_users
            SELECT server_id, user_sub, max(user_email), min(at), max(at)
            FROM usage_events GROUP BY server_id, user_sub""",
        "CREATE INDEX users_by_email ON users (email)",
        "CREATE INDEX users_by_hd ON users (hd)",
    ),
    # 3: hourly aggregates, the same shape as the daily ones, so that the 24-hour usage
    # view reads aggregates too instead of a day of raw events. Kept for a few days only.
    (
        f"""CREATE TABLE usage_hourly (
            server_id TEXT NOT NULL,
            hour TEXT NOT NULL,
            target TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            calls INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            latency_ms_sum REAL NOT NULL,
            latency_ms_max REAL NOT NULL,
            {", ".join(f"h{i} INTEGER NOT NULL DEFAULT 0" for i in range(LATENCY_BUCKETS))},
            PRIMARY KEY (server_id, hour, target, user_sub)
        ) WITHOUT ROWID""",
        f"""INSERT INTO usage_hourly
            SELECT server_id, strftime('%Y-%m-%dT%H', at, 'unixepoch'), target, user_sub, count(*),
                   sum(outcome != 'ok'), sum(latency_ms), max(latency_ms),
                   {", ".join(f"sum(bucket = {i})" for i in range(LATENCY_BUCKETS))}
            FROM (SELECT *, {_BUCKET_SQL} AS bucket FROM usage_events
                  WHERE at >= strftime('%s', 'now') - {HOURLY_KEPT_SECONDS})
            GROUP BY 1, 2, 3, 4""",
    ),
    # 4: who may reach internal upstreams is recorded per server (Server.internal_upstream).
    # Servers from before keep working when their URL plainly points inward (the operator
    # registered them under the old rules); see storage.base.legacy_internal_upstream.
    (
        "ALTER TABLE servers ADD COLUMN internal_upstream INTEGER NOT NULL DEFAULT 0",
        "UPDATE servers SET internal_upstream = 1 WHERE legacy_internal_upstream(upstream_url)",
    ),
)


# ------------------------------------------------------------------ record mapping


class _Table(Generic[R]):
    """How one record dataclass maps to one table: columns are the dataclass fields,
    in order, under the same names; tuples and dicts are JSON text, bools integers."""

    def __init__(self, name: str, record: type[R], key: tuple[str, ...]) -> None:
        self.name = name
        self.record = record
        self.columns = tuple(f.name for f in fields(record))
        hints = get_type_hints(record)
        self._decoders: tuple[Callable[[Any], Any] | None, ...] = tuple(
            _decoder_for(hints[column]) for column in self.columns
        )
        quoted = _quoted(self.columns)
        marks = ", ".join("?" for _ in self.columns)
        self.select = f"SELECT {quoted} FROM {name}"
        self.insert = f"INSERT INTO {name} ({quoted}) VALUES ({marks})"
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in self.columns if c not in key)
        self.upsert = f"{self.insert} ON CONFLICT ({_quoted(key)}) DO UPDATE SET {updates}"

    def encode(self, record: R) -> tuple[Any, ...]:
        return tuple(_encode(getattr(record, column)) for column in self.columns)

    def decode(self, row: tuple[Any, ...]) -> R:
        values = {
            column: value if decoder is None else decoder(value)
            for column, decoder, value in zip(self.columns, self._decoders, row, strict=True)
        }
        return self.record(**values)


def _quoted(columns: tuple[str, ...]) -> str:
    # Quoted because some field names ("key") are SQL keywords.
    return ", ".join(f'"{c}"' for c in columns)


def _decoder_for(hint: Any) -> Callable[[Any], Any] | None:
    if get_origin(hint) is tuple:
        return lambda text: tuple(json.loads(text))
    if hint is dict or get_origin(hint) is dict:
        return json.loads
    if hint is bool:
        return bool
    return None


def _encode(value: Any) -> Any:
    if isinstance(value, tuple | list | dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return int(value)
    return value


USERS = _Table("users", User, ("sub",))
CLIENTS = _Table("clients", Client, ("client_id",))
SERVERS = _Table("servers", Server, ("server_id",))
GRANTS = _Table("grants", Grant, ("server_id", "kind", "value"))
PENDING = _Table("pending", Pending, ("kind", "key"))
CODES = _Table("codes", AuthCode, ("code_hash",))
FAMILIES = _Table("refresh_families", RefreshFamily, ("family_id",))
REFRESH_TOKENS = _Table("refresh_tokens", RefreshToken, ("token_hash",))
CONSENTS = _Table("consents", Consent, ("user_sub", "client_id", "audience"))
SIGNING_KEYS = _Table("signing_keys", SigningKey, ("kid",))
REVOKED = _Table("revoked_access_tokens", RevokedAccessToken, ("jti",))
SESSIONS = _Table("sessions", McpSession, ("session_id",))
USAGE_EVENTS = _Table("usage_events", UsageEvent, ())
SERVER_USERS = _Table("usage_users", ServerUser, ("server_id", "user_sub"))


def _aggregate_upsert(table: str, period: str) -> str:
    """Add pre-summed rows into usage_daily or usage_hourly (histograms add up too)."""
    columns = ("server_id", period, "target", "user_sub", "calls", "errors",
               "latency_ms_sum", "latency_ms_max", *HIST_COLUMNS)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT (server_id, {period}, target, user_sub) DO UPDATE SET "
        "calls = calls + excluded.calls, errors = errors + excluded.errors, "
        "latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum, "
        "latency_ms_max = max(latency_ms_max, excluded.latency_ms_max), "
        + ", ".join(f"{h} = {h} + excluded.{h}" for h in HIST_COLUMNS)
    )


def usage_day(at: float) -> str:
    """The UTC calendar day of a timestamp, as aggregates are keyed."""
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%d")


# ------------------------------------------------------------------------- backend


class _Slot:
    """One connection and the one thread that uses it; `lock` is held while it is in use,
    so that a reconnect can close every connection of the instance at one moment."""

    def __init__(self, name: str, busy_timeout_ms: int) -> None:
        self.name = name
        self.busy_timeout_ms = busy_timeout_ms
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None

    def close_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass  # a broken connection is being dropped anyway


class SqliteStorage(Storage):
    """`Storage` on one SQLite file; `":memory:"` gives a private in-memory database."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: _Slot | None = None
        self._reader: _Slot | None = None  # None for ":memory:": one connection is the database
        self._prober: _Slot | None = None
        self._local = threading.local()  # the connection of the call running on this thread
        self._probe: asyncio.Future | None = None
        self._probed: tuple[float, StorageUnavailable | None] | None = None

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
            self._migrate(conn)
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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Read first: a database already at the latest version needs no write lock, so a
        # gateway can start (and serve reads) on a store it cannot write just now.
        if self._schema_version(conn) == len(MIGRATIONS):
            return
        # Under IMMEDIATE, a second process opening a fresh file waits here and then
        # finds the schema already at the latest version.
        conn.create_function("legacy_internal_upstream", 1, legacy_internal_upstream, deterministic=True)
        with _transaction(conn):
            version = self._schema_version(conn)
            for script in MIGRATIONS[version:]:
                for statement in script:
                    conn.execute(statement)
            # PRAGMA takes no bound parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StorageError(
                f"{self.path} has schema version {version}, newer than this gateway "
                f"knows ({len(MIGRATIONS)}); upgrade the gateway"
            )
        return version

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

    # --------------------------------------------------------------------- usage

    async def record_usage(self, events: list[UsageEvent]) -> None:
        if events:
            await self._run(self._record_usage, list(events))

    def _record_usage(self, events: list[UsageEvent]) -> None:
        # Pre-summing the batch turns N events into one upsert per aggregate row.
        daily: dict[tuple[str, str, str, str], list] = {}
        hourly: dict[tuple[str, str, str, str], list] = {}
        users: dict[tuple[str, str], list] = {}
        for event in events:
            moment = datetime.fromtimestamp(event.at, tz=UTC)
            for sums, period in ((daily, moment.strftime("%Y-%m-%d")), (hourly, moment.strftime("%Y-%m-%dT%H"))):
                key = (event.server_id, period, event.target, event.user_sub)
                row = sums.get(key)
                if row is None:
                    row = sums[key] = [0, 0, 0.0, 0.0, [0] * LATENCY_BUCKETS]
                row[0] += 1
                row[1] += event.outcome != "ok"
                row[2] += event.latency_ms
                row[3] = max(row[3], event.latency_ms)
                row[4][latency_bucket(event.latency_ms)] += 1
            seen = users.get((event.server_id, event.user_sub))
            if seen is None:
                users[(event.server_id, event.user_sub)] = [event.user_email, event.at, event.at]
            else:
                if event.at >= seen[2]:
                    seen[0], seen[2] = event.user_email or seen[0], event.at
                seen[1] = min(seen[1], event.at)
        with self._write() as conn:
            conn.executemany(USAGE_EVENTS.insert, [USAGE_EVENTS.encode(e) for e in events])
            for table, period, sums in (("usage_daily", "day", daily), ("usage_hourly", "hour", hourly)):
                conn.executemany(_aggregate_upsert(table, period),
                                 [(*key, *totals[:4], *totals[4]) for key, totals in sums.items()])
            conn.executemany(
                f"{SERVER_USERS.insert} ON CONFLICT (server_id, user_sub) DO UPDATE SET "
                "user_email = CASE WHEN excluded.last_used_at >= last_used_at AND excluded.user_email != '' "
                "THEN excluded.user_email ELSE user_email END, "
                "first_used_at = min(first_used_at, excluded.first_used_at), "
                "last_used_at = max(last_used_at, excluded.last_used_at)",
                [(server, sub, *seen) for (server, sub), seen in users.items()],
            )

    def _select(self, sql: str, *args: Any) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()

    async def usage_aggregates(self, server_id: str, since_day: str) -> list[UsageAggregate]:
        rows = await self._read(
            self._select,
            "SELECT day, server_id, target, user_sub, calls, errors, latency_ms_sum, latency_ms_max, "
            f"{', '.join(HIST_COLUMNS)} FROM usage_daily WHERE server_id = ? AND day >= ? "
            "ORDER BY day, target, user_sub",
            server_id,
            since_day,
        )
        return [UsageAggregate(*row[:8], tuple(row[8:])) for row in rows]

    async def usage_rollup(self, server_id: str, since_day: str) -> list[UsageRollup]:
        return await self._rollup("usage_daily", "day", server_id, since_day)

    async def usage_per_day(self, server_id: str, since_day: str) -> list[UsagePeriod]:
        return await self._periods("usage_daily", "day", server_id, since_day)

    async def usage_rollup_hours(self, server_id: str, since_hour: str) -> list[UsageRollup]:
        return await self._rollup("usage_hourly", "hour", server_id, since_hour)

    async def usage_per_hour(self, server_id: str, since_hour: str) -> list[UsagePeriod]:
        return await self._periods("usage_hourly", "hour", server_id, since_hour)

    async def _rollup(self, table: str, period: str, server_id: str, since: str) -> list[UsageRollup]:
        """Per (tool, user) totals of daily or hourly aggregates; histograms add up."""
        sums = ", ".join(f"sum({h})" for h in HIST_COLUMNS)
        rows = await self._read(
            self._select,
            "SELECT target, user_sub, sum(calls), sum(errors), sum(latency_ms_sum), max(latency_ms_max), "
            f"{sums} FROM {table} WHERE server_id = ? AND {period} >= ? "
            "GROUP BY target, user_sub ORDER BY target, user_sub",
            server_id,
            since,
        )
        return [UsageRollup(*row[:6], tuple(row[6:])) for row in rows]

    async def _periods(self, table: str, period: str, server_id: str, since: str) -> list[UsagePeriod]:
        rows = await self._read(
            self._select,
            f"SELECT {period}, sum(calls), sum(errors) FROM {table} WHERE server_id = ? AND {period} >= ? "
            f"GROUP BY {period} ORDER BY {period}",
            server_id,
            since,
        )
        return [UsagePeriod(*row) for row in rows]

    async def server_users(self, server_id: str) -> list[ServerUser]:
        return await self._read(
            self._all, SERVER_USERS, "server_id = ? ORDER BY last_used_at DESC, user_sub", server_id
        )

    async def recent_usage(self, server_id: str, before: float, limit: int) -> list[UsageEvent]:
        return await self._read(
            self._all,
            USAGE_EVENTS,
            "server_id = ? AND at < ? ORDER BY at DESC, id DESC LIMIT ?",
            server_id,
            before,
            limit,
        )

    # -------------------------------------------------------------- housekeeping

    async def purge_usage_events(self, before: float, limit: int) -> int:
        # Oldest ids first: events are appended in time order, so the old ones are found
        # at the start of the table without an index on `at` alone (which every insert
        # would pay for).
        return await self._run(
            self._change,
            "DELETE FROM usage_events WHERE id IN "
            "(SELECT id FROM usage_events WHERE at < ? ORDER BY id LIMIT ?)",
            before,
            limit,
        )

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
            f"DELETE FROM usage_hourly WHERE hour < strftime('%Y-%m-%dT%H', ? - {HOURLY_KEPT_SECONDS}, 'unixepoch')",
            """DELETE FROM refresh_tokens WHERE family_expires_at <= ?1 OR family_id IN (
                SELECT family_id FROM refresh_families WHERE revoked_at > 0 OR expires_at <= ?1
            )""",
        )
        with self._write() as conn:
            return sum(conn.execute(sql, (now,)).rowcount for sql in statements)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction. IMMEDIATE takes the write lock up front (waiting up to the
    busy timeout), so the reads inside see the latest commit of every process and a
    deferred read-to-write upgrade can never fail with SQLITE_BUSY."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        # Inside the try: a COMMIT that fails (disk full, I/O error, a deferred
        # constraint) must roll back too, or the open transaction would be committed
        # half-written by whatever runs next on this connection.
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back by itself already (e.g. disk full).
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error is the one to report; the connection is reset
        raise


def _create_private_file(path: str) -> None:
    """Create the database file owner-only before SQLite does (it would use 0644); the
    -wal and -shm files inherit the database file's mode."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # an existing file, or another process created it just now
    os.close(fd)


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching to WAL needs a moment of exclusive access, which another process
    # opening the same new file can hold; WAL is persistent, so the first winner
    # settles it for all.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        if mode.lower() != "wal":
            raise StorageError(f"sqlite: cannot enable WAL mode (journal_mode is {mode})")
        return
