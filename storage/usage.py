"""Usage analytics behind their own small interface: the records of one proxied call and
of its daily / hourly sums, the fixed latency histogram, and `UsageStore`, which every
backend offers as `Storage.usage`. Writers: `services.usage.UsageRecorder`; readers: the
usage reports; housekeeping: `Services.purge_old_usage`."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from datetime import UTC, datetime

# Hourly aggregates serve the last-24-hours view only: both backends keep them this long.
HOURLY_KEPT_SECONDS = 3 * 86400

@dataclass(frozen=True)
class UsageEvent:
    at: float
    server_id: str
    user_sub: str
    user_email: str
    client_id: str
    method: str
    target: str  # tool name, resource URI or prompt name
    outcome: str  # "ok", "denied:<reason>" (tool policy) or the JSON-RPC error code / HTTP status as text
    latency_ms: float
    bytes_in: int
    bytes_out: int
    era: str  # "2025" | "2026"


@dataclass(frozen=True)
class UsageAggregate:
    day: str  # YYYY-MM-DD (UTC)
    server_id: str
    target: str
    user_sub: str
    calls: int
    errors: int
    latency_ms_sum: float
    latency_ms_max: float
    latency_hist: tuple[int, ...] = ()  # calls per latency bucket (see latency_bucket)
    denied: int = 0  # calls the tool policy refused (outcome "denied:<reason>"), not errors


@dataclass(frozen=True)
class UsageRollup:
    """Usage of one target by one user over a period, summed (the usage page's rows)."""

    target: str
    user_sub: str
    calls: int
    errors: int
    latency_ms_sum: float
    latency_ms_max: float
    latency_hist: tuple[int, ...]
    denied: int = 0


@dataclass(frozen=True)
class UsagePeriod:
    """Calls in one day (YYYY-MM-DD) or one hour (YYYY-MM-DDTHH), for the chart."""

    period: str
    calls: int
    errors: int


@dataclass(frozen=True)
class ServerUser:
    """Someone who has used a server through the gateway, and when."""

    server_id: str
    user_sub: str
    user_email: str
    first_used_at: float
    last_used_at: float


# Latency histogram: fixed log-spaced buckets, five per decade. Bucket 0 holds calls of at
# most 0.1 ms, bucket i (1..30) calls in (10**((i-1)/5 - 1), 10**(i/5 - 1)] ms (up to
# 100 s), the last bucket everything slower. Fixed so that histograms of any days, users
# and tools add up bucket by bucket.
LATENCY_BUCKETS = 32


def latency_bucket(latency_ms: float) -> int:
    if latency_ms <= 0.1:
        return 0
    return min(LATENCY_BUCKETS - 1, max(1, math.ceil((math.log10(latency_ms) + 1) * 5 - 1e-9)))


def summarize_batch(events) -> tuple[dict, dict, dict]:
    """A batch of UsageEvents pre-summed per aggregate row, so that N events cost one write
    per row: (daily, hourly, users). daily/hourly map (server, period, target, sub) to
    [calls, errors, latency sum, latency max, histogram, denied] (a call the tool policy
    refused is denied, not an error); users map (server, sub) to
    [latest e-mail, first seen, last seen]. Both backends store exactly these sums."""
    daily: dict[tuple[str, str, str, str], list] = {}
    hourly: dict[tuple[str, str, str, str], list] = {}
    users: dict[tuple[str, str], list] = {}
    periods: dict[int, tuple[str, str]] = {}  # hour since the epoch -> (day, hour): one strftime each
    for event in events:
        hour = int(event.at // 3600)
        names = periods.get(hour)
        if names is None:
            moment = datetime.fromtimestamp(hour * 3600, tz=UTC)
            names = periods[hour] = (moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m-%dT%H"))
        denied = event.outcome.startswith("denied:")
        error = event.outcome != "ok" and not denied
        latency = event.latency_ms
        bucket = latency_bucket(latency)
        for sums, period in ((daily, names[0]), (hourly, names[1])):
            key = (event.server_id, period, event.target, event.user_sub)
            row = sums.get(key)
            if row is None:
                row = sums[key] = [0, 0, 0.0, 0.0, [0] * LATENCY_BUCKETS, 0]
            row[0] += 1
            row[1] += error
            row[5] += denied
            row[2] += latency
            if latency > row[3]:
                row[3] = latency
            row[4][bucket] += 1
        seen = users.get((event.server_id, event.user_sub))
        if seen is None:
            users[(event.server_id, event.user_sub)] = [event.user_email, event.at, event.at]
        else:
            if event.at >= seen[2]:
                seen[0], seen[2] = event.user_email or seen[0], event.at
            seen[1] = min(seen[1], event.at)
    return daily, hourly, users


def latency_bucket_bounds(index: int) -> tuple[float, float]:
    """(lower, upper] in ms of a bucket; the last one's upper bound is infinite."""
    lower = 0.0 if index == 0 else 10 ** ((index - 1) / 5 - 1)
    upper = math.inf if index >= LATENCY_BUCKETS - 1 else 10 ** (index / 5 - 1)
    return lower, upper


class UsageStore(abc.ABC):
    """Usage events and their aggregates. All methods are async; a backend's UsageStore
    shares its Storage's connections and errors (StorageError, StorageUnavailable)."""

    @abc.abstractmethod
    async def record_usage(self, events: list[UsageEvent]) -> None:
        """Append a batch of events and add them to the daily aggregates."""

    async def prepare_recording(self) -> None:
        """Called once by the serving process's recorder before its first batch: what
        record_usage needs that is better started ahead than under the first calls."""
        return None  # nothing, unless a backend says otherwise

    @abc.abstractmethod
    async def usage_aggregates(self, server_id: str, since_day: str) -> list[UsageAggregate]: ...

    @abc.abstractmethod
    async def usage_rollup(self, server_id: str, since_day: str) -> list[UsageRollup]:
        """The daily aggregates from `since_day` on, summed per (target, user): calls,
        errors, latency sum, max and histogram. Reads aggregates only, never events."""

    @abc.abstractmethod
    async def usage_per_day(self, server_id: str, since_day: str) -> list[UsagePeriod]:
        """Calls and errors per UTC day from `since_day` on (days without calls absent)."""

    @abc.abstractmethod
    async def usage_rollup_hours(self, server_id: str, since_hour: str) -> list[UsageRollup]:
        """Like usage_rollup, from the hourly aggregates of UTC hours 'YYYY-MM-DDTHH' at or
        after `since_hour` (the last-24-hours view; hourly rows are kept a few days)."""

    @abc.abstractmethod
    async def usage_per_hour(self, server_id: str, since_hour: str) -> list[UsagePeriod]:
        """Calls and errors per UTC hour (period 'YYYY-MM-DDTHH') from `since_hour` on."""

    @abc.abstractmethod
    async def server_users(self, server_id: str) -> list[ServerUser]:
        """Everyone who has used the server, most recent first (kept by record_usage)."""

    @abc.abstractmethod
    async def recent_usage(self, server_id: str, before: float, limit: int) -> list[UsageEvent]:
        """Newest first, strictly older than `before` (pagination cursor)."""

    @abc.abstractmethod
    async def purge_usage_events(self, before: float, limit: int) -> int:
        """Delete up to `limit` usage events older than `before`, oldest first; returns how
        many. The daily aggregates and the who-used-what rows stay: retention only thins
        out the per-call history."""

