"""Metrics: the gateway's Prometheus catalogue on prometheus_client, for one process or for
every worker of MCPGW_WORKERS=N at once (prometheus_client's multi-process mode).

Contract with the worker supervisor (workers.py):
- One process (the default): nothing to do. Values live in memory; `render()` serves them.
- N workers: the parent calls `prepare_multiprocess(directory)` BEFORE it builds any
  `Metrics` (so before `build_services`) and before it forks. `directory` must belong to this
  gateway alone (its stale `*.db` files are deleted), e.g. a fresh private temporary
  directory; remove it at exit. Each process, the parent included, then writes its values to its own
  mmap files there (`<type>_<pid>.db`), and `render()` in any worker returns the sum over all
  of them: counters and histograms of dead workers stay (a counter never goes back), gauges
  are `livesum` (open streams, queue depth of the processes alive). When a worker dies the
  parent calls `worker_exited(pid)`, which drops that worker's live gauges. The parent counts
  its restarts with `Metrics().inc("workers_restarted_total")`.
- Within one process, `Metrics()` instances made after `prepare_multiprocess` share one set
  of values (two writers of one mmap key would overwrite each other).

Label values are bounded by construction: `route`, `event`, `kind`, `reason` and `where`
take values from the fixed sets below, `op` is a method name of the storage contract
(storage.base.Storage and its sub-stores: usage, tools), `status` is a three-digit HTTP status and
`server` a registered server id (callers pass it only after the registry found the server;
past SERVER_SERIES_LIMIT distinct ids per metric and process the rest count as "~other").
Anything else (an unknown name, label key or value) raises MetricError: a programming error,
caught by the tests, never a new series."""

from __future__ import annotations

import inspect
import os
import re
import sys
import typing
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from storage.base import Conflict, Storage

PREFIX = "mcpgw_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SERVER_SERIES_LIMIT = 500
OTHER_SERVER = "~other"  # "~" is never in a server id (services.common.servers.SERVER_ID_RE)

# `_created` series are not kept in multi-process mode; leaving them out everywhere keeps the
# output of both modes alike (and one sample less per series).
disable_created_metrics()
if MULTIPROC_ENV in os.environ:
    # prometheus_client picks mmap values when this variable is set at import; only
    # prepare_multiprocess may do that here, so a stray variable cannot send one process's
    # values to files nobody collects.
    values.ValueClass = values.MutexValue

# Gateway time (the request's own work, no I/O) is tens to hundreds of microseconds.
GATEWAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25)
# Upstream time to first byte: a local tool answers in a millisecond, a slow one in tens of s.
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                20.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
STORAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)


def _contract_ops(*contracts: type) -> frozenset[str]:
    return frozenset(name for contract in contracts for name, member in vars(contract).items()
                     if not name.startswith("_") and inspect.iscoroutinefunction(member))


def _contracts() -> list[tuple[str | None, type]]:
    """The storage contract: Storage's own methods, and those of each sub-store it declares
    (`usage: UsageStore`, `tools: ToolStore`, …) by attribute name."""
    module = sys.modules[Storage.__module__]
    found = []
    for attribute, annotation in sorted(Storage.__annotations__.items()):
        kind = getattr(module, annotation, None) if isinstance(annotation, str) else annotation
        if isinstance(kind, type) and _contract_ops(kind):
            found.append((attribute, kind))
    return [(None, Storage), *found]


STORAGE_OPS = _contract_ops(*(contract for _, contract in _contracts()))
ROUTES = frozenset({"mcp", "oauth", "discovery", "dashboard", "api", "ops", "static", "other"})
STATUS = "status"  # rule labels: checked by Metrics._child, not against a set
SERVER = "server"


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    help: str
    labels: dict[str, frozenset[str] | str]  # label -> its allowed values, or a rule name
    buckets: tuple[float, ...] = ()


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


