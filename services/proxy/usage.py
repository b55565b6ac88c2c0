"""UsageRecorder: who used which tool, recorded off the request path. Events go to a
bounded in-memory queue that a background task flushes to storage in batches; a full
queue drops events and counts them rather than slow or fail a request.

One event never costs the others: its strings are made storable on the way in (record),
and a batch that storage refuses for its data is written again event by event so that
only the bad one is dropped. A storage outage (StorageUnavailable) is not the events'
fault: they go back to the front of the queue, within its bound, for the next flush."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import deque

from services.common.metrics import Metrics
from services.common.validation import scrub_text
from storage.base import StorageUnavailable, UsageEvent, UsageStore

log = logging.getLogger("gateway.usage")

QUEUE_LIMIT = 50000
BATCH_SIZE = 500
FLUSH_INTERVAL = 1.0
# Longest stored string per field: tool names, resource URIs and prompt names come from
# the client's JSON-RPC body, the outcome from the upstream's error code.
TEXT_LIMITS = {"target": 512, "method": 128, "outcome": 64, "era": 16, "client_id": 2000,
               "user_email": 320, "user_sub": 255, "server_id": 64}


def storable(event: UsageEvent) -> UsageEvent:
    """`event` with every string valid UTF-8 text of bounded length and every number finite
    (a copy only when something had to change: this runs on the proxy's hot path)."""
    changes = {}
    for name, limit in TEXT_LIMITS.items():
        value = getattr(event, name)
        if not isinstance(value, str):
            changes[name] = str(value)[:limit]
            continue
        clean = scrub_text(value, limit)
        if clean is not value:
            changes[name] = clean
    if not math.isfinite(event.latency_ms):
        changes["latency_ms"] = 0.0
    return dataclasses.replace(event, **changes) if changes else event


class UsageRecorder:
    def __init__(self, usage: UsageStore, metrics: Metrics):
        self._usage = usage
        self._metrics = metrics
        self._queue: deque[UsageEvent] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._outage = False  # logged once when storage goes away, once when it is back

    def record(self, event: UsageEvent) -> None:
        if len(self._queue) >= QUEUE_LIMIT:
            self._metrics.inc("usage_events_dropped_total")
            return
        self._queue.append(storable(event))
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
        """Write what is queued; stops early (events kept) while storage is unavailable."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH_SIZE, len(self._queue)))]
            try:
                await self._usage.record_usage(batch)
            except StorageUnavailable as exc:
                self._requeue(batch, exc)
                return
            except Exception as exc:  # the batch holds an event storage cannot take
                log.warning("usage batch of %d refused (%s: %s); recording its events one by one",
                            len(batch), type(exc).__name__, exc)
                if not await self._record_one_by_one(batch):
                    return
                continue
            self._recorded(len(batch))

    async def _record_one_by_one(self, batch: list[UsageEvent]) -> bool:
        """Write each event alone, dropping only those storage refuses; False when storage
        became unavailable on the way (the rest is back in the queue)."""
        for index, event in enumerate(batch):
            try:
                await self._usage.record_usage([event])
            except StorageUnavailable as exc:
                self._requeue(batch[index:], exc)
                return False
            except Exception as exc:
                log.warning("dropped one usage event of server %s, method %s (%s: %s)",
                            event.server_id, event.method, type(exc).__name__, exc)
                self._metrics.inc("usage_events_dropped_total")
                continue
            self._recorded(1)
        return True

    def _recorded(self, count: int) -> None:
        self._metrics.inc("usage_events_recorded_total", count)
        if self._outage:
            self._outage = False
            log.info("usage events are being recorded again")

    def _requeue(self, events: list[UsageEvent], exc: Exception) -> None:
        """Put `events` back in front (they are the oldest); past the queue's bound the
        newest are dropped and counted, as record() does when the queue is full."""
        if not self._outage:
            self._outage = True
            log.warning("storage unavailable, %d usage events kept for the next flush: %s",
                        len(events) + len(self._queue), exc)
        self._queue.extendleft(reversed(events))
        overflow = len(self._queue) - QUEUE_LIMIT
        for _ in range(max(overflow, 0)):
            self._queue.pop()
        if overflow > 0:
            self._metrics.inc("usage_events_dropped_total", overflow)

    async def _run(self) -> None:
        try:
            await self._usage.prepare_recording()
        except Exception as exc:  # the first batch tries again (and says what fails)
            log.warning("usage: could not prepare recording: %s: %s", type(exc).__name__, exc)
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), FLUSH_INTERVAL)
            except TimeoutError:
                pass
            self._wakeup.clear()
            # The backlog a round found, then what it left: sampled once a round, not per event.
            self._metrics.gauge_set("usage_queue_depth", len(self._queue))
            try:
                await self.flush()
            except Exception:  # never let one bad round end the recorder
                log.exception("usage flush failed")
            self._metrics.gauge_set("usage_queue_depth", len(self._queue))
