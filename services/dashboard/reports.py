"""Usage reports of one server (24 hours or N days): totals, chart geometry, top tools, user x tool
latency from the aggregates' fixed histograms, sessions, recent calls, CSV; cost independent of history."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from storage.base import (
    LATENCY_BUCKETS,
    Storage,
    UsageEvent,
    UsagePeriod,
    latency_bucket_bounds,
)

RANGES = {"24h": 1, "7d": 7, "30d": 30}
MAX_DAYS = 366
RECENT_PAGE = 50
TABLE_LIMIT = 500
TOP_TOOLS = 10
CHART_WIDTH = 720
CHART_HEIGHT = 160
NO_TARGET = "(no tool: initialize, lists, ping …)"
DENIED = "denied:"  # the outcome prefix of a tools/call the tool policy refused


def parse_range(value: str | None) -> int:
    """'24h' | '7d' | '30d' | a number of days -> days (1 means the last 24 hours)."""
    if not value:
        return 7
    if value in RANGES:
        return RANGES[value]
    text = value[:-1] if value.endswith("d") else value
    if not text.isdigit() or not 1 <= int(text) <= MAX_DAYS:
        raise ValueError(f"range must be 24h, 7d, 30d or 1 to {MAX_DAYS} days")
    return int(text)


def range_label(days: int) -> str:
    return "last 24 hours" if days == 1 else f"last {days} days"


def percentile(hist: tuple[int, ...] | list[int], q: float, latency_max: float) -> float | None:
    """The q-quantile of a bucketed latency histogram: the bucket holding it, interpolated
    geometrically inside the bucket, never above the largest latency seen."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(hist):
        if count and seen + count >= rank:
            lower, upper = latency_bucket_bounds(index)
            upper = min(upper, latency_max) if latency_max > 0 else upper
            if math.isinf(upper):
                return latency_max
            fraction = (rank - seen) / count
            if lower <= 0 or upper <= lower:
                value = upper * fraction if lower <= 0 else upper
            else:
                value = lower * (upper / lower) ** fraction
            return round(min(value, latency_max) if latency_max > 0 else value, 2)
        seen += count
    return latency_max


@dataclass
class Row:
    target: str
    user_sub: str
    user_email: str
    calls: int
    errors: int
    latency_ms_sum: float
    latency_ms_max: float
    hist: list[int]
    denied: int = 0  # refused by the tool policy: never reached the upstream, not errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def avg_ms(self) -> float:
        return round(self.latency_ms_sum / self.calls, 2) if self.calls else 0.0

    @property
    def p50_ms(self) -> float | None:
        return percentile(self.hist, 0.5, self.latency_ms_max)

    @property
    def p95_ms(self) -> float | None:
        return percentile(self.hist, 0.95, self.latency_ms_max)

    @property
    def label(self) -> str:
        return self.target or NO_TARGET

    def as_dict(self) -> dict:
        return {
            "tool": self.target,
            "user_sub": self.user_sub,
            "user_email": self.user_email,
            "calls": self.calls,
            "errors": self.errors,
            "denied": self.denied,
            "error_rate": round(self.error_rate, 4),
            "avg_ms": self.avg_ms,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "max_ms": round(self.latency_ms_max, 2),
        }


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    error_height: float
    period: str
    calls: int
    errors: int


@dataclass
class Chart:
    bars: list[Bar]
    max_calls: int
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    unit: str = "day"
    labels: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class UsageReport:
    server_id: str
    days: int
    label: str
    calls: int
    errors: int
    error_rate: float
    active_sessions: int
    chart: Chart
    top_tools: list[Row]
    table: list[Row]
    table_truncated: bool
    recent: list[UsageEvent]
    next_before: float | None
    emails: dict[str, str]
    denied: int = 0

    def as_dict(self) -> dict:
        return {
            "server_id": self.server_id,
            "days": self.days,
            "range": self.label,
            "calls": self.calls,
            "errors": self.errors,
            "denied": self.denied,
            "error_rate": round(self.error_rate, 4),
            "active_sessions": self.active_sessions,
            "per_period": [
                {"period": b.period, "calls": b.calls, "errors": b.errors} for b in self.chart.bars
            ],
            "period_unit": self.chart.unit,
            "top_tools": [
                {k: v for k, v in row.as_dict().items() if not k.startswith("user")} for row in self.top_tools
            ],
            "users_tools": [row.as_dict() for row in self.table],
            "users_tools_truncated": self.table_truncated,
            "recent": [recent_dict(e) for e in self.recent],
            "next_before": self.next_before,
        }


def recent_dict(event: UsageEvent) -> dict:
    return {
        "at": event.at,
        "user_sub": event.user_sub,
        "user_email": event.user_email,
        "client_id": event.client_id,
        "method": event.method,
        "tool": event.target,
        "outcome": event.outcome,
        # A tools/call the tool policy refused (outcome denied:REASON) never reached the
        # upstream: its reason apart, so it is not read as an upstream error.
        "denied": event.outcome[len(DENIED):] if event.outcome.startswith(DENIED) else None,
        "latency_ms": round(event.latency_ms, 2),
        "era": event.era,
    }


