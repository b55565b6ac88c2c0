"""Service-level rules of the owner dashboard (services.dashboard, probe, install,
reports) on a real SqliteStorage file and a real upstream MCP server: who may do what,
registration field errors, Test connection, sharing, usage reports, authorizations."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import tornado.httpserver
import tornado.web

from config import Config
from services import build_services
from services.authserver.claims import InvalidToken
from services.common.errors import FieldErrors, Forbidden, NotFound, NotSignedIn
from services.dashboard.install import install_snippets
from services.dashboard.reports import parse_range, percentile
from services.dashboard.views import Actor
from storage.base import (
    LATENCY_BUCKETS,
    Consent,
    RefreshFamily,
    RefreshToken,
    UsageEvent,
    User,
    latency_bucket,
)
from tests.support.fake_upstream import RawUpstream
from tests.support.inprocess import make_config as base_config
from tests.support.inprocess import run
from tests.support.ports import bind_unused_port

ANA = User("sub-ana", "ana@example.com", True, "", "Ana", last_login_at=1.0)
BOB = User("sub-bob", "bob@example.com", True, "", "Bob", last_login_at=1.0)
CAROL = User("sub-carol", "carol@corp.example", True, "corp.example", "Carol", last_login_at=1.0)
ADMIN = User("sub-admin", "root@example.com", True, "", "Root", last_login_at=1.0)
UNVERIFIED = User("sub-unv", "ana@example.com", False, "", "Fake Ana", last_login_at=1.0)




def make_config(tmp_path, **env) -> Config:
    # Ana registers the loopback test upstream, which only administrators may: she is one.
    return base_config(tmp_path, **{"MCPGW_UPSTREAM_ALLOW": "127.0.0.0/8",
                                    "MCPGW_ADMIN_EMAILS": "root@example.com,ana@example.com", **env})


class Clock:
    """A monotonic clock the test moves instead of sleeping for a cache to expire."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def instance(tmp_path, clock=time.monotonic, **env):
    services = build_services(make_config(tmp_path, **env), clock=clock)
    await services.start(background=False)
    try:
        for user in (ANA, BOB, CAROL, ADMIN, UNVERIFIED):
            await services.storage.upsert_user(user)
        yield services
    finally:
        await services.stop()


async def actor(s, user: User) -> Actor:
    return await s.dashboard.actor({"sub": user.sub, "email": user.email})


async def ana_server(s, upstream_url: str, **form) -> str:
    view = await s.dashboard.register(await actor(s, ANA), {"name": "Ana's tools", "upstream_url": upstream_url, **form})
    return view.server.server_id


async def field_errors(awaitable) -> dict[str, str]:
    with pytest.raises(FieldErrors) as caught:
        await awaitable
    return caught.value.errors


# --------------------------------------------------------------------------- who


@run
async def test_actor_needs_a_known_signed_in_user_and_admins_need_a_verified_listed_email(tmp_path):
    async with instance(tmp_path) as s:
        with pytest.raises(NotSignedIn):
            await s.dashboard.actor(None)
        with pytest.raises(NotSignedIn):
            await s.dashboard.actor({"sub": "nobody"})
        assert (await actor(s, ADMIN)).is_admin
        assert not (await actor(s, BOB)).is_admin
        await s.storage.upsert_user(User("sub-fake-root", "root@example.com", False, "", "x"))
        fake = await s.dashboard.actor({"sub": "sub-fake-root"})
        assert not fake.is_admin and fake.email == ""


# ------------------------------------------------------------------ registration


@run
async def test_register_field_errors_bad_scheme_unreachable_and_header(tmp_path):
    async with instance(tmp_path) as s:
        ana = await actor(s, ANA)
        errors = await field_errors(s.dashboard.register(ana, {"name": "", "upstream_url": "ftp://x.example/mcp"}))
        assert "name" in errors and "http" in errors["upstream_url"]
        errors = await field_errors(s.dashboard.register(ana, {"name": "x", "upstream_url": "http://127.0.0.1:9/mcp"}))
        assert errors["upstream_url"].startswith("Unreachable")
        errors = await field_errors(
            s.dashboard.register(ana, {"name": "x", "upstream_url": "http://127.0.0.1:9/mcp", "headers": "Host: evil"})
        )
        assert "managed by the gateway" in errors["headers"]
        assert await s.storage.list_servers() == []  # nothing half-written


