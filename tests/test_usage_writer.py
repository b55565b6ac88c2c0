"""The SQLite usage writer process (storage/sqlite/usage.py, UsageWriterProcess): batches
of a file database are committed by a child process, and no batch is lost or half-told
when that child is killed, signalled, or refuses a batch."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

import pytest

from storage import SqliteStorage, StorageError, UsageEvent
from storage.sqlite import usage as usage_module

T0 = 1_800_000_000.0


def event(number: int, target: str = "search") -> UsageEvent:
    return UsageEvent(at=T0 + number, server_id="srv_writer", user_sub="sub-1", user_email="a@example.com",
                      client_id="client-1", method="tools/call", target=target, outcome="ok",
                      latency_ms=1.5, bytes_in=10, bytes_out=20, era="2025")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


async def recorded(storage: SqliteStorage) -> list[float]:
    return sorted(e.at for e in await storage.usage.recent_usage("srv_writer", T0 + 10_000, 1000))


def run(tmp_path: Path, body) -> None:
    async def main():
        storage = SqliteStorage(str(tmp_path / "gw.db"))
        await storage.open()
        try:
            await body(storage)
        finally:
            await storage.close()

    asyncio.run(main())


def test_usage_batches_are_committed_by_a_child_process(tmp_path: Path) -> None:
    async def body(storage: SqliteStorage) -> None:
        await storage.usage.record_usage([event(1), event(2)])
        pid = storage.usage.writer.pid
        assert pid is not None and pid != os.getpid()
        assert parent_of(pid) == os.getpid()
        # Acknowledged after the commit: this process reads the batch at once.
        assert await recorded(storage) == [T0 + 1, T0 + 2]
        assert [row.calls for row in await storage.usage.usage_rollup("srv_writer", "2000-01-01")] == [2]

    run(tmp_path, body)


def test_a_killed_writer_process_is_replaced_and_no_event_is_lost(tmp_path: Path) -> None:
    async def body(storage: SqliteStorage) -> None:
        writer = storage.usage.writer
        await storage.usage.record_usage([event(1)])
        first = writer.pid
        os.kill(first, signal.SIGKILL)
        writer._proc.wait()
        await storage.usage.record_usage([event(2)])
        assert writer.pid not in (None, first)
        assert await recorded(storage) == [T0 + 1, T0 + 2]

    run(tmp_path, body)


def test_the_writer_process_outlives_sigterm(tmp_path: Path) -> None:
    # A service stop signals the whole process group while the gateway still drains its
    # last usage batch through the child.
    async def body(storage: SqliteStorage) -> None:
        writer = storage.usage.writer
        await storage.usage.record_usage([event(1)])
        pid = writer.pid
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        await storage.usage.record_usage([event(2)])
        assert writer.pid == pid and writer._proc.poll() is None
        assert await recorded(storage) == [T0 + 1, T0 + 2]

    run(tmp_path, body)


def test_a_batch_the_child_refuses_is_a_storage_error_and_the_child_goes_on(tmp_path: Path) -> None:
    async def body(storage: SqliteStorage) -> None:
        writer = storage.usage.writer
        await storage.usage.record_usage([event(1)])
        pid = writer.pid
        with pytest.raises(StorageError) as refused:  # a lone surrogate cannot be stored as UTF-8
            await storage.usage.record_usage([event(2, target="bad \udc80")])
        assert type(refused.value) is StorageError  # not StorageUnavailable: the recorder retries one by one
        await storage.usage.record_usage([event(3)])
        assert writer.pid == pid
        assert await recorded(storage) == [T0 + 1, T0 + 3]

    run(tmp_path, body)


def test_the_writer_process_ends_with_its_parent_side(tmp_path: Path) -> None:
    procs = []

    async def body(storage: SqliteStorage) -> None:
        await storage.usage.record_usage([event(1)])
        procs.append(storage.usage.writer._proc)

    run(tmp_path, body)
    gc.collect()  # the store is gone: its end of the pipes closes, the child reads EOF
    assert procs[0].wait(timeout=30) == 0


def test_a_memory_database_writes_in_process() -> None:
    async def main() -> None:
        storage = SqliteStorage(":memory:")
        await storage.open()
        try:
            assert storage.usage.writer is None
            await storage.usage.record_usage([event(1)])
            assert await recorded(storage) == [T0 + 1]
        finally:
            await storage.close()

    asyncio.run(main())


def test_without_a_writer_process_usage_is_written_in_process(tmp_path: Path, monkeypatch, caplog) -> None:
    # A host where no process can be started (no such interpreter here): nothing is lost.
    monkeypatch.setattr(usage_module, "PYTHON", str(tmp_path / "no-such-python"))

    async def body(storage: SqliteStorage) -> None:
        await storage.usage.record_usage([event(1)])
        assert storage.usage.writer is None
        await storage.usage.record_usage([event(2)])
        assert await recorded(storage) == [T0 + 1, T0 + 2]

    run(tmp_path, body)
    assert "this process writes the usage events itself" in caplog.text
