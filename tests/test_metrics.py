"""Metrics (issue 9): the catalogue on prometheus_client, parsed by prometheus_client's own
parser, after real traffic through a real gateway; bounded labels; storage timing; usage
queue depth. Several processes: tests/test_metrics_workers.py."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import (
    CATALOGUE,
    SERVER_SERIES_LIMIT,
    MetricError,
    Metrics,
    time_storage,
)
from services.proxy.usage import UsageRecorder
from storage import open_storage
from storage.base import Conflict, Server, StorageUnavailable
from storage.usage import UsageEvent
from tests.support.browser import ScriptedBrowser
from tests.support.inprocess import make_config, run
from tests.support.mcp_oauth import connect, make_oauth_rig, refresh_now

ROOT = Path(__file__).resolve().parent.parent
ALICE = {"sub": "alice-metrics", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
EXAMPLE_LABELS = {"route": "mcp", "status": "200", "server": "srv_example", "reason": None, "kind": "timeout",
                  "event": "issued", "op": "get_server", "where": "get_server"}


def families(text: str) -> dict:
    """name -> family, checking on the way what every family must have."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type in ("counter", "gauge", "histogram"), f"{family.name} has TYPE {family.type}"
        found[family.name] = family
    assert "# HELP mcpgw_" in text and "# TYPE mcpgw_" in text
    return found


def sample(found: dict, name: str, suffix: str = "", **labels: str) -> float:
    """A sample's value (0 when absent): `name` without the mcpgw_ prefix, a counter without
    _total (as the parser names its family)."""
    family = found.get("mcpgw_" + name.removesuffix("_total"))
    if family is None:
        return 0.0
    wanted = family.name + (suffix or ("_total" if family.type == "counter" else ""))
    for s in family.samples:
        if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def total(found: dict, name: str, suffix: str = "", **labels: str) -> float:
    """Sum of the samples whose labels include `labels`."""
    family = found.get("mcpgw_" + name.removesuffix("_total"))
    if family is None:
        return 0.0
    wanted = family.name + (suffix or ("_total" if family.type == "counter" else ""))
    return sum(s.value for s in family.samples
               if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()))


