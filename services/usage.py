"""UsageRecorder: who used which tool, recorded off the request path. Events go to a
bounded in-memory queue that a background task flushes to storage in batches; a full
queue drops events and counts them rather than slow or fail a request."""

from __future__ import annotations

import asyncio
import logging

from services.metrics import Metrics
from storage.base import Storage, UsageEvent

log = logging.getLogger("gateway.usage")

QUEUE_LIMIT = 50000
BATCH_SIZE = 500
FLUSH_INTERVAL = 1.0


class UsageRecorder:
    def __init__(self, storage: Storage, metrics: Metrics):
        self._storage = storage
        self._metrics = metrics
        self._queue: list[UsageEvent] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def record(self, event: UsageEvent) -> None:
        if len(self._queue) >= QUEUE_LIMIT:
            self._metrics.inc("usage_events_dropped_total")
            return
        self._queue.append(event)
        if len(self._queue) >= BATCH_SIZE:
            self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:BATCH_SIZE], self._queue[BATCH_SIZE:]
            try:
                await self._storage.record_usage(batch)
                self._metrics.inc("usage_events_recorded_total", len(batch))
            except Exception:  # storage trouble loses a batch, never a request
                log.exception("could not record %d usage events", len(batch))
                self._metrics.inc("usage_events_dropped_total", len(batch))

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), FLUSH_INTERVAL)
            except TimeoutError:
                pass
            self._wakeup.clear()
            await self.flush()
