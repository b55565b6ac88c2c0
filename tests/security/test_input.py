"""Malformed text from outside (issue 7, findings 17 and 18): lone surrogates and control
characters in JSON bodies and usage data. Each is refused at the edge with a 400 naming
the field (nothing stored, no traceback), or, for usage that is recorded rather than
refused, made storable so that one client's bad tool name never costs anyone else's history."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import httpx
import pytest

from config import Config
from services import build_services
from services.common.metrics import Metrics
from services.proxy.usage import UsageRecorder
from storage import open_storage
from storage.base import RefreshFamily, RefreshToken, UsageEvent, User
from tests.support import dashboard_client
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import make_config, run

ADMIN = "root@example.com"
BAD = "x\ud800y"  # a lone surrogate: what JSON's "x\ud800y" escape decodes to
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2025-11-25"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    gateway = GatewayProcess(tmp_path_factory.mktemp("input"), extra_env={"MCPGW_ADMIN_EMAILS": ADMIN}).start()
    yield gateway
    gateway.stop()


def sign_in(gw, email: str) -> httpx.Client:
    """A signed-in client whose every request carries the XSRF header."""
    client = dashboard_client.sign_in(gw, email)
    client.get("/api/me")
    client.headers["X-XSRFToken"] = client.cookies["_xsrf"]
    return client


def json_body(value) -> dict:
    """Keyword arguments sending `value` as JSON the way a client can: escaped (\\ud800),
    since a lone surrogate has no UTF-8 form (httpx's own json= cannot send one)."""
    return {"content": json.dumps(value).encode(), "headers": {"Content-Type": "application/json"}}


def servers_stored(gw) -> list[tuple[str, str]]:
    return sorted((s["server_id"], s["name"]) for s in gw.cli_json("servers", "list"))


def assert_clean_log(gw) -> None:
    log = gw.log_text()
    assert "Traceback" not in log and "UnicodeEncodeError" not in log, log[-3000:]


# ------------------------------------------------------------------- finding 18


def test_lone_surrogates_in_the_api_are_a_400_naming_the_field(gw, stateless_upstream):
    admin = sign_in(gw, ADMIN)
    good = stateless_upstream.url  # reachable: only the bad field can be refused
    server_id = gw.add_server(good, ADMIN, "Kept")
    before = servers_stored(gw)
    cases = [
        ("POST", "/api/servers", {"name": BAD, "upstream_url": good}, "name"),
        ("POST", "/api/servers", {"name": "ok", "upstream_url": good + BAD}, "upstream_url"),
        ("POST", "/api/servers", {"name": "ok", "upstream_url": good, "headers": ["X-K: " + BAD]},
         "headers"),
        ("POST", "/api/servers", {"name": "a\nb", "upstream_url": good}, "name"),
        ("PATCH", f"/api/servers/{server_id}", {"name": BAD}, "name"),
        ("PATCH", f"/api/servers/{server_id}", {"upstream_url": "http://" + BAD + "/"}, "upstream_url"),
        ("POST", f"/api/servers/{server_id}/grants", {"kind": "email", "value": f"{BAD}@example.com"}, "value"),
        ("POST", f"/api/servers/{server_id}/grants", {"kind": "domain", "value": f"{BAD}.example"}, "value"),
    ]
    for method, path, body, field in cases:
        response = admin.request(method, path, **json_body(body))
        assert response.status_code == 400, (path, body, response.text)
        answer = response.json()
        assert answer["error"] == "invalid_request" and list(answer["fields"]) == [field], (body, answer)
        assert answer["error_description"].startswith(field + ":"), answer
    assert servers_stored(gw) == before
    assert admin.get(f"/api/servers/{server_id}/grants").json() == {"grants": []}
    assert_clean_log(gw)


def test_lone_surrogates_at_register_are_invalid_client_metadata_naming_the_field(gw):
    base = {"client_name": "App", "redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none"}
    cases = [
        ({"client_name": BAD}, "client_name"),
        ({"client_name": "a\x00b"}, "client_name"),
        ({"redirect_uris": ["http://127.0.0.1:9/" + BAD]}, "redirect_uri"),
        ({"client_uri": "https://app.example/" + BAD}, "client_uri"),
        ({"software_id": BAD}, "software_id"),
        ({"scope": BAD}, "scope"),
        ({"contacts": [BAD]}, "contacts"),
    ]
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as http:
        for change, field in cases:
            response = http.post("/register", **json_body({**base, **change}))
            assert response.status_code == 400, (change, response.text)
            answer = response.json()
            expected = "invalid_redirect_uri" if field == "redirect_uri" else "invalid_client_metadata"
            assert answer["error"] == expected, answer
            assert field in answer["error_description"], answer
    stored = sqlite3.connect(gw.state_dir / "gateway.db").execute("SELECT count(*) FROM clients").fetchone()[0]
    assert stored == 0
    assert_clean_log(gw)


# ------------------------------------------------------------------- finding 17


async def _token(s, email: str, server_id: str) -> str:
    user = User(f"sub-{email}", email, True, "", email)
    await s.storage.upsert_user(user)
    audience = s.config.server_resource(server_id)
    now = time.time()
    family = RefreshFamily(f"fam-{email}", "test-client", user.sub, audience, "mcp:connect mcp:invoke", now,
                           now + 86400, last_used_at=now)
    await s.storage.create_family(family, RefreshToken(f"h-{email}", family.family_id, "test-client", user.sub,
                                                       family.scope, audience, now, now + 3600, now + 86400))
    return s.tokens.mint_access_token(user, "test-client", family.scope, audience, family.family_id)


async def _in_gateway_storage(gw, job):
    services = build_services(Config.from_env(gw.env))
    await services.start(background=False)
    try:
        return await job(services)
    finally:
        await services.stop()


def test_a_lone_surrogate_tool_name_through_the_proxy_costs_no_one_else_their_usage(gw, stateless_upstream):
    """Other users' calls land in the same flush as the bad one (the recorder batches a
    second's worth); every one of them is recorded, and so is the bad one, scrubbed."""
    server_id = gw.add_server(stateless_upstream.url, ADMIN, "Usage")
    people = [f"user{n}@example.com" for n in range(5)]
    for email in people:
        gw.cli("grants", "add", server_id, "--email", email)

    async def tokens(s):
        return [await _token(s, email, server_id) for email in people]

    minted = asyncio.run(_in_gateway_storage(gw, tokens))
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=30) as http:
        def call(token: str, tool: str, n: int) -> int:
            body = {"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
            return http.post(f"/mcp/{server_id}", content=json.dumps(body).encode(),
                             headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}).status_code

        statuses = [call(minted[0], BAD, 0)]
        statuses += [call(token, f"tool-{n}", n) for n, token in enumerate(minted[1:], 1)]
    assert all(status < 500 for status in statuses), statuses

    async def recorded(s):
        deadline = time.monotonic() + 10
        while True:
            events = await s.storage.usage.recent_usage(server_id, time.time() + 60, 100)
            if len(events) >= len(people) or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.2)

    events = asyncio.run(_in_gateway_storage(gw, recorded))
    assert sorted((e.user_email, e.target) for e in events) == sorted(
        [(people[0], "x\ufffdy")] + [(people[n], f"tool-{n}") for n in range(1, len(people))])
    assert_clean_log(gw)