def check_histograms(found: dict) -> int:
    """Every histogram series has cumulative buckets ending in +Inf = _count, and a _sum."""
    checked = 0
    for family in found.values():
        if family.type != "histogram":
            continue
        series: dict[tuple, dict] = {}
        for s in family.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            entry = series.setdefault(key, {"buckets": []})
            if s.name.endswith("_bucket"):
                entry["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                entry["count"] = s.value
            elif s.name.endswith("_sum"):
                entry["sum"] = s.value
        for key, entry in series.items():
            bounds = sorted(entry["buckets"])
            assert bounds and math.isinf(bounds[-1][0]), (family.name, key)
            counts = [count for _, count in bounds]
            assert counts == sorted(counts), (family.name, key, counts)
            assert counts[-1] == entry["count"] and entry["sum"] >= 0, (family.name, key)
            checked += 1
    return checked


def record_one_of_each(metrics: Metrics) -> None:
    for name, spec in CATALOGUE.items():
        labels = {}
        for label, allowed in spec.labels.items():
            labels[label] = sorted(allowed)[0] if isinstance(allowed, frozenset) else EXAMPLE_LABELS[label]
        if spec.kind == "counter":
            metrics.inc(name, **labels)
        elif spec.kind == "gauge":
            metrics.gauge_add(name, 1, **labels)
        else:
            metrics.observe(name, 0.0004, **labels)


# ------------------------------------------------------------------------- the catalogue


def test_every_metric_is_exposed_with_help_type_and_buckets():
    metrics = Metrics()
    record_one_of_each(metrics)
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    found = families(body.decode())
    assert set(found) == {"mcpgw_" + name.removesuffix("_total") for name in CATALOGUE}
    histograms = [name for name, spec in CATALOGUE.items() if spec.kind == "histogram"]
    assert check_histograms(found) == len(histograms)
    for name in histograms:  # 0.4 ms falls in the bucket of the declared bound above it
        bound = min(b for b in CATALOGUE[name].buckets if b >= 0.0004)
        assert sample(found, name, "_bucket", le=repr(bound)) == 1
    assert sample(found, "tokens_total", event="code_reuse") == 1


@pytest.mark.parametrize("call", [
    lambda m: m.inc("no_such_metric"),
    lambda m: m.inc("tokens_total"),  # a label missing
    lambda m: m.inc("tokens_total", event="issued", client="x"),  # a label too many
    lambda m: m.inc("tokens_total", event="minted"),  # a value outside the fixed set
    lambda m: m.inc("http_requests_total", route="/mcp/srv_x", status="200"),  # a path is no route group
    lambda m: m.inc("http_requests_total", route="mcp", status="OK"),
    lambda m: m.observe("proxy_upstream_ttfb_seconds", 0.1, server="srv x"),  # not a server id
    lambda m: m.inc("storage_errors_total", where="DROP TABLE"),
    lambda m: m.gauge_add("tokens_total", 1, event="issued"),  # a counter is not a gauge
    lambda m: m.observe("sse_streams_open", 1.0),
], ids=["name", "missing-label", "extra-label", "value", "path", "status", "server", "where", "kind",
        "observe-gauge"])
def test_outside_the_catalogue_raises_and_creates_no_series(call):
    metrics = Metrics()
    before = metrics.render()[0]
    with pytest.raises(MetricError):
        call(metrics)
    assert metrics.render()[0] == before


def test_histograms_count_like_prometheus_client_observe():
    """The recorder reaches the buckets directly: every sample, on a bound (le is <=), just
    past one, beyond the last, zero and negative, lands where Histogram.observe puts it."""
    spec = CATALOGUE["storage_seconds"]
    samples = [b for b in spec.buckets] + [b * 1.0001 for b in spec.buckets] + [0.0, -1.0, 1e9]
    metrics = Metrics()
    reference = Histogram("mcpgw_storage_seconds", spec.help, ["op"], registry=CollectorRegistry(),
                          buckets=spec.buckets)
    for seconds in samples:
        metrics.observe("storage_seconds", seconds, op="get_server")
        reference.labels(op="get_server").observe(seconds)
    ours = families(metrics.render()[0].decode())["mcpgw_storage_seconds"].samples
    assert ours == list(reference.collect()[0].samples)


def test_a_counter_cannot_go_down():
    metrics = Metrics()
    metrics.inc("usage_events_recorded_total", 2)
    with pytest.raises(MetricError):
        metrics.inc("usage_events_recorded_total", -1)
    assert metrics.value("usage_events_recorded_total") == 2


def test_server_label_is_bounded():
    metrics = Metrics()
    for n in range(SERVER_SERIES_LIMIT + 20):
        metrics.observe("proxy_gateway_seconds", 0.0002, server=f"srv_{n}")
    found = families(metrics.render()[0].decode())
    servers = {s.labels["server"] for s in found["mcpgw_proxy_gateway_seconds"].samples}
    assert len(servers) == SERVER_SERIES_LIMIT + 1 and "~other" in servers
    assert sample(found, "proxy_gateway_seconds", "_count", server="~other") == 20
    assert metrics.value("proxy_gateway_seconds", server="srv_0") == 1


# -------------------------------------------------------------------- storage and usage


def usage_event(n: int) -> UsageEvent:
    return UsageEvent(server_id="srv_m", user_sub="sub-m", user_email="m@example.com", client_id="c",
                      method="tools/call", target="echo", outcome="ok", latency_ms=1.0, at=time.time() + n * 1e-3,
                      era="2025", bytes_in=1, bytes_out=1)


@run
async def test_storage_calls_are_timed_by_op_and_failures_counted(tmp_path):
    metrics = Metrics()
    storage = time_storage(open_storage(make_config(tmp_path).storage_url), metrics)
    assert time_storage(storage, metrics) is storage  # wrapping twice would count twice
    await storage.open()
    holder = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    try:
        server = Server(server_id="srv_m", name="m", upstream_url="http://127.0.0.1:9/mcp", owner_email="o@e.com")
        await storage.create_server(server)
        with pytest.raises(Conflict):
            await storage.create_server(server)
        assert (await storage.get_server("srv_m")).name == "m"
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageUnavailable):
            await storage.usage.record_usage([usage_event(0)])
    finally:
        holder.close()
        await storage.close()
    assert metrics.value("storage_seconds", op="create_server") == 2
    assert metrics.value("storage_seconds", op="get_server") == 1
    assert metrics.value("storage_seconds", op="record_usage") == 1
    assert metrics.value("storage_seconds_sum", op="get_server") > 0
    assert metrics.value("storage_errors_total", where="create_server") == 0  # Conflict is an answer
    assert metrics.value("storage_errors_total", where="record_usage") == 1


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@run
async def test_usage_queue_depth_follows_the_backlog(tmp_path):
    storage = open_storage(make_config(tmp_path).storage_url)
    await storage.open()
    metrics = Metrics()
    recorder = UsageRecorder(storage.usage, metrics)
    holder = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)

    async def until(predicate) -> bool:
        for _ in range(300):
            if predicate():
                return True
            await asyncio.sleep(0.05)
        return predicate()

    try:
        holder.execute("BEGIN EXCLUSIVE")  # storage unavailable: the events wait in the queue
        recorder.start()
        for n in range(40):
            recorder.record(usage_event(n))
        assert await until(lambda: metrics.value("usage_queue_depth") == 40)
        holder.execute("ROLLBACK")
        assert await until(lambda: metrics.value("usage_events_recorded_total") == 40)
        assert await until(lambda: metrics.value("usage_queue_depth") == 0)
    finally:
        holder.close()
        await recorder.stop()
        await storage.close()


