"""Usage analytics on SQLite: events, daily and hourly aggregates, who used what; batches
of a file database are written by a child process (`UsageWriterProcess`)."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from ..base import StorageError, StorageUnavailable
from ..usage import (
    HOURLY_KEPT_SECONDS,
    ServerUser,
    UsageAggregate,
    UsageEvent,
    UsagePeriod,
    UsageRollup,
    UsageStore,
    summarize_batch,
)
from .codecs import SERVER_USERS, USAGE_EVENTS
from .connection import MEMORY, RETRY_AFTER, WRITE_BUDGET
from .schema import HIST_COLUMNS

if TYPE_CHECKING:
    from .store import SqliteStorage

log = logging.getLogger("gateway.usage")


def _aggregate_upsert(table: str, period: str) -> str:
    """Add pre-summed rows into usage_daily or usage_hourly (histograms add up too)."""
    columns = ("server_id", period, "target", "user_sub", "calls", "errors",
               "latency_ms_sum", "latency_ms_max", *HIST_COLUMNS, "denied")
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT (server_id, {period}, target, user_sub) DO UPDATE SET "
        "calls = calls + excluded.calls, errors = errors + excluded.errors, denied = denied + excluded.denied, "
        "latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum, "
        "latency_ms_max = max(latency_ms_max, excluded.latency_ms_max), "
        + ", ".join(f"{h} = {h} + excluded.{h}" for h in HIST_COLUMNS)
    )


# Deletes the hourly aggregates that are too old to serve the 24-hour view (a purge_expired step).
PURGE_OLD_HOURS = f"DELETE FROM usage_hourly WHERE hour < strftime('%Y-%m-%dT%H', ? - {HOURLY_KEPT_SECONDS}, 'unixepoch')"


class SqliteUsage(UsageStore):
    """`UsageStore` on the tables usage_events, usage_daily, usage_hourly and usage_users,
    through the connections of its `SqliteStorage`."""

    def __init__(self, store: SqliteStorage) -> None:
        self._store = store
        # A file database: batches go to a child process (started at the first batch), so
        # the serving process spends ~1 µs per event instead of SQLite's work and the GIL
        # hand-offs of a writer thread beside its event loop. None: written here.
        self.writer = None if store.path == MEMORY else UsageWriterProcess(store.path)

    async def prepare_recording(self) -> None:
        # The writer process is started now, not by the first batch: its start-up (a Python
        # interpreter, ~0.1 s of CPU) does not compete with the first calls.
        if self.writer is not None:
            await self.writer.start()

    async def record_usage(self, events: list[UsageEvent]) -> None:
        if not events:
            return
        if self.writer is None:
            await self._store._run(self._record_usage, list(events))
            return
        if self._store._writer is None:
            raise StorageError("sqlite storage is not open")
        try:
            await self.writer.record(list(events))
        except WriterUnavailable as exc:
            # No process can be started here (a sandbox without exec, no PIDs left): usage is
            # still recorded, by this process as before.
            log.warning("usage: %s; this process writes the usage events itself", exc)
            self.writer = None
            await self._store._run(self._record_usage, list(events))

    def _record_usage(self, events: list[UsageEvent]) -> None:
        daily, hourly, users = summarize_batch(events)
        with self._store._write() as conn:
            conn.executemany(USAGE_EVENTS.insert, [USAGE_EVENTS.encode(e) for e in events])
            for table, period, sums in (("usage_daily", "day", daily), ("usage_hourly", "hour", hourly)):
                conn.executemany(_aggregate_upsert(table, period),
                                 [(*key, *totals[:4], *totals[4], totals[5]) for key, totals in sums.items()])
            conn.executemany(
                f"{SERVER_USERS.insert} ON CONFLICT (server_id, user_sub) DO UPDATE SET "
                "user_email = CASE WHEN excluded.last_used_at >= last_used_at AND excluded.user_email != '' "
                "THEN excluded.user_email ELSE user_email END, "
                "first_used_at = min(first_used_at, excluded.first_used_at), "
                "last_used_at = max(last_used_at, excluded.last_used_at)",
                [(server, sub, *seen) for (server, sub), seen in users.items()],
            )


    async def usage_aggregates(self, server_id: str, since_day: str) -> list[UsageAggregate]:
        rows = await self._store._read(
            self._store._select,
            "SELECT day, server_id, target, user_sub, calls, errors, latency_ms_sum, latency_ms_max, "
            f"{', '.join(HIST_COLUMNS)}, denied FROM usage_daily WHERE server_id = ? AND day >= ? "
            "ORDER BY day, target, user_sub",
            server_id,
            since_day,
        )
        return [UsageAggregate(*row[:8], tuple(row[8:-1]), row[-1]) for row in rows]

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
        rows = await self._store._read(
            self._store._select,
            "SELECT target, user_sub, sum(calls), sum(errors), sum(latency_ms_sum), max(latency_ms_max), "
            f"{sums}, sum(denied) FROM {table} WHERE server_id = ? AND {period} >= ? "
            "GROUP BY target, user_sub ORDER BY target, user_sub",
            server_id,
            since,
        )
        return [UsageRollup(*row[:6], tuple(row[6:-1]), row[-1]) for row in rows]

    async def _periods(self, table: str, period: str, server_id: str, since: str) -> list[UsagePeriod]:
        rows = await self._store._read(
            self._store._select,
            f"SELECT {period}, sum(calls), sum(errors) FROM {table} WHERE server_id = ? AND {period} >= ? "
            f"GROUP BY {period} ORDER BY {period}",
            server_id,
            since,
        )
        return [UsagePeriod(*row) for row in rows]

    async def server_users(self, server_id: str) -> list[ServerUser]:
        return await self._store._read(
            self._store._all, SERVER_USERS, "server_id = ? ORDER BY last_used_at DESC, user_sub", server_id
        )

    async def recent_usage(self, server_id: str, before: float, limit: int) -> list[UsageEvent]:
        return await self._store._read(
            self._store._all,
            USAGE_EVENTS,
            "server_id = ? AND at < ? ORDER BY at DESC, id DESC LIMIT ?",
            server_id,
            before,
            limit,
        )


    async def purge_usage_events(self, before: float, limit: int) -> int:
        # Oldest ids first: events are appended in time order, so the old ones are found
        # at the start of the table without an index on `at` alone (which every insert
        # would pay for).
        return await self._store._run(
            self._store._change,
            "DELETE FROM usage_events WHERE id IN "
            "(SELECT id FROM usage_events WHERE at < ? ORDER BY id LIMIT ?)",
            before,
            limit,
        )


# ----------------------------------------------------------------- the writer process

# The child's own write budget bounds a batch (WRITE_BUDGET, as in this process); past this
# the child is taken for hung, killed, and the batch goes back to the recorder's queue.
WRITER_REPLY_TIMEOUT = WRITE_BUDGET + 10.0
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from storage.sqlite.usage import writer_main; writer_main()"
_ROOT = str(Path(__file__).resolve().parents[2])
PYTHON = sys.executable  # the child's interpreter


class WriterUnavailable(StorageError):
    """The writer process cannot be started at all."""


class UsageWriterProcess:
    """record_usage batches written by a child process on its own SqliteStorage of the same
    file. The batch is acknowledged after its commit, so the recorder's guarantees hold as
    they are: a batch is recorded, refused for its data (StorageError: written again event
    by event) or not written (StorageUnavailable: requeued), also when the child dies or
    hangs (it is then restarted at the next batch). The child ignores SIGTERM/SIGINT (a
    service stop signals the whole group while the gateway drains its last batch) and ends
    when this process's end of its pipe closes: at exit, or when this object is collected."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid: int | None = None  # the child's
        self._proc: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._receive: Connection | None = None
        self._owner = 0  # the process that started the child (a fork must start its own)
        # One thread: batches are exchanged one at a time, blocking here, not on the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-writer")
        self._finalizer: weakref.finalize | None = None

    async def start(self) -> None:
        """Start the child ahead of the first batch (a failure is the first batch's to report)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._ensure_started)

    def _ensure_started(self) -> str | None:
        """In the executor's thread: the child running, else why it cannot start."""
        if self._owner != os.getpid() or self._proc is None or self._proc.poll() is not None:
            try:
                self._start()
            except OSError as exc:
                return f"cannot start the usage writer process ({type(exc).__name__}: {exc})"
        return None

    async def record(self, events: list[UsageEvent]) -> None:
        reply = await asyncio.get_running_loop().run_in_executor(self._executor, self._exchange, events)
        if reply[0] == "no process":
            raise WriterUnavailable(reply[1])
        if reply[0] == "unavailable":
            raise StorageUnavailable(reply[1], reply[2])
        if reply[0] != "ok":
            raise StorageError(reply[1])

    def _exchange(self, events: list[UsageEvent]) -> tuple:
        failure = self._ensure_started()
        if failure is not None:
            return ("no process", failure)
        try:
            self._send.send_bytes(pickle.dumps(events, pickle.HIGHEST_PROTOCOL))
            if not self._receive.poll(WRITER_REPLY_TIMEOUT):
                raise TimeoutError("no answer")
            return pickle.loads(self._receive.recv_bytes())
        except (OSError, EOFError, TimeoutError, pickle.UnpicklingError) as exc:
            self._stop()
            return ("unavailable", f"sqlite: the usage writer process failed ({type(exc).__name__}: {exc})",
                    RETRY_AFTER)

    def _start(self) -> None:
        if self._owner == os.getpid():
            self._stop()
        else:  # a fork's inherited copy: the child belongs to the parent process
            self._proc = self._send = self._receive = None
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [PYTHON, "-c", _CHILD, _ROOT, str(child_reads), str(child_writes), self.path],
                pass_fds=(child_reads, child_writes),  # and no other descriptor
                # Its failures reach the log through this process (a reply's text, or the
                # pipe's end), never as loose lines that would break the JSON log format.
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (parent_writes, parent_reads):
                os.close(fd)
            raise
        finally:
            os.close(child_reads)
            os.close(child_writes)
        self._send, self._receive = Connection(parent_writes, readable=False), Connection(parent_reads, writable=False)
        self._owner, self.pid = os.getpid(), self._proc.pid
        self._finalizer = weakref.finalize(self, _close_pipes, self._send, self._receive)

    def _stop(self) -> None:
        """Close the pipes (the child ends at EOF) and reap the child; kill it if it hangs."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        proc, self._proc = self._proc, None
        self._send = self._receive = None
        self.pid = None
        if proc is not None and self._owner == os.getpid():
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _close_pipes(*connections: Connection) -> None:
    for connection in connections:
        try:
            connection.close()
        except OSError:
            pass


def writer_main() -> None:
    """The child: argv is (root, read fd, write fd, database path); one reply per batch."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: where it shares a core with the serving process, the requests come
    # first (its bursts showed at the serving process's p99 latency).
    try:
        os.nice(10)
    except OSError:
        pass
    receive = Connection(int(sys.argv[2]), writable=False)
    send = Connection(int(sys.argv[3]), readable=False)
    asyncio.run(_serve(receive, send, sys.argv[4]))


async def _serve(receive: Connection, send: Connection, path: str) -> None:
    from .store import SqliteStorage

    store = SqliteStorage(path)
    store.usage.writer = None  # this process writes itself
    try:
        while True:
            try:
                events = pickle.loads(receive.recv_bytes())
            except EOFError:
                return
            try:
                await store.open()  # nothing to do once open; retried while it fails
                await store.usage.record_usage(events)
                reply = ("ok",)
            except StorageUnavailable as exc:
                reply = ("unavailable", str(exc), exc.retry_after)
            except Exception as exc:  # noqa: BLE001 - the batch's fault: the recorder retries event by event
                reply = ("error", f"{type(exc).__name__}: {exc}")
            send.send_bytes(pickle.dumps(reply))
    finally:
        await store.close()