@run
async def test_register_refused_by_the_ssrf_guard_says_so(tmp_path):
    async with instance(tmp_path, MCPGW_UPSTREAM_ALLOW="") as s:
        ana = await actor(s, ANA)
        for url in ("http://127.0.0.1:8000/mcp", "http://169.254.169.254/latest", "http://10.1.2.3/mcp"):
            errors = await field_errors(s.dashboard.register(ana, {"name": "x", "upstream_url": url}))
            assert "address guard" in errors["upstream_url"], errors
            assert "refused" in errors["upstream_url"]


@run
async def test_internal_upstreams_are_for_administrators(tmp_path):
    """Finding 20 at the service: Bob (no role) gets public addresses only, by literal or by
    name; what he is refused is never probed or stored."""
    async with instance(tmp_path, MCPGW_UPSTREAM_ALLOW="127.0.0.0/8,10.9.0.0/16") as s:
        bob = await actor(s, BOB)
        for url in ("http://127.0.0.1:9/mcp", "http://localhost:9/mcp", "http://10.9.8.7/mcp", "http://[::ffff:127.0.0.1]:9/"):
            errors = await field_errors(s.dashboard.register(bob, {"name": "x", "upstream_url": url}))
            assert errors["upstream_url"].startswith("Only administrators"), (url, errors)
        errors = await field_errors(s.dashboard.register(bob, {"name": "x", "upstream_url": "http://no-such-host.invalid/"}))
        assert "could not be resolved" in errors["upstream_url"]
        assert await s.storage.list_servers() == []
        # An administrator passes the guard (and then meets the reachability probe).
        errors = await field_errors(s.dashboard.register(await actor(s, ADMIN), {"name": "x", "upstream_url": "http://127.0.0.1:9/mcp"}))
        assert errors["upstream_url"].startswith("Unreachable")


@run
async def test_register_needs_a_verified_email(tmp_path):
    async with instance(tmp_path) as s:
        with pytest.raises(Forbidden):
            await s.dashboard.register(await actor(s, UNVERIFIED), {"name": "x", "upstream_url": "http://127.0.0.1:9/"})