# ------------------------------------------------------------- a real gateway, real traffic


def test_metrics_after_an_oauth_flow_and_mcp_calls(gateway, upstream):
    server_id = gateway.add_server(upstream.url, ALICE["email"])
    http = httpx.Client(base_url=gateway.url, trust_env=False, timeout=30)

    def scrape() -> dict:
        response = http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == CONTENT_TYPE_LATEST
        return families(response.text)

    before = scrape()

    async def traffic():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE)
            async with connect(rig, mode="legacy") as client:
                await client.list_tools()
                assert (await client.call_tool("echo", {"text": "hi"})).content[0].text == "echo: hi"
                assert (await client.call_tool("fail", {})).is_error
            assert (await refresh_now(rig)).status_code == 200

    asyncio.run(traffic())
    assert http.post(f"/mcp/{server_id}", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}).status_code == 401
    # The usage queue is written once a second: wait for the three calls' events.
    assert wait_for(lambda: sample(scrape(), "usage_events_recorded_total") >= 3)
    after = scrape()

    assert check_histograms(after) > 0
    mcp_ok = sample(after, "http_requests_total", route="mcp", status="200")
    assert mcp_ok - sample(before, "http_requests_total", route="mcp", status="200") >= 4  # init, list, 2 calls
    assert sample(after, "http_requests_total", route="mcp", status="401") >= 2  # the SDK's first try, and ours
    assert total(after, "http_requests_total", route="oauth") >= 3  # register, authorize, token ×2
    assert total(after, "http_requests_total", route="discovery") >= 2
    # One duration sample per request: the histogram's count is the counter's total per route.
    for route in ("mcp", "oauth", "discovery"):
        assert (sample(after, "http_request_duration_seconds", "_count", route=route)
                == total(after, "http_requests_total", route=route))
    assert sample(after, "tokens_total", event="issued") >= 1
    assert sample(after, "tokens_total", event="refreshed") == 1
    for op in ("redeem_code", "create_family", "rotate_refresh_token", "get_server", "record_usage"):
        assert sample(after, "storage_seconds", "_count", op=op) >= 1, op
    assert sample(after, "auth_failures_total", reason="missing") >= 2
    proxied = sample(after, "proxy_upstream_ttfb_seconds", "_count", server=server_id)
    assert proxied >= 4  # initialize, tools/list, two calls: each with upstream time and ours
    assert sample(after, "proxy_gateway_seconds", "_count", server=server_id) == proxied
    assert total(after, "upstream_errors_total") == 0  # a tool's error is an answer
    assert sample(after, "sse_streams_open") == 0
    assert sample(after, "usage_events_dropped_total") == 0
    assert total(after, "storage_errors_total") == 0