CATALOGUE: dict[str, Spec] = {
    "http_requests_total": Spec("counter", "HTTP requests answered, by route group and status code.",
                                {"route": ROUTES, "status": STATUS}),
    "http_request_duration_seconds": Spec(
        "histogram", "Time from request start to the answer's head (a stream that stays open "
        "counts to its first byte), by route group.", {"route": ROUTES}, REQUEST_BUCKETS),
    "proxy_gateway_seconds": Spec(
        "histogram", "Gateway's own time on a proxied call (token, rules, session, relay set-up), "
        "upstream time excluded, by server.", {"server": SERVER}, GATEWAY_BUCKETS),
    "proxy_upstream_ttfb_seconds": Spec(
        "histogram", "Upstream time to the first byte of its answer (head), by server.",
        {"server": SERVER}, TTFB_BUCKETS),
    "sse_streams_open": Spec("gauge", "SSE streams being relayed now.", {}),
    "streams_closed_total": Spec(
        "counter", "SSE streams ended by the gateway or a peer before their natural end, by reason.",
        {"reason": _set("client_gone", "slow_reader", "drain", "event_too_large", "upstream_broke")}),
    "upstream_errors_total": Spec(
        "counter", "Failed upstream requests, by kind.",
        {"kind": _set("timeout", "refused", "unreachable", "protocol", "broken_body", "too_large",
                      "auth_rejected")}),
    "tokens_total": Spec("counter", "Token events of the authorization server, by event.",
                         {"event": _set("issued", "refreshed", "refresh_reuse", "revoked", "code_reuse")}),
    "auth_failures_total": Spec(
        "counter", "Requests refused for their credentials (401), by reason.",
        {"reason": _set("missing", "invalid", "expired", "revoked", "audience", "origin", "malformed",
                        "unknown_key", "issuer")}),
    "policy_denials_total": Spec(
        "counter", "Authenticated requests refused by the sharing rules or scopes (403), by reason.",
        {"reason": _set("not_shared", "scope", "insufficient_scope", "session", "tool")}),
    "tool_changes_total": Spec(
        "counter", "Changes seen in upstream tool catalogs (and owner approvals), by kind.",
        {"kind": _set("appeared", "changed", "disappeared", "approved")}),
    "storage_seconds": Spec("histogram", "Storage call latency, by storage method.",
                            {"op": STORAGE_OPS}, STORAGE_BUCKETS),
    "storage_errors_total": Spec(
        "counter", "Failed storage calls (a lost conditional write is not a failure), by storage "
        "method or by the request path that saw the failure.",
        {"where": STORAGE_OPS | _set("proxy", "oauth", "dashboard", "api")}),
    "usage_queue_depth": Spec("gauge", "Usage events waiting to be written to storage.", {}),
    "usage_events_recorded_total": Spec("counter", "Usage events written to storage.", {}),
    "usage_events_dropped_total": Spec(
        "counter", "Usage events dropped (queue full, or refused by storage for their data).", {}),
    "connections_refused_total": Spec(
        "counter", "Client connections answered 503 and closed at the connection cap.", {}),
    "accept_paused_total": Spec(
        "counter", "Times accepting was paused because the process ran out of descriptors.", {}),
    "workers_restarted_total": Spec("counter", "Worker processes restarted by the supervisor.", {}),
    "upstream_token_refreshes_total": Spec(
        "counter", "Refreshes of users' upstream tokens (connected accounts) at the upstream's token "
        "endpoint, by outcome (rejected: the user must reconnect; unavailable: kept, try later).",
        {"outcome": _set("ok", "rejected", "unavailable")}),
    "connect_required_total": Spec(
        "counter", "Proxied requests answered with the connect link (no usable upstream account).", {}),
}

_STATUS_RE = re.compile(r"^[1-5][0-9][0-9]$")
_SERVER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class MetricError(ValueError):
    """A metric name, label key or label value outside the catalogue: a programming error."""


_multiprocess_dir: str | None = None
_shared: dict | None = None  # the one set of families per process in multi-process mode