class UsageReports:
    def __init__(self, storage: Storage, *, now: Callable[[], float] = time.time):
        self._storage = storage
        self._usage = storage.usage
        self._now = now

    async def report(self, server_id: str, days: int, before: float | None = None,
                     now: float | None = None) -> UsageReport:
        now = self._now() if now is None else now
        rollups, periods, unit, slots = await self._read(server_id, days, now)
        emails = {u.user_sub: u.user_email for u in await self._usage.server_users(server_id)}
        table = [
            Row(r.target, r.user_sub, emails.get(r.user_sub, ""), r.calls, r.errors, r.latency_ms_sum,
                r.latency_ms_max, list(r.latency_hist), r.denied)
            for r in rollups
        ]
        table.sort(key=lambda row: (-row.calls, row.target, row.user_email))
        tools: dict[str, Row] = {}
        for row in table:
            tool = tools.get(row.target)
            if tool is None:
                tool = tools[row.target] = Row(row.target, "", "", 0, 0, 0.0, 0.0, [0] * LATENCY_BUCKETS)
            tool.calls += row.calls
            tool.errors += row.errors
            tool.denied += row.denied
            tool.latency_ms_sum += row.latency_ms_sum
            tool.latency_ms_max = max(tool.latency_ms_max, row.latency_ms_max)
            tool.hist = [a + b for a, b in zip(tool.hist, row.hist, strict=False)]
        top = sorted(tools.values(), key=lambda row: (-row.calls, row.target))[:TOP_TOOLS]
        calls = sum(row.calls for row in table)
        errors = sum(row.errors for row in table)
        recent = await self._usage.recent_usage(server_id, before or math.inf, RECENT_PAGE + 1)
        next_before = recent[RECENT_PAGE - 1].at if len(recent) > RECENT_PAGE else None
        return UsageReport(
            server_id=server_id,
            days=days,
            label=range_label(days),
            calls=calls,
            errors=errors,
            error_rate=errors / calls if calls else 0.0,
            active_sessions=await self._storage.count_sessions(server_id, now),
            chart=chart(periods, slots, unit),
            top_tools=top,
            table=table[:TABLE_LIMIT],
            table_truncated=len(table) > TABLE_LIMIT,
            recent=recent[:RECENT_PAGE],
            next_before=next_before,
            emails=emails,
            denied=sum(row.denied for row in table),
        )

    async def _read(self, server_id: str, days: int, now: float):
        if days == 1:
            # The hour 24 h ago counts whole: 24 to 25 hours, read from hourly aggregates.
            start = datetime.fromtimestamp(now - 86400, tz=UTC).replace(minute=0, second=0, microsecond=0)
            since_hour = start.strftime("%Y-%m-%dT%H")
            rollups = await self._usage.usage_rollup_hours(server_id, since_hour)
            periods = await self._usage.usage_per_hour(server_id, since_hour)
            slots = [(start + timedelta(hours=h)).strftime("%Y-%m-%dT%H") for h in range(25)]
            return rollups, periods, "hour", slots
        first = datetime.fromtimestamp(now, tz=UTC).date() - timedelta(days=days - 1)
        since_day = first.isoformat()
        rollups = await self._usage.usage_rollup(server_id, since_day)
        periods = await self._usage.usage_per_day(server_id, since_day)
        slots = [(first + timedelta(days=d)).isoformat() for d in range(days)]
        return rollups, periods, "day", slots

    async def csv(self, server_id: str, days: int, now: float | None = None) -> str:
        rollups, _, _, _ = await self._read(server_id, days, self._now() if now is None else now)
        emails = {u.user_sub: u.user_email for u in await self._usage.server_users(server_id)}
        label = range_label(days)
        rows = [
            Row(r.target, r.user_sub, emails.get(r.user_sub, ""), r.calls, r.errors,
                r.latency_ms_sum, r.latency_ms_max, list(r.latency_hist), r.denied)
            for r in rollups
        ]
        rows.sort(key=lambda row: (-row.calls, row.target, row.user_email))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["range", "user_email", "user_sub", "tool", "calls", "errors", "denied", "error_rate",
                         "avg_ms", "p50_ms", "p95_ms", "max_ms"])
        for row in rows:
            d = row.as_dict()
            writer.writerow([label, safe_cell(d["user_email"]), safe_cell(d["user_sub"]),
                             safe_cell(d["tool"]), d["calls"], d["errors"], d["denied"], d["error_rate"], d["avg_ms"],
                             d["p50_ms"], d["p95_ms"], d["max_ms"]])
        return out.getvalue()


def safe_cell(value: str) -> str:
    """Neutralise spreadsheet formulas (CSV injection): tool names come from clients."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def chart(periods: list[UsagePeriod], slots: list[str], unit: str) -> Chart:
    counts = {p.period: p for p in periods}
    max_calls = max((p.calls for p in periods), default=0)
    n = max(len(slots), 1)
    slot_width = CHART_WIDTH / n
    bar_width = max(slot_width * 0.8, 1.0)
    bars = []
    for i, slot in enumerate(slots):
        period = counts.get(slot)
        calls = period.calls if period else 0
        errors = period.errors if period else 0
        height = (calls / max_calls) * (CHART_HEIGHT - 10) if max_calls else 0.0
        error_height = (errors / max_calls) * (CHART_HEIGHT - 10) if max_calls else 0.0
        bars.append(Bar(round(i * slot_width + (slot_width - bar_width) / 2, 2),
                        round(CHART_HEIGHT - height, 2), round(bar_width, 2), round(height, 2),
                        round(error_height, 2), slot, calls, errors))
    step = max(1, n // 6)
    labels = [(round(i * slot_width + slot_width / 2, 2), slots[i][5:] if unit == "day" else slots[i][11:] + ":00")
              for i in range(0, n, step)]
    return Chart(bars, max_calls, unit=unit, labels=labels)