def test_register_and_test_connection_against_a_real_upstream(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            ana = await actor(s, ANA)
            view = await s.dashboard.register(
                ana, {"name": "Ana's tools", "upstream_url": upstream.url, "headers": "X-Api-Key: k1\n", "forward_identity": "on"}
            )
            server = view.server
            assert server.owner_sub == ANA.sub and server.owner_email == ANA.email and server.forward_identity
            assert view.header_names == ["X-Api-Key"] and view.role == "owner"
            assert s.servers.upstream_headers(server) == {"X-Api-Key": "k1"}
            result = await s.dashboard.test_connection(ana, server.server_id)
            assert result.ok, result.error
            assert result.server_name == "upstream-under-test"
            assert result.protocol_version == "2026-07-28"
            assert {"echo", "count", "fail"} <= set(result.tools)
    main()


def test_test_connection_reports_the_exact_error(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            ana = await actor(s, ANA)
            server_id = await ana_server(s, upstream.url)
            # The upstream goes away after registration: the probe names the failure.
            await s.servers.update(server_id, upstream_url="http://127.0.0.1:9/mcp", internal_allowed=True)
            result = await s.dashboard.test_connection(ana, server_id)
            assert not result.ok and "127.0.0.1:9" in result.error
    main()


class LegacyMcp(tornado.web.RequestHandler):
    """A 2025-era server: no server/discover, a session from initialize, SSE answers."""

    sessions: set[str] = set()
    deleted: list[str] = []

    def check_xsrf_cookie(self):
        pass

    def post(self):
        message = json.loads(self.request.body)
        method = message.get("method")
        if method == "server/discover":
            self.finish({"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "Method not found"}})
            return
        if method == "initialize":
            self.set_header("Mcp-Session-Id", "legacy-session-1")
            LegacyMcp.sessions.add("legacy-session-1")
            self.finish({"jsonrpc": "2.0", "id": message["id"], "result": {
                "protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                "serverInfo": {"name": "legacy-server", "version": "0.9.1"}}})
            return
        if self.request.headers.get("Mcp-Session-Id") not in LegacyMcp.sessions:
            self.set_status(400)
            self.finish("missing session")
            return
        if method == "notifications/initialized":
            self.set_status(202)
            self.finish()
            return
        if method == "tools/list":
            self.set_header("Content-Type", "text/event-stream")
            body = {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": [{"name": "legacy_tool", "inputSchema": {}}]}}
            self.finish(b"event: message\ndata: " + json.dumps(body).encode() + b"\n\n")

    def delete(self):
        LegacyMcp.deleted.append(self.request.headers.get("Mcp-Session-Id", ""))
        self.set_status(204)
        self.finish()


@run
async def test_test_connection_falls_back_to_the_initialize_handshake(tmp_path):
    sock, port = bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/mcp", LegacyMcp)]))
    server.add_sockets([sock])
    try:
        async with instance(tmp_path) as s:
            ana = await actor(s, ANA)
            server_id = await ana_server(s, f"http://127.0.0.1:{port}/mcp")
            result = await s.dashboard.test_connection(ana, server_id)
            assert result.ok, result.error
            assert (result.server_name, result.server_version) == ("legacy-server", "0.9.1")
            assert result.protocol_version == "2025-06-18" and "initialize" in result.era
            assert result.tools == ["legacy_tool"]
            assert LegacyMcp.deleted == ["legacy-session-1"]  # the probe's session is ended
    finally:
        server.stop()


@run
async def test_test_connection_reports_a_too_deep_answer_as_unreadable(tmp_path):
    """An upstream answering JSON nested 100,000 deep (plain JSON, then an SSE event) is an
    unreadable answer in the result, not a RecursionError out of the probe."""
    deep = b"[" * 100_000 + b"]" * 100_000

    def answer(content_type: bytes, body: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    for content_type, body in ((b"application/json", deep), (b"text/event-stream", b"data: " + deep + b"\n\n")):
        async def script(exchange, content_type=content_type, body=body):
            exchange.write(answer(content_type, body))

        async with RawUpstream(script) as raw, instance(tmp_path) as s:
            ana = await actor(s, ANA)
            server_id = await ana_server(s, raw.url + "/mcp")
            result = await s.dashboard.test_connection(ana, server_id)
            assert not result.ok
            assert "not a JSON-RPC response" in result.error, result.error
            assert "Recursion" not in result.error


# ------------------------------------------------------------------ who may do what


def test_non_owner_can_neither_read_edit_share_test_nor_delete(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            server_id = await ana_server(s, upstream.url)
            bob = await actor(s, BOB)
            d = s.dashboard
            for attempt in (d.server(bob, server_id), *owner_only_calls(d, bob, server_id)):
                with pytest.raises(NotFound):
                    await attempt
            assert (await s.servers.get(server_id)).name == "Ana's tools"
            assert await s.storage.grants_for(server_id) == []
            overview = await d.overview(bob)
            assert overview == {"mine": [], "shared": [], "all": []}
    main()


def owner_only_calls(d, person, server_id: str, existing_grant=("email", "ana@example.com")) -> list:
    """Every dashboard operation reserved to the owner (and admins), as `person` would try it;
    the removal aims at `existing_grant`."""
    return [
        d.manage(person, server_id),
        d.edit(person, server_id, {"name": "mine now"}),
        d.delete(person, server_id),
        d.test_connection(person, server_id),
        d.sharing(person, server_id),
        d.add_grant(person, server_id, "email", "eve@example.com"),
        d.remove_grant(person, server_id, *existing_grant),
        d.usage(person, server_id, 7),
        d.usage_csv(person, server_id, 7),
    ]


def test_people_it_is_shared_with_see_the_install_panel_only(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            ana, bob, carol = await actor(s, ANA), await actor(s, BOB), await actor(s, CAROL)
            d = s.dashboard
            server_id = await ana_server(s, upstream.url, headers="Authorization: Bearer secret")
            await d.add_grant(ana, server_id, "email", "Bob@Example.com")
            await d.add_grant(ana, server_id, "domain", "corp.example")
            for person, why in ((bob, "email"), (carol, "domain")):
                view = await d.server(person, server_id)
                assert view.role == why and not view.can_manage
                assert view.install["mcp_url"].endswith("/mcp/" + server_id)
                assert "upstream_url" not in view.as_dict() and view.header_names == []
                assert [v.server.server_id for v in (await d.overview(person))["shared"]] == [server_id]
                for attempt in owner_only_calls(d, person, server_id, ("domain", "corp.example")):
                    with pytest.raises(Forbidden):
                        await attempt
    main()


def test_admins_see_and_manage_every_server(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            admin = await actor(s, ADMIN)
            server_id = await ana_server(s, upstream.url)
            overview = await s.dashboard.overview(admin)
            assert [v.server.server_id for v in overview["all"]] == [server_id]
            assert (await s.dashboard.server(admin, server_id)).role == "admin"
            await s.dashboard.edit(admin, server_id, {"name": "Renamed by admin"})
            await s.dashboard.add_grant(admin, server_id, "email", "bob@example.com")
            await s.dashboard.usage(admin, server_id, 7)
            await s.dashboard.delete(admin, server_id)
            assert await s.storage.get_server(server_id) is None
    main()


def test_edit_keeps_replaces_or_clears_upstream_headers(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            ana = await actor(s, ANA)
            server_id = await ana_server(s, upstream.url, headers="X-A: 1")
            d = s.dashboard
            view = await d.edit(ana, server_id, {"name": " New name ", "upstream_url": upstream.url, "headers": ""})
            assert view.server.name == "New name" and view.header_names == ["X-A"]
            view = await d.edit(ana, server_id, {"headers": "X-B: 2\nX-C: 3"})
            assert view.header_names == ["X-B", "X-C"]
            view = await d.edit(ana, server_id, {"clear_headers": "1", "forward_identity": "on"})
            assert view.header_names == [] and view.server.forward_identity
            errors = await field_errors(d.edit(ana, server_id, {"upstream_url": "http://127.0.0.1:9/x", "name": ""}))
            assert set(errors) == {"upstream_url", "name"}
            assert (await s.servers.get(server_id)).upstream_url == upstream.url
    main()


def test_delete_drops_grants_sessions_and_access(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            ana = await actor(s, ANA)
            server_id = await ana_server(s, upstream.url)
            await s.dashboard.add_grant(ana, server_id, "email", "bob@example.com")
            await s.sessions.create(user_sub=BOB.sub, server_id=server_id, upstream_session_id="u", protocol_version="")
            from services.authserver.claims import principal_of

            assert (await s.access.decide(principal_of(BOB), server_id)).allowed
            await s.dashboard.delete(ana, server_id)
            assert not (await s.access.decide(principal_of(BOB), server_id)).allowed
            assert await s.storage.grants_for(server_id) == []
            assert await s.storage.count_sessions(server_id, time.time()) == 0
            with pytest.raises(NotFound):
                await s.dashboard.delete(ana, server_id)
    main()


# ----------------------------------------------------------------------- sharing


def test_sharing_list_shows_who_signed_in_and_when_they_last_used_it(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            ana = await actor(s, ANA)
            server_id = await ana_server(s, upstream.url)
            await s.dashboard.add_grant(ana, server_id, "email", "bob@example.com")
            await s.dashboard.add_grant(ana, server_id, "domain", "corp.example")
            await s.dashboard.add_grant(ana, server_id, "email", "never@example.com")
            now = time.time()
            await s.storage.usage.record_usage([usage(server_id, CAROL, now - 60)])
            grants = {(g.grant.kind, g.grant.value): g for g in await s.dashboard.sharing(ana, server_id)}
            bob = grants[("email", "bob@example.com")].reached
            assert [(r.email, r.last_used_at) for r in bob] == [("bob@example.com", 0.0)]
            carol = grants[("domain", "corp.example")].reached
            assert [(r.email, r.last_used_at) for r in carol] == [("carol@corp.example", now - 60)]
            assert grants[("email", "never@example.com")].reached == []
            assert (await field_errors(s.dashboard.add_grant(ana, server_id, "email", "not-an-email"))).keys() == {"value"}
            assert (await field_errors(s.dashboard.add_grant(ana, server_id, "group", "x"))).keys() == {"kind"}
            with pytest.raises(NotFound):
                await s.dashboard.remove_grant(ana, server_id, "email", "nobody@example.com")
    main()


def test_removing_a_grant_is_seen_by_another_instance_within_three_seconds(tmp_path, upstream):
    @run
    async def main():
        from services.authserver.claims import principal_of

        clock = Clock()
        async with instance(tmp_path) as a, instance(tmp_path, clock=clock) as b:
            ana = await actor(a, ANA)
            server_id = await ana_server(a, upstream.url)
            await a.dashboard.add_grant(ana, server_id, "email", "bob@example.com")
            assert (await b.access.decide(principal_of(BOB), server_id)).allowed  # cached on b
            await a.dashboard.remove_grant(ana, server_id, "email", "bob@example.com")
            assert not (await a.access.decide(principal_of(BOB), server_id)).allowed  # at once here
            clock.now += 1.0
            assert (await b.access.decide(principal_of(BOB), server_id)).allowed  # b's rules still hold
            clock.now += 2.1  # 3.1 s after b read them
            # b re-reads them now; a loaded machine may take longer than the 0.2 s a caller
            # waits before it is answered from the cache, so ask until the read has landed
            # (the clock stands still: only the re-read can change the answer).
            for _ in range(100):
                if not (await b.access.decide(principal_of(BOB), server_id)).allowed:
                    break
            else:
                raise AssertionError("b never re-read the sharing rules after their 3 s")
    main()


# ------------------------------------------------------------------------- usage


def usage(server_id: str, user: User, at: float, tool: str = "echo", latency: float = 10.0, outcome: str = "ok"):
    return UsageEvent(at, server_id, user.sub, user.email, "client-1", "tools/call", tool, outcome, latency, 10, 10, "2025")


def test_percentile_from_buckets_is_close_to_the_true_value():
    values = [1.0 + i * 0.5 for i in range(1000)]  # 1 .. 500.5 ms
    hist = [0] * LATENCY_BUCKETS
    for v in values:
        hist[latency_bucket(v)] += 1
    p50, p95 = percentile(hist, 0.5, max(values)), percentile(hist, 0.95, max(values))
    assert abs(p50 - 250.75) / 250.75 < 0.15
    assert abs(p95 - 475.0) / 475.0 < 0.15
    assert percentile([0] * LATENCY_BUCKETS, 0.5, 0) is None
    one = [0] * LATENCY_BUCKETS
    one[latency_bucket(42)] = 1
    assert percentile(one, 0.95, 42.0) <= 42.0
    assert parse_range("24h") == 1 and parse_range("30d") == 30 and parse_range(None) == 7
    with pytest.raises(ValueError):
        parse_range("0")


def test_usage_report_totals_chart_tables_recent_and_csv(tmp_path, upstream):
    @run
    async def main():
        async with instance(tmp_path) as s:
            ana = await actor(s, ANA)
            server_id = await ana_server(s, upstream.url)
            now = time.time()
            events = [usage(server_id, BOB, now - 3 * 86400 + i, "search", 100.0) for i in range(10)]
            events += [usage(server_id, CAROL, now - 600 + i, "echo", 20.0 + i) for i in range(20)]
            events += [usage(server_id, CAROL, now - 300, "=cmd()", 5.0, outcome="-32603")]
            events += [usage("srv_other", BOB, now - 10, "search")]
            await s.storage.usage.record_usage(events)
            await s.sessions.create(user_sub=BOB.sub, server_id=server_id, upstream_session_id="x", protocol_version="")

            week = await s.dashboard.usage(ana, server_id, 7)
            assert (week.calls, week.errors, week.active_sessions) == (31, 1, 1)
            assert abs(week.error_rate - 1 / 31) < 1e-9
            assert len(week.chart.bars) == 7 and sum(b.calls for b in week.chart.bars) == 31
            assert max(b.height for b in week.chart.bars) > 0
            assert [(t.target, t.calls) for t in week.top_tools][:2] == [("echo", 20), ("search", 10)]
            rows = {(r.user_email, r.target): r for r in week.table}
            search = rows[("bob@example.com", "search")]
            assert (search.calls, search.errors) == (10, 0) and 60 < search.p50_ms <= 100 and search.p95_ms <= 100
            echo = rows[("carol@corp.example", "echo")]
            assert 20 <= echo.p50_ms <= 39 and echo.p95_ms <= 39

            day = await s.dashboard.usage(ana, server_id, 1)
            assert day.calls == 21 and day.chart.unit == "hour" and len(day.chart.bars) == 25

            # Recent calls, newest first, in pages of 50 with a cursor.
            assert [e.target for e in week.recent][:1] == ["=cmd()"] and week.next_before is None
            await s.storage.usage.record_usage([usage(server_id, BOB, now - 5000 + i, "bulk") for i in range(60)])
            first = await s.dashboard.usage(ana, server_id, 7)
            assert len(first.recent) == 50 and first.next_before is not None
            second = await s.dashboard.usage(ana, server_id, 7, first.next_before)
            assert len(second.recent) == 91 - 50 and second.next_before is None

            text = await s.dashboard.usage_csv(ana, server_id, 7)
            table = list(csv.reader(io.StringIO(text)))
            assert table[0][:4] == ["range", "user_email", "user_sub", "tool"]
            assert ["'=cmd()"] == [r[3] for r in table[1:] if "cmd" in r[3]]  # no formula injection
            assert sum(int(r[4]) for r in table[1:]) == 91
    main()


# --------------------------------------------------------------- authorizations


async def grant_family(s, user: User, client_id: str, family_id: str, audience: str) -> str:
    now = time.time()
    family = RefreshFamily(family_id, client_id, user.sub, audience, "mcp:connect mcp:invoke", now, now + 86400,
                           last_used_at=now)
    token = RefreshToken("h-" + family_id, family_id, client_id, user.sub, family.scope, audience, now, now + 3600, now + 86400)
    await s.storage.create_family(family, token)
    await s.storage.put_consent(Consent(user.sub, client_id, audience, family.scope, now))
    return s.tokens.mint_access_token(user, client_id, family.scope, audience, family_id)


@run
async def test_my_authorizations_list_and_revoke(tmp_path):
    async with instance(tmp_path) as s:
        client, _ = await s.clients.register({"client_name": "Cursor", "redirect_uris": ["http://127.0.0.1:9/cb"],
                                               "token_endpoint_auth_method": "none"})
        other, _ = await s.clients.register({"client_name": "Other", "redirect_uris": ["https://app.example/cb"],
                                              "token_endpoint_auth_method": "none"})
        base = s.config.base_resource
        access = await grant_family(s, ANA, client.client_id, "fam-1", base + "srv_x")
        await grant_family(s, ANA, client.client_id, "fam-2", base)
        await grant_family(s, ANA, other.client_id, "fam-3", base)
        bobs = await grant_family(s, BOB, client.client_id, "fam-bob", base)
        ana, bob = await actor(s, ANA), await actor(s, BOB)

        found = {a.client_id: a for a in await s.dashboard.authorizations(ana)}
        assert set(found) == {client.client_id, other.client_id}
        cursor = found[client.client_id]
        assert cursor.client_name == "Cursor" and cursor.redirect_hosts == ["127.0.0.1"]
        assert set(cursor.servers) == {"srv_x", "all servers shared with you"} and cursor.last_used_at > 0

        assert await s.tokens.verify_access_token(access)
        assert await s.dashboard.revoke_authorization(ana, client.client_id) == 2
        with pytest.raises(InvalidToken):
            await s.tokens.verify_access_token(access)
        assert (await s.storage.get_family("fam-1")).revoked_at > 0
        assert await s.storage.get_consent(ANA.sub, client.client_id, base) is None
        assert [a.client_id for a in await s.dashboard.authorizations(ana)] == [other.client_id]
        # Bob's authorization of the same client is untouched, and Ana cannot revoke it.
        assert await s.tokens.verify_access_token(bobs)
        with pytest.raises(NotFound):
            await s.dashboard.revoke_authorization(ana, client.client_id)
        with pytest.raises(NotFound):
            await s.dashboard.revoke_authorization(bob, other.client_id)


# ----------------------------------------------------------------------- install


def test_install_snippets():
    url = "https://gw.example/mcp/srv_abc"
    snippets = install_snippets("Ana's Tools!", url)
    assert snippets["name"] == "ana-s-tools"
    cursor = urlsplit(snippets["cursor_deeplink"])
    assert (cursor.scheme, cursor.netloc, cursor.path) == ("cursor", "anysphere.cursor-deeplink", "/mcp/install")
    query = parse_qs(cursor.query)
    assert query["name"] == ["ana-s-tools"]
    assert json.loads(base64.b64decode(query["config"][0])) == {"url": url}
    assert snippets["vscode_deeplink"].startswith("vscode:mcp/install?")
    vscode = json.loads(unquote(snippets["vscode_deeplink"].split("?", 1)[1]))
    assert vscode == {"name": "ana-s-tools", "type": "http", "url": url}
    assert snippets["claude_command"] == f"claude mcp add --transport http ana-s-tools {url}"
    assert json.loads(snippets["json_config"]) == {"mcpServers": {"ana-s-tools": {"type": "http", "url": url}}}
    assert snippets["inspector_command"] == f"npx @modelcontextprotocol/inspector --transport http --server-url {url}"