def prepare_multiprocess(directory: str | os.PathLike) -> None:
    """Called by the supervisor before any Metrics exists and before forking (see above)."""
    global _multiprocess_dir, _shared
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)  # where prometheus_client's mmap values open files
    values.ValueClass = values.MultiProcessValue()  # re-opens its files after each fork
    _multiprocess_dir, _shared = str(path), None


def worker_exited(pid: int) -> None:
    """Called by the supervisor when a worker is gone: its live gauges stop counting."""
    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, _multiprocess_dir)


def _family(name: str, spec: Spec, registry):
    labels = tuple(spec.labels)
    if spec.kind == "counter":
        return Counter(PREFIX + name, spec.help, labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(PREFIX + name, spec.help, labels, registry=registry, multiprocess_mode="livesum")
    return Histogram(PREFIX + name, spec.help, labels, registry=registry, buckets=spec.buckets)


class Metrics:
    """The catalogue above, recorded by name without the `mcpgw_` prefix."""

    def __init__(self):
        global _shared
        self._multiprocess = _multiprocess_dir
        if self._multiprocess is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._families = {name: _family(name, spec, self._registry) for name, spec in CATALOGUE.items()}
        else:
            if _shared is None:
                _shared = {name: _family(name, spec, None) for name, spec in CATALOGUE.items()}
            self._families = _shared
            self._registry = CollectorRegistry(auto_describe=False)
            multiprocess.MultiProcessCollector(self._registry, path=self._multiprocess)
        # (name, *label items) -> what records into that series, one dict per kind (a name
        # used with the wrong method misses and is refused): the hot path is one dict lookup
        # and one or two value updates.
        self._counters: dict[tuple, typing.Callable[[float], None]] = {}
        self._gauges: dict[tuple, typing.Any] = {}
        self._histograms: dict[tuple, typing.Callable[[float], None]] = {}
        self._servers: dict[str, set[str]] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        record = self._counters.get((name, *labels.items()))
        if record is None:
            record = self._recorder(name, "counter", labels)
        if amount < 0:
            raise MetricError(f"counter {name!r} cannot go down ({amount})")
        record(amount)

    def gauge_add(self, name: str, delta: float, **labels: str) -> None:
        """A level that goes up and down (open streams)."""
        value = self._gauges.get((name, *labels.items()))
        if value is None:
            value = self._recorder(name, "gauge", labels)
        value.inc(delta)

    def gauge_set(self, name: str, value: float, **labels: str) -> None:
        level = self._gauges.get((name, *labels.items()))
        if level is None:
            level = self._recorder(name, "gauge", labels)
        level.set(float(value))

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """One sample of a latency histogram (seconds)."""
        record = self._histograms.get((name, *labels.items()))
        if record is None:
            record = self._recorder(name, "histogram", labels)
        record(seconds)

    def value(self, name: str, **labels: str) -> float:
        """This process's value of a counter or gauge, or a histogram's count (`name`) or sum
        (`name_sum`, `name_count`); 0 for a series never written. For tests."""
        base, suffix = name, ""
        for ending in ("_sum", "_count"):
            if name.endswith(ending) and name[: -len(ending)] in CATALOGUE:
                base, suffix = name[: -len(ending)], ending
        spec = self._spec(base, None, labels)
        if spec.kind == "histogram" and not suffix:
            suffix = "_count"
        wanted = PREFIX + (base if spec.kind != "counter" or base.endswith("_total") else base + "_total")
        wanted += suffix
        expected = {key: str(value) for key, value in labels.items()}
        for family in self._families[base].collect():
            for sample in family.samples:
                if sample.name == wanted and sample.labels == expected:
                    return sample.value
        return 0.0

    def render(self) -> tuple[bytes, str]:
        """The exposition (every worker's values in multi-process mode) and its content type."""
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    # ----------------------------------------------------------------- first use of a series

    def _spec(self, name: str, kind: str | None, labels: dict) -> Spec:
        spec = CATALOGUE.get(name)
        if spec is None:
            raise MetricError(f"unknown metric {name!r}: declare it in services/common/metrics.py CATALOGUE")
        if kind is not None and spec.kind != kind:
            raise MetricError(f"metric {name!r} is a {spec.kind}, not a {kind}")
        if set(labels) != set(spec.labels):
            raise MetricError(f"metric {name!r} takes labels {sorted(spec.labels)}, not {sorted(labels)}")
        return spec

    def _recorder(self, name: str, kind: str, labels: dict):
        """What records into this series: the value object prometheus_client's own methods
        update, reached directly (its inc/set/observe re-check on every call what was
        checked here once); cached unless the series is the overflow one."""
        key = (name, *labels.items())
        child, cacheable = self._child(name, kind, labels)
        if kind == "counter":
            recorder = child._value.inc
        elif kind == "gauge":
            recorder = child._value
        else:
            recorder = _histogram_recorder(child)
        if cacheable:
            {"counter": self._counters, "gauge": self._gauges, "histogram": self._histograms}[kind][key] = recorder
        return recorder

    def _child(self, name: str, kind: str, labels: dict):
        """The prometheus_client child of a checked series, and whether it may be cached."""
        cacheable = True
        spec = self._spec(name, kind, labels)
        clean = {}
        for label, allowed in spec.labels.items():
            value = str(labels[label])
            if allowed is SERVER:
                value = self._server_value(name, value)
                if value == OTHER_SERVER:
                    cacheable = False  # the raw ids past the limit are not bounded
            elif allowed is STATUS:
                if not _STATUS_RE.match(value):
                    raise MetricError(f"metric {name!r}: status {value!r} is not an HTTP status")
            elif value not in allowed:
                raise MetricError(f"metric {name!r}: {label} {value!r} is not one of {sorted(allowed)}")
            clean[label] = value
        family = self._families[name]
        return (family.labels(**clean) if clean else family), cacheable

    def _server_value(self, name: str, server_id: str) -> str:
        seen = self._servers.setdefault(name, set())
        if server_id in seen:
            return server_id
        if not _SERVER_RE.match(server_id):
            raise MetricError(f"metric {name!r}: {server_id!r} is not a server id")
        if len(seen) >= SERVER_SERIES_LIMIT:
            return OTHER_SERVER
        seen.add(server_id)
        return server_id


def _histogram_recorder(child) -> typing.Callable[[float], None]:
    """Histogram.observe without its per-call checks: the first bucket whose bound is >= the
    sample (bisect instead of a scan; the last bound is +Inf), and the sum."""
    bounds, buckets, total = child._upper_bounds, child._buckets, child._sum

    def record(seconds: float) -> None:
        buckets[bisect_left(bounds, seconds)].inc(1)
        total.inc(seconds)

    return record


def time_storage(storage: Storage, metrics: Metrics) -> Storage:
    """Feed storage_seconds{op} and storage_errors_total{where=op} from every method of the
    storage contract (and of its sub-stores), by shadowing each on the instance: the object,
    its type and storage/ stay as they are. Idempotent."""
    if getattr(storage, "_mcpgw_timed", False):
        return storage
    for attribute, contract in _contracts():
        target = storage if attribute is None else getattr(storage, attribute)
        for op in sorted(_contract_ops(contract)):
            setattr(target, op, _timed(getattr(target, op), op, metrics))
    storage._mcpgw_timed = True
    return storage


def _timed(method, op: str, metrics: Metrics):
    seconds = metrics._recorder("storage_seconds", "histogram", {"op": op})
    errors = metrics._recorder("storage_errors_total", "counter", {"where": op})

    async def timed(*args, **kwargs):
        start = perf_counter()
        try:
            return await method(*args, **kwargs)
        except Conflict:
            raise  # a conditional write that lost: an answer, not a failure
        except Exception:
            errors(1)
            raise
        finally:
            seconds(perf_counter() - start)

    timed.__name__ = timed.__qualname__ = op
    timed.__doc__ = method.__doc__
    return timed
