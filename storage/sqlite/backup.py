"""An online copy of the SQLite database (the sqlite3 backup API) while the gateway serves,
and the read-only facts about a database file that a backup and `gateway.py doctor` report."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from urllib.parse import quote

from ..base import StorageError
from .connection import MEMORY
from .schema import MIGRATIONS

PAGES_PER_STEP = 256  # 1 MiB at the default 4 KiB page: one step is a few milliseconds
STEP_PAUSE = 0.002  # seconds between steps: the serving gateway keeps the disk and the CPU
OPEN_TIMEOUT = 5.0  # seconds to wait for a lock when opening (WAL recovery, a checkpoint)


class BackupError(StorageError):
    """No copy was made; the message says why and what to do."""


@dataclass(frozen=True)
class BackupResult:
    path: str
    bytes: int
    pages: int
    schema_version: int
    seconds: float
    integrity: str = "ok"

    def as_dict(self) -> dict:
        return asdict(self)


def _read_only(path: str) -> sqlite3.Connection:
    """A connection that can never create or change the file (mode=ro)."""
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=OPEN_TIMEOUT,
                           check_same_thread=False)


def schema_version(path: str) -> int | None:
    """The schema version (PRAGMA user_version) of the database at `path`, read without
    creating, migrating or writing anything; None when there is no file yet."""
    if path == MEMORY or not os.path.exists(path):
        return None
    try:
        conn = _read_only(path)
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"sqlite: cannot read {path}: {exc}") from None


LATEST_SCHEMA = len(MIGRATIONS)


def backup_database(source: str, target: str, *, force: bool = False, pages: int = PAGES_PER_STEP,
                    pause: float = STEP_PAUSE,
                    on_step: Callable[[int, int], None] | None = None) -> BackupResult:
    """Copy the database at `source` to the new file `target` while other processes write.

    The copy is the database as it was when the copy began: in WAL mode (the gateway's)
    one read transaction is held across the steps, which never blocks a writer there and
    keeps other processes' commits from restarting the copy. It is written in steps of
    `pages` pages with `pause` seconds between them, to a private temp file (mode 0600)
    beside `target`, switched to a single-file journal, checked with PRAGMA
    integrity_check, then moved into place; `target` is replaced only with `force`.
    `on_step(remaining, total)` is called after each step (tests use it).
    """
    started = time.monotonic()
    source, target = _checked_paths(source, target, force)
    directory, name = os.path.split(target)
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)  # mode 0600
    os.close(fd)
    try:
        _copy(source, temp, pages, pause, on_step)
        integrity, version, page_count = _verify(temp)
        if integrity != "ok":
            raise BackupError(f"the copy failed its integrity check ({integrity}); nothing was written "
                              f"to {target}; check the source with PRAGMA integrity_check")
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        _place(temp, target, force)
    finally:
        for leftover in (temp, temp + "-journal", temp + "-wal", temp + "-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    _fsync_directory(directory)
    return BackupResult(target, os.path.getsize(target), page_count, version,
                        round(time.monotonic() - started, 3), integrity)


def _checked_paths(source: str, target: str, force: bool) -> tuple[str, str]:
    if source == MEMORY:
        raise BackupError("MCPGW_STORAGE names an in-memory database: there is nothing to back up")
    source, target = os.path.abspath(source), os.path.abspath(target)
    if not os.path.isfile(source):
        raise BackupError(f"there is no database at {source} (has the gateway started with this "
                          "MCPGW_STORAGE?)")
    if os.path.isdir(target):
        raise BackupError(f"{target} is a directory: give the backup's file name")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise BackupError(f"the directory {directory} does not exist")
    if os.path.lexists(target):
        if os.path.exists(target) and os.path.samefile(source, target):
            raise BackupError(f"{target} is the live database itself")
        if not force:
            raise BackupError(f"{target} exists; choose another name or pass --force to replace it")
    return source, target


def _copy(source: str, temp: str, pages: int, pause: float,
          on_step: Callable[[int, int], None] | None) -> None:
    try:
        src = _read_only(source)
    except sqlite3.Error as exc:
        raise BackupError(f"sqlite: cannot open {source}: {exc}") from None
    dest = sqlite3.connect(temp, isolation_level=None)
    try:
        if src.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            # One snapshot for the whole copy: a reader never blocks a WAL writer, and
            # holding it means the pages of later commits are simply not seen.
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_schema").fetchone()

        def progress(_status: int, remaining: int, total: int) -> None:
            if on_step is not None:
                on_step(remaining, total)
            if remaining and pause > 0:
                time.sleep(pause)

        src.backup(dest, pages=pages, progress=progress)
        # A self-contained single file: no -wal beside it to lose in a copy. The gateway
        # turns WAL on again when it opens a restored file.
        dest.execute("PRAGMA journal_mode = DELETE").fetchone()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"sqlite: copying {source} failed: {exc}") from None
    finally:
        dest.close()
        src.close()


def _verify(path: str) -> tuple[str, int, int]:
    """(integrity_check's answer, schema version, page count) of the copy, read afresh."""
    conn = _read_only(path)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        integrity = "ok" if rows == [("ok",)] else "; ".join(r[0] for r in rows[:5])
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        return integrity, version, page_count
    except sqlite3.DatabaseError as exc:
        return f"unreadable: {exc}", 0, 0
    finally:
        conn.close()


def _place(temp: str, target: str, force: bool) -> None:
    if force:
        os.replace(temp, target)
        return
    try:
        # link() never replaces: a file that appeared meanwhile is kept, not clobbered.
        os.link(temp, target)
    except FileExistsError:
        raise BackupError(f"{target} exists; choose another name or pass --force to replace it") from None


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
