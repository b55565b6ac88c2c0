"""The proxy against hostile or broken upstreams and clients (issue 7, findings 12-16 and
the proxy's part of 9): one real gateway process, real tokens for two users (real IdP
sign-in, consent, /token), and raw-socket upstreams (tests/support/fake_upstream.RawUpstream)
writing exactly the bytes each attack needs. Every test asserts the exact answer and that
nothing leaked to the wrong user or was forwarded to the wrong side; the gateway log must
never show a traceback."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support.browser import ScriptedBrowser
from tests.support.fake_upstream import RawExchange, RawUpstream
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import access_token, register_public_client

ALICE = {"sub": "alice-attacks", "email": "alice.attacks@example.com", "email_verified": True, "name": "Alice"}
BOB = {"sub": "bob-attacks", "email": "bob.attacks@example.com", "email_verified": True, "name": "Bob"}
LEGACY = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
UPSTREAM_TIMEOUT_S = 20  # the old parser waited this long on a bare-LF head, then said 504

LEAK = b'{"jsonrpc":"2.0","id":1,"result":{"leak":"LEAK-MEANT-FOR-A"}}'
EXTRA = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(LEAK), LEAK)
ALICE_ID = 1201  # the JSON-RPC id that makes the leak upstreams misbehave
DEPTH = 100_000
DEEP = b"[" * DEPTH + b"]" * DEPTH
UPSTREAM_SID = "upstream-attacks-sid-7f3a"

# server id → path at the upstream; the leak servers have an upstream (and so a pool) of their own.
LEAK_SERVERS = {"srv_atk_leak_204": "/leak-204", "srv_atk_leak_extra": "/leak-extra"}
SERVERS = {
    "srv_atk_bare_lf": "/bare-lf",
    "srv_atk_no_reason": "/no-reason",
    "srv_atk_status_600": "/status-600",
    "srv_atk_status_099": "/status-099",
    "srv_atk_reset_json": "/reset-json",
    "srv_atk_deep_json": "/deep-json",
    "srv_atk_deep_sse": "/deep-sse",
    "srv_atk_hop": "/hop",
    "srv_atk_init": "/init",
}


def json_answer(body: bytes, *fields: bytes, status: bytes = b"200 OK") -> bytes:
    extra = b"".join(f + b"\r\n" for f in fields)
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status, extra, len(body), body)


def request_id(exchange: RawExchange):
    try:
        return json.loads(exchange.body or b"null").get("id")
    except (ValueError, AttributeError):
        return None


def result_for(exchange: RawExchange, result: dict) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id(exchange), "result": result}).encode()


async def script(exchange: RawExchange) -> bool | None:
    path = exchange.path
    if path == "/leak-204" and request_id(exchange) == ALICE_ID:
        # A body-less status announcing a length, whose "body" (a complete response) only
        # follows once the next request arrives on the connection.
        exchange.write(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(EXTRA))
        exchange.connection.before_next = EXTRA
    elif path == "/leak-extra" and request_id(exchange) == ALICE_ID:
        # The real answer, then at once a complete extra one.
        exchange.write(json_answer(result_for(exchange, {"for": "alice"})) + EXTRA)
    elif path in ("/leak-204", "/leak-extra"):
        exchange.write(json_answer(result_for(exchange, {"for": "bob"})))
    elif path == "/bare-lf":
        exchange.write(b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\n{}")
    elif path == "/no-reason":
        exchange.write(json_answer(result_for(exchange, {"reason": "none"}), status=b"200"))
    elif path == "/status-600":
        exchange.write(json_answer(result_for(exchange, {}), status=b"600 Beyond"))
    elif path == "/status-099":
        exchange.write(json_answer(result_for(exchange, {}), status=b"099 Below"))
    elif path == "/reset-json":
        exchange.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                       b'{"jsonrpc"')
        await exchange.drain()
        await asyncio.sleep(0.1)
        exchange.reset()
        return False
    elif path == "/deep-json":
        exchange.write(json_answer(b'{"jsonrpc":"2.0","id":%d,"result":%s}' % (request_id(exchange), DEEP)))
    elif path == "/deep-sse":
        events = (b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"result":'
                  + DEEP + b'}}\n\n'
                  + b'event: message\ndata: {"jsonrpc":"2.0","id":%d,"result":{"after":"deep"}}\n\n'
                  % request_id(exchange))
        exchange.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(events), events))
    elif path == "/hop":
        exchange.write(json_answer(
            result_for(exchange, {"hop": True}),
            b"Connection: Retry-After, X-Upstream-Private",
            b"Retry-After: 7", b"X-Upstream-Private: p", b"Keep-Alive: timeout=5",
            b"Proxy-Authenticate: Basic realm=upstream", b"Trailer: X-Later", b"MCP-Protocol-Version: " + LEGACY.encode(),
        ))
    elif path == "/init" and exchange.method == "DELETE":
        exchange.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    elif path == "/init":
        exchange.write(json_answer(
            result_for(exchange, {"protocolVersion": LEGACY, "capabilities": {}, "serverInfo": {"name": "i"}}),
            b"Mcp-Session-Id: " + UPSTREAM_SID.encode(),
        ))
    else:
        exchange.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    return None


# -------------------------------------------------------------------------- fixtures


@dataclass
class Rig:
    gw: GatewayProcess
    raw: RawUpstream
    leaky: RawUpstream
    tokens: dict[str, str]
    http: httpx.Client = field(repr=False)

    def log_since(self, mark: int) -> str:
        return self.gw.log_text()[mark:]

    def log_mark(self) -> int:
        return len(self.gw.log_text())


async def _tokens(gw: GatewayProcess) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Proxy attacks")
        tokens = {}
        for name, who in (("alice", ALICE), ("bob", BOB)):
            async with ScriptedBrowser() as browser:
                tokens[name] = await access_token(gw.url, http, browser, client_id, who)
        return tokens


@pytest.fixture(scope="module")
def rig(idp, tmp_path_factory):
    raw = RawUpstream(script).start()
    leaky = RawUpstream(script).start()
    gw = GatewayProcess(tmp_path_factory.mktemp("proxy-attacks"), idp=idp,
                        extra_env={"MCPGW_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT_S)})
    gw.use_idp_client(idp)
    gw.start()
    try:
        for server_id, path in SERVERS.items():
            gw.add_server(raw.url + path, ALICE["email"], server_id, "--id", server_id)
        for server_id, path in LEAK_SERVERS.items():
            gw.add_server(leaky.url + path, ALICE["email"], server_id, "--id", server_id)
            gw.cli("grants", "add", server_id, "--email", BOB["email"])
        tokens = asyncio.run(_tokens(gw))
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=UPSTREAM_TIMEOUT_S + 10) as http:
            yield Rig(gw, raw, leaky, tokens, http)
    finally:
        gw.stop()
        raw.stop()
        leaky.stop()


def headers_for(token: str, **extra: str) -> dict[str, str]:
    return {"Accept": ACCEPT, "Content-Type": "application/json", "MCP-Protocol-Version": LEGACY,
            "Authorization": f"Bearer {token}", **extra}


def call(rig: Rig, server_id: str, message, who: str = "alice", **extra: str) -> httpx.Response:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return rig.http.post(f"/mcp/{server_id}", content=body, headers=headers_for(rig.tokens[who], **extra))


def jsonrpc_error(response: httpx.Response, status: int, request_id, code: int, message: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def usage_outcome(rig: Rig, server_id: str, timeout: float = 10.0) -> str:
    """The outcome the gateway recorded for the one call to `server_id` (flushed in batches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{rig.gw.state_dir / 'gateway.db'}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT outcome FROM usage_events WHERE server_id = ?", (server_id,)).fetchall()
        if rows:
            assert len(rows) == 1, rows
            return rows[0][0]
        time.sleep(0.2)
    raise AssertionError(f"no usage row for {server_id}")


UNREACHABLE = "the upstream MCP server is unreachable"


# ------------------------------------------------ 12. pooled connections never cross users


@pytest.mark.parametrize("server_id", list(LEAK_SERVERS))
def test_a_stray_upstream_response_never_reaches_the_next_user(rig, server_id):
    first = call(rig, server_id, rpc("tools/call", ALICE_ID, name="t"), "alice")
    assert first.status_code in (200, 204)
    assert b"LEAK" not in first.content
    alice = [e for e in rig.leaky.of(LEAK_SERVERS[server_id]) if request_id(e) == ALICE_ID][-1]
    opened_before = rig.leaky.connections

    second = call(rig, server_id, rpc("tools/call", 2, name="t"), "bob")
    assert second.status_code == 200, second.text
    assert second.json() == {"jsonrpc": "2.0", "id": 2, "result": {"for": "bob"}}
    assert b"LEAK" not in second.content
    bob = [e for e in rig.leaky.of(LEAK_SERVERS[server_id]) if request_id(e) == 2][-1]
    # Bob's call went out on a connection of its own, opened for it.
    assert bob.connection is not alice.connection and bob.number == 1
    assert rig.leaky.connections == opened_before + 1
    assert "Traceback" not in rig.gw.log_text()


# --------------------------------------------------------------- 13. malformed heads


def test_a_bare_lf_head_is_a_502_at_once(rig):
    """Before: no answer until the upstream timeout, then 504."""
    mark = rig.log_mark()
    started = time.monotonic()
    response = call(rig, "srv_atk_bare_lf", rpc("tools/call", 3, name="t"))
    elapsed = time.monotonic() - started
    jsonrpc_error(response, 502, 3, -32603, UNREACHABLE)
    assert "Missing expected CR" in rig.log_since(mark)
    print(f"time to 502 on a bare-LF head through the gateway: {elapsed * 1000:.1f} ms")


@pytest.mark.parametrize("server_id, status", [("srv_atk_status_600", "600"), ("srv_atk_status_099", "099")])
def test_status_codes_outside_100_599_are_a_502(rig, server_id, status):
    mark = rig.log_mark()
    jsonrpc_error(call(rig, server_id, rpc("tools/call", 4, name="t")), 502, 4, -32603, UNREACHABLE)
    assert f"status code {status} is outside 100-599" in rig.log_since(mark)


def test_a_head_without_reason_phrase_is_relayed(rig):
    response = call(rig, "srv_atk_no_reason", rpc("tools/call", 5, name="t"))
    assert response.status_code == 200, response.text
    assert response.json() == {"jsonrpc": "2.0", "id": 5, "result": {"reason": "none"}}


# ------------------------------------------------- 14. reset before anything went out


def test_a_reset_inside_a_held_back_json_body_is_a_502(rig):
    """Before: the client's connection was closed with no answer at all."""
    response = call(rig, "srv_atk_reset_json", rpc("tools/call", 6, name="t"))
    jsonrpc_error(response, 502, 6, -32603, "the upstream MCP server broke off its answer")
    assert b"jsonrpc\"" not in response.content.replace(b'"jsonrpc": "2.0"', b"")  # no partial upstream bytes
    assert usage_outcome(rig, "srv_atk_reset_json") == "502"


# ------------------------------------------------------------- 15. nesting 100,000 deep


def test_a_deeply_nested_json_answer_is_relayed_as_is_with_outcome_unknown(rig):
    mark = rig.log_mark()
    response = call(rig, "srv_atk_deep_json", rpc("tools/call", 7, name="t"))
    assert response.status_code == 200
    assert response.content == b'{"jsonrpc":"2.0","id":7,"result":%s}' % DEEP
    assert usage_outcome(rig, "srv_atk_deep_json") == "unknown"
    assert "Traceback" not in rig.log_since(mark) and "RecursionError" not in rig.log_since(mark)


def test_a_deeply_nested_sse_event_does_not_cut_the_stream(rig):
    mark = rig.log_mark()
    response = call(rig, "srv_atk_deep_sse", rpc("tools/call", 8, name="t"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.content.replace(b": keepalive\n\n", b"")
    assert body == (b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"result":'
                    + DEEP + b'}}\n\n'
                    + b'event: message\ndata: {"jsonrpc":"2.0","id":8,"result":{"after":"deep"}}\n\n')
    # The deep event could not be read, the answer after it could.
    assert usage_outcome(rig, "srv_atk_deep_sse") == "ok"
    assert "Traceback" not in rig.log_since(mark)


def test_a_deeply_nested_request_body_is_a_parse_error(rig):
    mark = rig.log_mark()
    arrived = len(rig.raw.exchanges)
    response = call(rig, "srv_atk_hop", DEEP)
    jsonrpc_error(response, 400, None, -32700, "parse error: nested too deeply")
    assert len(rig.raw.exchanges) == arrived  # nothing was forwarded
    assert "Traceback" not in rig.log_since(mark)


# ------------------------------------------------------------ 16. hop-by-hop headers


def test_headers_named_in_connection_are_dropped_in_both_directions(rig):
    response = call(rig, "srv_atk_hop", rpc("tools/call", 9, name="t"),
                    Connection="keep-alive, Mcp-Secret-Hop, User-Agent",
                    **{"Mcp-Secret-Hop": "s3cr3t", "User-Agent": "agent/1", "Mcp-Kept": "yes"})
    assert response.status_code == 200, response.text
    assert response.json() == {"jsonrpc": "2.0", "id": 9, "result": {"hop": True}}
    seen = {name.lower() for name, _ in rig.raw.of("/hop")[-1].headers}
    assert "mcp-kept" in seen
    assert not seen & {"mcp-secret-hop", "user-agent", "authorization"}, seen
    assert "s3cr3t" not in json.dumps(rig.raw.of("/hop")[-1].headers)
    # Upstream → client: what its Connection header named, and the fixed hop-by-hop set.
    got = {name.lower() for name in response.headers}
    assert response.headers["mcp-protocol-version"] == LEGACY
    assert not got & {"retry-after", "x-upstream-private", "proxy-authenticate", "trailer"}, got
    assert response.headers.get("keep-alive") is None


# ------------------------------------------------- 9. storage failures on the proxy path


def test_initialize_that_cannot_be_recorded_is_a_503_and_ends_the_upstream_session(rig):
    mark = rig.log_mark()
    deletes_before = len([e for e in rig.raw.of("/init") if e.method == "DELETE"])
    # Another process holds the SQLite write lock: reads go on (WAL), writes cannot.
    locker = sqlite3.connect(rig.gw.state_dir / "gateway.db", timeout=10, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        response = call(rig, "srv_atk_init", rpc("initialize", 31, protocolVersion=LEGACY, capabilities={},
                                                 clientInfo={"name": "attacks", "version": "1"}))
    finally:
        locker.rollback()
        locker.close()
    jsonrpc_error(response, 503, 31, -32603, "the gateway's storage is unavailable; retry later")
    assert int(response.headers["retry-after"]) >= 1
    assert "mcp-session-id" not in response.headers
    deletes = [e for e in rig.raw.of("/init") if e.method == "DELETE"]
    assert len(deletes) == deletes_before + 1
    assert deletes[-1].header("Mcp-Session-Id") == [UPSTREAM_SID]
    assert not deletes[-1].header("Authorization")
    with sqlite3.connect(f"file:{rig.gw.state_dir / 'gateway.db'}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM sessions WHERE upstream_session_id = ?",
                            (UPSTREAM_SID,)).fetchone() == (0,)
    log = rig.log_since(mark)
    assert "storage failure on POST /mcp/srv_atk_init" in log
    assert "Traceback" not in log
