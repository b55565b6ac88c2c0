"""SQLite connections: the budgets and the error codes that mean "unavailable", one
connection per thread (`_Slot`), write transactions, the private file in WAL mode."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from ..base import (
    StorageError,
)

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

T = TypeVar("T")


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
