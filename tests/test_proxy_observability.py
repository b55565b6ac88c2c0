"""Observability of the proxy: X-Request-Id carried to the upstream, the latency histograms
by registered server, refusals counted by reason, and security events for attack-like
refusals (not for routine 401s). A real gateway process, the real IdP and a real MCP upstream
(the `mcp` package's MCPServer over Streamable HTTP, on a socket this module binds)."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from prometheus_client.parser import text_string_to_metric_families

from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.ports import bound_socket
from tests.support.tokens import access_token, register_public_client

ALICE = {"sub": "alice-obs", "email": "alice@obs.example", "email_verified": True, "name": "Alice"}
BOB = {"sub": "bob-obs", "email": "bob@obs.example", "email_verified": True, "name": "Bob"}
SRV_SHARED = "srv_obs_shared"  # Alice's, shared with Bob
SRV_PRIVATE = "srv_obs_private"  # Alice's alone
ALLOWED_ORIGIN = "https://app.obs.example"
PROTOCOL = "2025-11-25"


# ------------------------------------------------------------------ the MCP upstream


class McpUpstream:
    """MCPServer (stateful, JSON answers) with a tool that answers the X-Request-Id it got."""

    def __init__(self) -> None:
        server = MCPServer("observability-upstream")

        @server.tool()
        def request_id(ctx: Context) -> str:
            """The X-Request-Id header of the HTTP request that carried this call."""
            return (ctx.headers or {}).get("x-request-id", "<none>")

        app = server.streamable_http_app(host="127.0.0.1", json_response=True)
        self.sock = bound_socket()
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/mcp"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True)

    def start(self) -> McpUpstream:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the MCP upstream did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# -------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    gw: GatewayProcess
    tokens: dict[str, str]
    http: httpx.Client = field(repr=False)

    def post(self, server_id: str, body: dict, token: str | None = None, **headers: str) -> httpx.Response:
        sent = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": PROTOCOL, **headers}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return self.http.post(f"/mcp/{server_id}", content=json.dumps(body), headers=sent)

    def session(self, server_id: str, token: str) -> str:
        answer = self.post(server_id, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "obs", "version": "1"}}},
            token)
        assert answer.status_code == 200, answer.text
        session = answer.headers["Mcp-Session-Id"]
        initialized = self.post(server_id, {"jsonrpc": "2.0", "method": "notifications/initialized"}, token,
                                **{"Mcp-Session-Id": session})
        assert initialized.status_code == 202, initialized.text
        return session

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics (parsed by prometheus_client) by (name, sorted labels)."""
        text = self.http.get("/metrics").text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def security_events(self) -> list[dict]:
        lines = [json.loads(line) for line in self.gw.log_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "mcpgw.security"]


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def tools_call(call_id: int, name: str = "request_id", **arguments) -> dict:
    return {"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


async def _tokens(gw: GatewayProcess) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Observability")
        tokens = {}
        async with ScriptedBrowser() as browser:
            tokens["alice"] = await access_token(gw.url, http, browser, client_id, ALICE)
            tokens["alice_shared"] = await access_token(gw.url, http, browser, client_id, ALICE,
                                                        resource=f"{gw.url}/mcp/{SRV_SHARED}")
        async with ScriptedBrowser() as browser:
            tokens["bob"] = await access_token(gw.url, http, browser, client_id, BOB)
        return tokens


@pytest.fixture(scope="module")
def rig(idp, tmp_path_factory):
    upstream = McpUpstream().start()
    gw = GatewayProcess(tmp_path_factory.mktemp("proxy-observability"), idp=idp,
                        extra_env={"MCPGW_ALLOWED_ORIGINS": ALLOWED_ORIGIN, "MCPGW_LOG_FORMAT": "json"})
    gw.use_idp_client(idp)
    gw.start()
    try:
        gw.add_server(upstream.url, ALICE["email"], "Obs shared", "--id", SRV_SHARED)
        gw.cli("grants", "add", SRV_SHARED, "--email", BOB["email"])
        gw.add_server(upstream.url, ALICE["email"], "Obs private", "--id", SRV_PRIVATE)
        tokens = asyncio.run(_tokens(gw))
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as http:
            yield Rig(gw, tokens, http)
    finally:
        gw.stop()
        upstream.stop()


# -------------------------------------------------------------------------- request id


def test_the_upstream_gets_the_request_id_the_client_got_back(rig):
    session = rig.session(SRV_SHARED, rig.tokens["alice"])
    answer = rig.post(SRV_SHARED, tools_call(2), rig.tokens["alice"], **{"Mcp-Session-Id": session})
    assert answer.status_code == 200, answer.text
    returned = answer.headers["X-Request-Id"]
    assert returned and returned != "-"
    assert answer.json()["result"]["content"][0]["text"] == returned

    # A sane id the client chose is the one both sides see.
    chosen = f"obs-{secrets.token_hex(6)}"
    answer = rig.post(SRV_SHARED, tools_call(3), rig.tokens["alice"], **{"Mcp-Session-Id": session,
                                                                         "X-Request-Id": chosen})
    assert answer.headers["X-Request-Id"] == chosen
    assert answer.json()["result"]["content"][0]["text"] == chosen


# --------------------------------------------------------------------------- histograms


def test_latency_histograms_count_calls_by_registered_server_only(rig):
    before = rig.metrics()
    session = rig.session(SRV_SHARED, rig.tokens["alice"])
    for call_id in range(10, 15):
        assert rig.post(SRV_SHARED, tools_call(call_id), rig.tokens["alice"],
                        **{"Mcp-Session-Id": session}).status_code == 200
    # Ids that are no server, with and without a valid token: refused, never a series.
    unknown = f"srv_nosuch_{secrets.token_hex(4)}"
    assert rig.post(unknown, tools_call(20), rig.tokens["alice"]).status_code == 404
    assert rig.post(f"srv_random_{secrets.token_hex(4)}", tools_call(21)).status_code == 401
    after = rig.metrics()

    for name in ("mcpgw_proxy_gateway_seconds", "mcpgw_proxy_upstream_ttfb_seconds"):
        calls = sample(after, f"{name}_count", server=SRV_SHARED) - sample(before, f"{name}_count", server=SRV_SHARED)
        assert calls == 7  # initialize, notifications/initialized and five tools/call
        assert sample(after, f"{name}_sum", server=SRV_SHARED) > sample(before, f"{name}_sum", server=SRV_SHARED)
        assert sample(after, f"{name}_bucket", server=SRV_SHARED, le="+Inf") == sample(
            after, f"{name}_count", server=SRV_SHARED)
        servers = {dict(labels).get("server") for (metric, labels) in after if metric.startswith(name)}
        assert servers <= {SRV_SHARED, SRV_PRIVATE}, servers


# ------------------------------------------------------------------- refusals by reason


def test_refusals_are_counted_by_reason(rig):
    alice, bob = rig.tokens["alice"], rig.tokens["bob"]
    before = rig.metrics()
    assert rig.post(SRV_SHARED, tools_call(30)).status_code == 401  # no token
    assert rig.post(SRV_SHARED, tools_call(31), "not-a-jwt").status_code == 401
    assert rig.post(SRV_PRIVATE, tools_call(32), rig.tokens["alice_shared"]).status_code == 401  # audience
    assert rig.post(SRV_SHARED, tools_call(33), alice, Origin="https://evil.example").status_code == 403
    session = rig.session(SRV_SHARED, alice)
    assert rig.post(SRV_SHARED, tools_call(34), alice, Origin=ALLOWED_ORIGIN,
                    **{"Mcp-Session-Id": session}).status_code == 200
    assert rig.post(SRV_PRIVATE, tools_call(35), bob).status_code == 403  # not shared with Bob
    assert rig.post(SRV_SHARED, tools_call(36), bob, **{"Mcp-Session-Id": session}).status_code == 404
    after = rig.metrics()

    def added(name: str, reason: str) -> float:
        return sample(after, name, reason=reason) - sample(before, name, reason=reason)

    assert added("mcpgw_auth_failures_total", "missing") == 1
    assert added("mcpgw_auth_failures_total", "malformed") == 1
    assert added("mcpgw_auth_failures_total", "audience") == 1
    assert added("mcpgw_auth_failures_total", "origin") == 1
    assert added("mcpgw_policy_denials_total", "not_shared") == 1
    assert added("mcpgw_policy_denials_total", "session") == 1


# -------------------------------------------------------------------- security events


def test_attack_like_refusals_are_security_events_and_routine_401s_are_not(rig):
    alice, bob = rig.tokens["alice"], rig.tokens["bob"]
    seen = len(rig.security_events())
    # Routine: no token, a token that is no JWT.
    assert rig.post(SRV_SHARED, tools_call(40)).status_code == 401
    assert rig.post(SRV_SHARED, tools_call(41), "not-a-jwt").status_code == 401
    assert rig.security_events()[seen:] == []

    assert rig.post(SRV_PRIVATE, tools_call(42), bob).status_code == 403
    assert rig.post(SRV_PRIVATE, tools_call(43), rig.tokens["alice_shared"]).status_code == 401
    assert rig.post(SRV_SHARED, tools_call(44), alice, Origin="https://evil.example").status_code == 403
    session = rig.session(SRV_SHARED, alice)
    assert rig.post(SRV_SHARED, tools_call(45), bob, **{"Mcp-Session-Id": session}).status_code == 404
    # An unknown session id is routine (the client initializes again).
    assert rig.post(SRV_SHARED, tools_call(46), bob, **{"Mcp-Session-Id": "mcpgw-gone"}).status_code == 404

    deadline = time.monotonic() + 10
    while len(rig.security_events()) < seen + 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # the log file is written by another process
    events = {line["event"]: line for line in rig.security_events()[seen:]}
    assert sorted(events) == ["access_denied", "origin_rejected", "session_hijack_refused",
                              "token_audience_mismatch"]
    for line in events.values():
        assert line["level"] == "WARNING"
        assert "request_id" in line
    assert events["access_denied"]["user_sub"] == BOB["sub"]
    assert events["access_denied"]["server_id"] == SRV_PRIVATE
    assert events["token_audience_mismatch"]["user_sub"] == ALICE["sub"]
    assert events["origin_rejected"]["origin"] == "https://evil.example"
    hijack = events["session_hijack_refused"]
    assert hijack["user_sub"] == BOB["sub"] and hijack["owner_sub"] == ALICE["sub"]
    assert hijack["server_id"] == SRV_SHARED
    # The access log line of the refused request names who asked, on which server.
    access = [json.loads(line) for line in rig.gw.log_text().splitlines() if line.startswith("{")]
    refused = [line for line in access if line.get("logger") == "tornado.access" and line.get("status") == 404
               and line.get("user_sub") == BOB["sub"]]
    assert refused and refused[-1]["server_id"] == SRV_SHARED and refused[-1]["client_id"]
    text = json.dumps(list(events.values()))
    assert session not in text  # the session id is a credential of its own
    for token in rig.tokens.values():
        assert token not in text