def usage(n: int, **change) -> UsageEvent:
    fields = dict(at=time.time() - n, server_id="srv_u", user_sub=f"sub-{n % 7}", user_email=f"u{n % 7}@example.com",
                  client_id="c", method="tools/call", target=f"tool-{n % 3}", outcome="ok", latency_ms=5.0,
                  bytes_in=10, bytes_out=10, era="2025")
    return UsageEvent(**{**fields, **change})


@run
async def test_one_event_storage_refuses_costs_only_itself(tmp_path):
    """Scrubbing covers bad text; an event that storage still refuses for its data (here an
    integer SQLite cannot hold) is dropped alone after the batch is retried one by one."""
    storage = open_storage(make_config(tmp_path).storage_url)
    await storage.open()
    metrics = Metrics()
    recorder = UsageRecorder(storage.usage, metrics)
    try:
        for n in range(300):
            recorder.record(usage(n))
            if n == 150:
                recorder.record(usage(n, target=BAD, method="tools/\udcff"))
                recorder.record(usage(n, bytes_in=2 ** 80))  # OverflowError in the SQLite binding
        await recorder.flush()
        events = await storage.usage.recent_usage("srv_u", time.time() + 60, 1000)
        daily = await storage.usage.usage_aggregates("srv_u", "1970-01-01")
    finally:
        await storage.close()
    assert len(events) == 301  # 300 good + the scrubbed one, of every user
    assert {e.user_sub for e in events} == {f"sub-{n}" for n in range(7)}
    assert sum(row.calls for row in daily) == 301
    assert {e.target for e in events} == {"tool-0", "tool-1", "tool-2", "x\ufffdy"}
    assert {e.method for e in events} == {"tools/call", "tools/\ufffd"}
    assert metrics.value("usage_events_dropped_total") == 1
    assert metrics.value("usage_events_recorded_total") == 301


@run
async def test_usage_waits_out_a_storage_outage(tmp_path):
    """A locked database is not the events' fault: kept for the next flush, then recorded."""
    config = make_config(tmp_path)
    storage = open_storage(config.storage_url)
    await storage.open()
    metrics = Metrics()
    recorder = UsageRecorder(storage.usage, metrics)
    holder = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    try:
        for n in range(50):
            recorder.record(usage(n))
        holder.execute("BEGIN EXCLUSIVE")
        await recorder.flush()
        assert metrics.value("usage_events_recorded_total") == 0
        assert metrics.value("usage_events_dropped_total") == 0
        holder.execute("ROLLBACK")
        await recorder.flush()
        events = await storage.usage.recent_usage("srv_u", time.time() + 60, 1000)
    finally:
        holder.close()
        await storage.close()
    assert len(events) == 50
    assert metrics.value("usage_events_recorded_total") == 50
