"""Usage analytics on SQLite: events, daily and hourly aggregates, who used what."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from .schema import HIST_COLUMNS

if TYPE_CHECKING:
    from .store import SqliteStorage


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

    async def record_usage(self, events: list[UsageEvent]) -> None:
        if events:
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
