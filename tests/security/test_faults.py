"""Fault tests with real processes: kill -9 of the gateway during writes and a restart on
the same SQLite file (nothing acknowledged lost, nothing half-written), an upstream that
refuses, hangs, sends garbage or dies mid-answer (a clear JSON-RPC error with the right
status, everyone else still served, recovery once the fault ends), the identity provider
down or hanging (a clear error page, sign-in again once it is back), and no descriptor or
memory leak across 500 failed proxied calls (measured before and after)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support.browser import ScriptedBrowser
from tests.support.faults import (
    SSE_EVENT,
    ScriptedUpstream,
    TcpRelay,
    dev_sign_in,
    fd_count,
    idp_sign_in,
    kill9,
    rss_bytes,
)
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import REDIRECT, access_token, register_public_client

UPSTREAM_TIMEOUT_S = 2
OWNER = {"email": "fault.owner@example.com"}
ACCEPT = "application/json, text/event-stream"
LEGACY = "2025-11-25"
FLAKY, STEADY = "srv_fault_flaky", "srv_fault_steady"


def no_traceback(gw: GatewayProcess) -> None:
    log = gw.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


# ------------------------------------------------------------------ upstream faults


@dataclass
class ProxyRig:
    gw: GatewayProcess
    flaky: ScriptedUpstream
    steady: ScriptedUpstream
    token: str
    http: httpx.Client = field(repr=False)

    def call(self, server_id: str, request_id: int, method: str = "resources/list") -> httpx.Response:
        return self.http.post(f"/mcp/{server_id}", content=json.dumps(rpc(method, request_id)), headers={
            "Accept": ACCEPT, "Content-Type": "application/json", "MCP-Protocol-Version": LEGACY,
            "Authorization": f"Bearer {self.token}"})

    def assert_served(self, server_id: str, request_id: int) -> None:
        response = self.call(server_id, request_id)
        assert response.status_code == 200, (response.status_code, response.text)
        assert response.json() == {"jsonrpc": "2.0", "id": request_id, "result": {"ok": True}}


async def _dev_token(gw: GatewayProcess) -> str:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Fault tests")
        async with ScriptedBrowser() as browser:
            return await access_token(gw.url, http, browser, client_id, OWNER)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    flaky, steady = ScriptedUpstream().start(), ScriptedUpstream().start()
    gw = GatewayProcess(tmp_path_factory.mktemp("faults-proxy"),
                        extra_env={"MCPGW_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT_S)})
    gw.start()
    try:
        gw.add_server(flaky.url, OWNER["email"], "Flaky", "--id", FLAKY)
        gw.add_server(steady.url, OWNER["email"], "Steady", "--id", STEADY)
        token = asyncio.run(_dev_token(gw))
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=30) as http:
            yield ProxyRig(gw, flaky, steady, token, http)
    finally:
        gw.stop()
        flaky.stop()
        steady.stop()


@pytest.fixture
def proxy(rig):
    """The rig with the flaky upstream healthy again, checked to serve, before and after."""
    rig.flaky.mode = "ok"
    rig.flaky.listen()
    rig.assert_served(FLAKY, 1)
    yield rig
    rig.flaky.release()
    rig.flaky.mode = "ok"
    rig.flaky.listen()
    assert rig.gw._process.poll() is None, "the gateway died"
    no_traceback(rig.gw)


def jsonrpc_error(response: httpx.Response, status: int, request_id: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == request_id, body
    assert isinstance(body["error"]["code"], int) and body["error"]["message"].strip(), body
    assert "Traceback" not in response.text
    return body


def test_upstream_refusing_is_a_502_while_others_are_served_and_it_recovers(proxy):
    proxy.flaky.refuse()
    for request_id in range(10, 15):
        jsonrpc_error(proxy.call(FLAKY, request_id), 502, request_id)
        proxy.assert_served(STEADY, request_id)
    proxy.flaky.listen()
    proxy.assert_served(FLAKY, 20)
    assert proxy.flaky.counts["ok"] >= 2


def test_upstream_hanging_is_a_504_while_others_are_served_and_it_recovers(proxy):
    proxy.flaky.mode = "hang"
    outcome: dict = {}

    def hanging_call() -> None:
        with httpx.Client(base_url=proxy.gw.url, trust_env=False, timeout=30) as http:
            outcome["response"] = http.post(f"/mcp/{FLAKY}", content=json.dumps(rpc("resources/list", 30)), headers={
                "Accept": ACCEPT, "Content-Type": "application/json", "MCP-Protocol-Version": LEGACY,
                "Authorization": f"Bearer {proxy.token}"})

    caller = threading.Thread(target=hanging_call)
    caller.start()
    deadline = time.monotonic() + 10
    while proxy.flaky.counts["hang"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.flaky.counts["hang"] == 1, "the call never reached the upstream"
    # While the flaky upstream holds its call, the other server is served.
    for request_id in range(31, 36):
        proxy.assert_served(STEADY, request_id)
    assert "response" not in outcome, "the hanging call ended before the others were served"
    caller.join(UPSTREAM_TIMEOUT_S + 20)
    assert not caller.is_alive()
    jsonrpc_error(outcome["response"], 504, 30)
    # The gateway let go of the silent upstream connection.
    deadline = time.monotonic() + 5
    while proxy.flaky.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.flaky.open_connections == 0
    proxy.flaky.mode = "ok"
    proxy.assert_served(FLAKY, 37)


def test_upstream_sending_garbage_is_a_502_and_it_recovers(proxy):
    proxy.flaky.mode = "garbage"
    for request_id in range(40, 45):
        body = jsonrpc_error(proxy.call(FLAKY, request_id), 502, request_id)
        assert "SSH-2.0" not in json.dumps(body)  # the upstream's bytes are not relayed
        proxy.assert_served(STEADY, request_id)
    proxy.flaky.mode = "ok"
    proxy.assert_served(FLAKY, 46)


def test_upstream_dying_inside_a_json_answer_is_a_502_and_it_recovers(proxy):
    """Issue 7 finding 14: the client used to get a closed connection and no response."""
    proxy.flaky.mode = "die-json"
    for request_id in range(50, 53):
        jsonrpc_error(proxy.call(FLAKY, request_id), 502, request_id)
        proxy.assert_served(STEADY, request_id)
    proxy.flaky.mode = "ok"
    proxy.assert_served(FLAKY, 54)


def test_upstream_dying_mid_stream_ends_the_stream_after_the_complete_event_and_it_recovers(proxy):
    proxy.flaky.mode = "die-sse"
    for request_id in range(60, 63):
        with proxy.http.stream("POST", f"/mcp/{FLAKY}", content=json.dumps(rpc("tools/call", request_id, name="x")),
                               headers={"Accept": ACCEPT, "Content-Type": "application/json",
                                        "MCP-Protocol-Version": LEGACY,
                                        "Authorization": f"Bearer {proxy.token}"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            body = b"".join(response.iter_raw())  # raises unless the stream ends cleanly
        # Only the complete event reaches the client, never half of the next one.
        assert body.replace(b": keepalive\n\n", b"") == SSE_EVENT, body
        proxy.assert_served(STEADY, request_id)
    proxy.flaky.mode = "ok"
    proxy.assert_served(FLAKY, 64)


def test_no_descriptor_or_memory_leak_across_500_failed_calls(proxy):
    pid = proxy.gw._process.pid

    def failures(count: int, first_id: int) -> None:
        for request_id in range(first_id, first_id + count):
            # Half refused connections, half garbage answers: two different failure paths.
            if request_id % 2:
                proxy.flaky.refuse()
            else:
                proxy.flaky.mode = "garbage"
                proxy.flaky.listen()
            jsonrpc_error(proxy.call(FLAKY, request_id), 502, request_id)

    def settled_fds(limit: int) -> int:
        deadline = time.monotonic() + 5
        count = fd_count(pid)
        while count > limit and time.monotonic() < deadline:
            time.sleep(0.1)
            count = fd_count(pid)
        return count

    failures(50, 1000)  # warm up: pools, caches and lazily built objects exist now
    time.sleep(0.5)
    fds_before, rss_before = fd_count(pid), rss_bytes(pid)
    failures(500, 2000)
    fds_after = settled_fds(fds_before + 5)
    rss_after = rss_bytes(pid)
    print(f"\n500 failed proxied calls: fds {fds_before} -> {fds_after}, "
          f"RSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB "
          f"({(rss_after - rss_before) / 2**10:+.0f} KiB)")
    assert fds_after <= fds_before + 5, (fds_before, fds_after)
    assert rss_after - rss_before < 16 * 2**20, (rss_before, rss_after)
    proxy.flaky.mode = "ok"
    proxy.flaky.listen()
    proxy.assert_served(FLAKY, 3000)


# ------------------------------------------------------------------- kill -9 during writes

ROUNDS = 3
WRITE_SECONDS = 1.5  # writers run this long before the kill (bounded by count too)
MAX_WRITES_PER_WRITER = 400


@dataclass
class Acked:
    clients: dict[str, str] = field(default_factory=dict)  # client_id -> client_name
    servers: dict[str, str] = field(default_factory=dict)  # server_id -> name
    grants: set[tuple[str, str]] = field(default_factory=set)  # (server_id, e-mail)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _register_writer(url: str, round_no: int, writer: int, acked: Acked, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
        for n in range(MAX_WRITES_PER_WRITER):
            if stop.is_set():
                return
            name = f"kill-{round_no}-{writer}-{n}"
            try:
                response = http.post("/register", json={
                    "client_name": name, "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
                }, headers={"X-Forwarded-For": f"10.{round_no}.{writer}.{n % 250}"})
            except httpx.HTTPError:
                return  # the gateway is gone: this write was never acknowledged
            if response.status_code == 201:
                with acked.lock:
                    acked.clients[response.json()["client_id"]] = name
            else:
                assert response.status_code < 500, (response.status_code, response.text)


def _server_writer(url: str, cookies, upstream: str, round_no: int, writer: int, acked: Acked,
                   stop: threading.Event) -> None:
    with httpx.Client(base_url=url, trust_env=False, timeout=10, cookies=cookies) as http:
        xsrf = http.cookies["_xsrf"]
        for n in range(MAX_WRITES_PER_WRITER):
            if stop.is_set():
                return
            name = f"kill-{round_no}-{writer}-{n}"
            try:
                created = http.post("/api/servers", json={
                    "name": name, "upstream_url": upstream, "headers": f"X-Api-Key: key-{name}",
                }, headers={"X-XSRFToken": xsrf})
                if created.status_code != 201:
                    assert created.status_code < 500, (created.status_code, created.text)
                    continue
                server_id = created.json()["server_id"]
                with acked.lock:
                    acked.servers[server_id] = name
                friend = f"friend-{round_no}-{writer}-{n}@example.com"
                granted = http.post(f"/api/servers/{server_id}/grants", json={"kind": "email", "value": friend},
                                    headers={"X-XSRFToken": xsrf})
            except httpx.HTTPError:
                return
            if granted.status_code == 201:
                with acked.lock:
                    acked.grants.add((server_id, friend))


def _check_everything_acknowledged_is_there(gw: GatewayProcess, cookies, acked: Acked) -> None:
    from storage import open_storage  # the gateway's own reader, on the file it left behind

    async def read_clients():
        storage = open_storage(gw.env["MCPGW_STORAGE"])
        await storage.open()
        try:
            return {cid: await storage.get_client(cid) for cid in acked.clients}
        finally:
            await storage.close()

    found = asyncio.run(read_clients())
    missing = [cid for cid, client in found.items() if client is None]
    assert not missing, f"{len(missing)} acknowledged registrations lost: {missing[:5]}"
    for cid, client in found.items():
        assert client.client_name == acked.clients[cid] and client.redirect_uris == (REDIRECT,), client

    with httpx.Client(base_url=gw.url, trust_env=False, timeout=10, cookies=cookies) as http:
        assert http.get("/readyz").status_code == 200
        listed = http.get("/api/servers")
        assert listed.status_code == 200, listed.text
        everything = listed.json()
        owned = {view["server_id"]: view for views in everything.values() for view in views}
        lost = sorted(set(acked.servers) - set(owned))
        assert not lost, f"{len(lost)} acknowledged servers lost: {lost[:5]}"
        for view in owned.values():
            # Nothing half-written: every server, acknowledged or not, is whole and readable.
            assert view["owner_email"] == OWNER["email"] and view["name"].startswith("kill-"), view
            assert view["upstream_headers"] == ["X-Api-Key"], view
        for server_id, friend in sorted(acked.grants):
            grants = http.get(f"/api/servers/{server_id}/grants")
            assert grants.status_code == 200, grants.text
            assert friend in {g["value"] for g in grants.json()["grants"]}, (server_id, friend)


def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path):
    upstream = ScriptedUpstream().start()
    state = tmp_path / "kill9"
    # An administrator: only they may register an upstream on an internal address (finding 20).
    env = {"MCPGW_TRUST_FORWARDED": "1", "MCPGW_ADMIN_EMAILS": OWNER["email"]}
    gw = GatewayProcess(state, extra_env=env)
    port = gw.port
    acked = Acked()
    figures = []
    try:
        gw.start()
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=10) as http:
            dev_sign_in(http, OWNER["email"])
            cookies = httpx.Cookies(http.cookies)
        for round_no in range(1, ROUNDS + 1):
            before = (len(acked.clients), len(acked.servers), len(acked.grants))
            stop = threading.Event()
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(_register_writer, gw.url, round_no, w, acked, stop) for w in range(2)]
                futures += [pool.submit(_server_writer, gw.url, cookies, upstream.url, round_no, w, acked, stop)
                            for w in range(2)]
                deadline = time.monotonic() + WRITE_SECONDS
                while time.monotonic() < deadline and not all(f.done() for f in futures):
                    time.sleep(0.05)
                kill9(gw)
                stop.set()
                for future in futures:
                    future.result(30)
            log = gw.log_text()
            assert "Traceback" not in log, log[-6000:]
            gw = GatewayProcess(state, port=port, extra_env=env).start()
            _check_everything_acknowledged_is_there(gw, cookies, acked)
            with sqlite3.connect(state / "gateway.db") as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            figures.append((len(acked.clients) - before[0], len(acked.servers) - before[1],
                            len(acked.grants) - before[2]))
        print(f"\nkill -9 rounds, acknowledged (registrations, servers, grants) per round: {figures}; "
              "all found after restart")
        assert all(sum(round_figures) > 0 for round_figures in figures), figures
        no_traceback(gw)
    finally:
        gw.stop()
        upstream.stop()


# ----------------------------------------------------------------------- the IdP down or slow

IDP_USER = {"sub": "fault-idp-user", "email": "fault.idp@example.com", "email_verified": True, "name": "F"}


def _idp_gateway(tmp_path, idp, relay: TcpRelay, name: str) -> GatewayProcess:
    """A gateway whose identity provider is the real IdP seen through `relay` (its issuer
    follows the Host header, so the relay's address is the issuer)."""
    gw = GatewayProcess(tmp_path / name, extra_env={"MCPGW_OIDC_ISSUER": relay.url})
    gw.env.pop("MCPGW_DEV_LOGIN")
    gw.use_idp_client(idp)
    return gw.start()


def _error_page(response: httpx.Response, statuses: tuple[int, ...]) -> str:
    assert response.status_code in statuses, (response.status_code, response.text[:2000])
    assert response.headers["content-type"].startswith("text/html"), response.headers
    text = response.text
    assert "<html" in text.lower() and "Traceback" not in text and "Something went wrong" not in text, text
    return text


def _signed_in(http: httpx.Client, gw: GatewayProcess) -> None:
    finished = idp_sign_in(http, gw.url, IDP_USER["sub"])
    assert finished.status_code == 302 and finished.headers["location"] == "/dashboard", (
        finished.status_code, finished.text[:1000])
    page = http.get(gw.url + "/dashboard")
    assert page.status_code == 200 and IDP_USER["email"] in page.text


def test_idp_down_gives_a_clear_error_page_and_sign_in_works_once_it_is_back(idp, tmp_path):
    idp.set_user(IDP_USER["sub"], email=IDP_USER["email"], email_verified=True, name="F")
    relay = TcpRelay(idp.port)  # not listening yet: the IdP is down from the start
    gw = _idp_gateway(tmp_path, idp, relay, "idp-down")
    try:
        with httpx.Client(trust_env=False, timeout=30) as http:
            text = _error_page(http.get(gw.url + "/login", params={"next": "/dashboard"}), (502, 503))
            assert "unavailable" in text.lower() or "unreachable" in text.lower(), text
            relay.listen()
            _signed_in(http, gw)
        # Down in the middle of a sign-in: after its form, before the code exchange.
        with httpx.Client(trust_env=False, timeout=30) as http:
            started = http.get(gw.url + "/login", params={"next": "/dashboard"})
            decided = http.post(started.headers["location"], data={"sub": IDP_USER["sub"]})
            relay.refuse()
            _error_page(http.get(decided.headers["location"]), (502, 503))
            relay.listen()
            _signed_in(http, gw)
        no_traceback(gw)
    finally:
        gw.stop()
        relay.stop()


IDP_TIMEOUT_S = 10  # services/authserver/identity.py: request_timeout of every IdP call


def test_idp_hanging_gives_a_clear_error_page_and_sign_in_works_once_it_answers(idp, tmp_path):
    idp.set_user(IDP_USER["sub"], email=IDP_USER["email"], email_verified=True, name="F")
    relay = TcpRelay(idp.port).start()
    relay.mode = "hang"
    gw = _idp_gateway(tmp_path, idp, relay, "idp-hang")
    try:
        with httpx.Client(trust_env=False, timeout=IDP_TIMEOUT_S + 20) as http:
            _error_page(http.get(gw.url + "/login", params={"next": "/dashboard"}), (502, 503, 504))
            assert relay.hung >= 1
            relay.mode = "pass"
            _signed_in(http, gw)
        no_traceback(gw)
    finally:
        gw.stop()
        relay.stop()


def test_idp_timeouts_are_named_as_timeouts(idp, tmp_path):
    """Issue 7 finding 23: a timeout used to show as "answered HTTP 599" or "refused the sign-in code"."""
    idp.set_user(IDP_USER["sub"], email=IDP_USER["email"], email_verified=True, name="F")
    relay = TcpRelay(idp.port).start()
    gw = _idp_gateway(tmp_path, idp, relay, "idp-timeout-words")
    try:
        with httpx.Client(trust_env=False, timeout=IDP_TIMEOUT_S + 20) as http:
            # At the code exchange (discovery is cached by then) ...
            started = http.get(gw.url + "/login", params={"next": "/dashboard"})
            decided = http.post(started.headers["location"], data={"sub": IDP_USER["sub"]})
            relay.mode = "hang"
            text = _error_page(http.get(decided.headers["location"]), (502, 503, 504))
            assert "timed out" in text.lower() or "did not answer in time" in text.lower(), text
    finally:
        gw.stop()
    # ... and at discovery, on a gateway that has not seen the IdP yet.
    gw = _idp_gateway(tmp_path, idp, relay, "idp-timeout-words-2")
    try:
        with httpx.Client(trust_env=False, timeout=IDP_TIMEOUT_S + 20) as http:
            text = _error_page(http.get(gw.url + "/login", params={"next": "/dashboard"}), (502, 503, 504))
            assert "timed out" in text.lower() or "did not answer in time" in text.lower(), text
    finally:
        gw.stop()
        relay.stop()
