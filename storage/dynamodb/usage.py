"""Usage analytics on DynamoDB: events, daily and hourly aggregates, who used what."""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count
from typing import TYPE_CHECKING

from ..usage import (
    HOURLY_KEPT_SECONDS,
    LATENCY_BUCKETS,
    ServerUser,
    UsageAggregate,
    UsageEvent,
    UsagePeriod,
    UsageRollup,
    UsageStore,
    summarize_batch,
)
from .codecs import (
    HIST_ATTRIBUTES,
    SERVER_USERS,
    TTL_ATTRIBUTE,
    USAGE_EVENTS,
    _esc,
    _exp,
    _Expr,
    _key,
    _num,
    _sorted,
    _ts,
    _ttl,
    _update_expression,
)

if TYPE_CHECKING:
    from .store import DynamoDBStorage


_sequence = count()


def _utc(at: float, fmt: str) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime(fmt)


class DynamoDBUsage(UsageStore):
    """`UsageStore` on the EVENTS#, DAILY#, HOURLY#, USAGEUSERS# and USAGESERVERS partitions
    of its `DynamoDBStorage`'s table."""

    def __init__(self, store: DynamoDBStorage) -> None:
        self._store = store

    async def record_usage(self, events: list[UsageEvent]) -> None:
        if events:
            await self._store._run(self._record_usage, list(events))

    def _record_usage(self, events: list[UsageEvent]) -> None:
        daily, hourly, users = summarize_batch(events)
        # Events first: the sequence orders events that share a timestamp, newest last.
        batch = f"{time.time_ns():020d}{random.getrandbits(32):08x}"
        puts = []
        for event in events:
            sort = f"{_ts(event.at)}#{batch}{next(_sequence) % 10**8:08d}"
            item = {**_key(f"EVENTS#{_esc(event.server_id)}", sort), **USAGE_EVENTS.encode(event)}
            puts.append({"PutRequest": {"Item": item}})
        # Which servers have event partitions: what purge_usage_events walks (no Scan).
        for server_id in {event.server_id for event in events}:
            puts.append({"PutRequest": {"Item": _key("USAGESERVERS", _esc(server_id))}})
        self._store._batch_write(puts)
        for key, totals in daily.items():
            self._add_aggregate("DAILY", "day", key, totals)
        for key, totals in hourly.items():
            self._add_aggregate("HOURLY", "hour", key, totals)
        for (server_id, user_sub), (email, first, last) in users.items():
            self._add_server_user(server_id, user_sub, email, first, last)

    def _add_aggregate(self, prefix: str, period_name: str, key: tuple, totals: list) -> None:
        server_id, period, target, user_sub = key
        calls, errors, latency_sum, latency_max, hist, denied = totals
        pk = f"{prefix}#{_esc(server_id)}"
        item_key = _key(pk, f"{period}#{_esc(target)}#{_esc(user_sub)}")
        expr = _Expr()
        top = expr.v({"N": _num(latency_max)})
        maximum = expr.n("latency_ms_max")
        sets = [
            f"{expr.n(period_name)} = {expr.v({'S': period})}",
            f"{expr.n('server_id')} = {expr.v({'S': server_id})}",
            f"{expr.n('target')} = {expr.v({'S': target})}",
            f"{expr.n('user_sub')} = {expr.v({'S': user_sub})}",
            f"{maximum} = if_not_exists({maximum}, {top})",
        ]
        if prefix == "HOURLY":
            hour_start = datetime.strptime(period, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()
            ttl = _ttl(hour_start + HOURLY_KEPT_SECONDS + 3600)
            for name, value in {TTL_ATTRIBUTE: ttl, **_exp("hourly", pk, period)}.items():
                sets.append(f"{expr.n(name)} = {expr.v(value)}")
        adds = [
            f"{expr.n('calls')} {expr.v({'N': _num(calls)})}",
            f"{expr.n('errors')} {expr.v({'N': _num(errors)})}",
            f"{expr.n('latency_ms_sum')} {expr.v({'N': _num(latency_sum)})}",
            *(
                f"{expr.n(HIST_ATTRIBUTES[i])} {expr.v({'N': str(n)})}"
                for i, n in enumerate(hist)
                if n
            ),
            # Rows written before denied calls were counted apart have no attribute: read 0.
            *([f"{expr.n('denied')} {expr.v({'N': str(denied)})}"] if denied else []),
        ]
        response = self._store._update(item_key, expr, _update_expression(sets, adds), ReturnValues="ALL_OLD")
        old = (response or {}).get("Attributes", {}).get("latency_ms_max")
        if old is not None and float(old["N"]) < latency_max:
            # DynamoDB has no max(): raise it only while it is lower (a rare second write).
            raise_max = _Expr()
            value = raise_max.v({"N": _num(latency_max)})
            name = raise_max.n("latency_ms_max")
            self._store._update(item_key, raise_max, f"SET {name} = {value}", f"{name} < {value}")

    def _add_server_user(self, server_id: str, user_sub: str, email: str, first: float, last: float) -> None:
        key = _key(f"USAGEUSERS#{_esc(server_id)}", f"U#{_esc(user_sub)}")
        expr = _Expr()
        last_used, first_used, mail = expr.n("last_used_at"), expr.n("first_used_at"), expr.n("user_email")
        at = expr.v({"N": _num(last)})
        sets = [
            f"{expr.n('server_id')} = {expr.v({'S': server_id})}",
            f"{expr.n('user_sub')} = {expr.v({'S': user_sub})}",
            f"{last_used} = {at}",
            f"{first_used} = if_not_exists({first_used}, {expr.v({'N': _num(first)})})",
            f"{mail} = {expr.v({'S': email})}" if email else f"{mail} = if_not_exists({mail}, {expr.v({'S': ''})})",
        ]
        # The usual case (this batch is the latest use) is one write; an older batch
        # arriving late only lowers first_used_at.
        condition = f"attribute_not_exists({last_used}) OR {last_used} <= {at}"
        response = self._store._update(key, expr, _update_expression(sets), condition, ReturnValues="ALL_NEW")
        stored_first = None if response is None else float(response["Attributes"]["first_used_at"]["N"])
        if stored_first is None or stored_first > first:
            lower = _Expr()
            name, value = lower.n("first_used_at"), lower.v({"N": _num(first)})
            self._store._update(key, lower, f"SET {name} = {value}", f"{name} > {value}")

    async def usage_aggregates(self, server_id: str, since_day: str) -> list[UsageAggregate]:
        items = await self._store._run(self._store._query_partition, f"DAILY#{_esc(server_id)}", "", since_day)
        aggregates = [
            UsageAggregate(
                day=i["day"]["S"],
                server_id=i["server_id"]["S"],
                target=i["target"]["S"],
                user_sub=i["user_sub"]["S"],
                calls=int(Decimal(i["calls"]["N"])),
                errors=int(Decimal(i["errors"]["N"])),
                latency_ms_sum=float(i["latency_ms_sum"]["N"]),
                latency_ms_max=float(i["latency_ms_max"]["N"]),
                latency_hist=_hist(i),
                denied=_denied(i),
            )
            for i in items
        ]
        return _sorted(aggregates, lambda a: (a.day, a.target, a.user_sub))

    async def usage_rollup(self, server_id: str, since_day: str) -> list[UsageRollup]:
        return _rollup(await self._store._run(self._store._query_partition, f"DAILY#{_esc(server_id)}", "", since_day))

    async def usage_per_day(self, server_id: str, since_day: str) -> list[UsagePeriod]:
        items = await self._store._run(self._store._query_partition, f"DAILY#{_esc(server_id)}", "", since_day)
        return _periods(items, "day")

    async def usage_rollup_hours(self, server_id: str, since_hour: str) -> list[UsageRollup]:
        return _rollup(await self._store._run(self._store._query_partition, f"HOURLY#{_esc(server_id)}", "", since_hour))

    async def usage_per_hour(self, server_id: str, since_hour: str) -> list[UsagePeriod]:
        items = await self._store._run(self._store._query_partition, f"HOURLY#{_esc(server_id)}", "", since_hour)
        return _periods(items, "hour")

    async def server_users(self, server_id: str) -> list[ServerUser]:
        items = await self._store._run(self._store._query_partition, f"USAGEUSERS#{_esc(server_id)}", "U#")
        users = [SERVER_USERS.decode(i) for i in items]
        return _sorted(users, lambda u: (-u.last_used_at, u.user_sub))

    async def recent_usage(self, server_id: str, before: float, limit: int) -> list[UsageEvent]:
        if limit <= 0:
            return []
        return await self._store._run(self._recent_usage, server_id, before, limit)

    def _recent_usage(self, server_id: str, before: float, limit: int) -> list[UsageEvent]:
        expr = _Expr()
        condition = f"{expr.n('PK')} = {expr.v({'S': f'EVENTS#{_esc(server_id)}'})}"
        if math.isfinite(before):
            # Sort keys start with ts(at): every key of an event at `before` sorts above.
            condition += f" AND {expr.n('SK')} < {expr.v({'S': _ts(before)})}"
        page = self._store._db.query(
            TableName=self._store.table,
            ScanIndexForward=False,
            Limit=limit,
            ConsistentRead=True,
            **expr.params(KeyConditionExpression=condition),
        )
        return [USAGE_EVENTS.decode(i) for i in page.get("Items", [])]


    async def purge_usage_events(self, before: float, limit: int) -> int:
        return await self._store._run(self._purge_usage_events, before, limit)

    def _purge_usage_events(self, before: float, limit: int) -> int:
        # One Query per server's event partition (oldest first, keys below ts(before)),
        # found through the USAGESERVERS list, then batch deletes: never a Scan.
        purged = 0
        for server in self._store._query_partition("USAGESERVERS", ProjectionExpression="SK"):
            if purged >= limit:
                break
            expr = _Expr()
            condition = (
                f"{expr.n('PK')} = {expr.v({'S': 'EVENTS#' + server['SK']['S']})} "
                f"AND {expr.n('SK')} < {expr.v({'S': _ts(before)})}"
            )
            old = self._store._query(limit - purged, ProjectionExpression="PK, SK",
                              **expr.params(KeyConditionExpression=condition))
            self._store._batch_write([{"DeleteRequest": {"Key": {"PK": i["PK"], "SK": i["SK"]}}} for i in old])
            purged += len(old)
        return purged

    def purge_old_hours(self, now: float) -> int:
        """Hourly aggregates older than HOURLY_KEPT_SECONDS (a step of purge_expired)."""
        purged = 0
        cutoff_hour = _utc(max(0.0, now - HOURLY_KEPT_SECONDS), "%Y-%m-%dT%H")
        for key in self._store._expired_keys("hourly", "<", cutoff_hour):
            expr = _Expr()
            condition = f"{expr.n('hour')} < {expr.v({'S': cutoff_hour})}"
            purged += self._store._delete(key, condition, expr) is not None
        return purged


def _hist(item: dict) -> tuple[int, ...]:
    return tuple(int(Decimal(item[h]["N"])) if h in item else 0 for h in HIST_ATTRIBUTES)


def _denied(item: dict) -> int:
    return int(Decimal(item["denied"]["N"])) if "denied" in item else 0


def _rollup(items: list[dict]) -> list[UsageRollup]:
    """Per (target, user) sums of aggregate rows; histograms add up bucket by bucket."""
    sums: dict[tuple[str, str], list] = {}
    for item in items:
        key = (item["target"]["S"], item["user_sub"]["S"])
        row = sums.get(key)
        if row is None:
            row = sums[key] = [0, 0, 0.0, 0.0, [0] * LATENCY_BUCKETS, 0]
        row[0] += int(Decimal(item["calls"]["N"]))
        row[5] += _denied(item)
        row[1] += int(Decimal(item["errors"]["N"]))
        row[2] += float(item["latency_ms_sum"]["N"])
        row[3] = max(row[3], float(item["latency_ms_max"]["N"]))
        for i, n in enumerate(_hist(item)):
            row[4][i] += n
    return [
        UsageRollup(target, user, calls, errors, total, top, tuple(hist), denied)
        for (target, user), (calls, errors, total, top, hist, denied) in sorted(sums.items())
    ]


def _periods(items: list[dict], period_name: str) -> list[UsagePeriod]:
    sums: dict[str, list[int]] = {}
    for item in items:
        row = sums.setdefault(item[period_name]["S"], [0, 0])
        row[0] += int(Decimal(item["calls"]["N"]))
        row[1] += int(Decimal(item["errors"]["N"]))
    return [UsagePeriod(period, calls, errors) for period, (calls, errors) in sorted(sums.items())]
