"""Tool policy enforced in the proxy (issue 10), against one real gateway process, the real
IdP, and the real MCP tool upstream (read-only and write tools; it counts every tools/call it
gets and can answer tools/list paginated, as SSE or malformed), with the Python SDK client:
filtered listings, refused calls that never reach the upstream, batches, usage records."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import access_token, register_public_client
from tests.support.tool_upstream import ToolUpstream

ANA = {"sub": "ana-tools", "email": "ana@example.com", "email_verified": True, "name": "Ana"}  # owner
BOB = {"sub": "bob-tools", "email": "bob@example.com", "email_verified": True, "name": "Bob"}  # read-only
CAROL = {"sub": "carol-tools", "email": "carol@example.com", "email_verified": True, "name": "Carol"}  # deny write_*
DAN = {"sub": "dan-tools", "email": "dan@corp.example", "email_verified": True, "hd": "corp.example"}  # domain
EVE = {"sub": "eve-tools", "email": "eve@corp.example", "email_verified": True, "hd": "corp.example"}  # + e-mail
SRV = "srv_tool_enforce"  # default rule: deny delete_*
SRV_PIN = "srv_tool_pinned"  # no rule, pinned
READ_ONLY = {"read_doc", "search"}
LEGACY = "2025-11-25"


@pytest.fixture(scope="module")
def rig(idp, tmp_path_factory):
    upstream = ToolUpstream()
    gw = GatewayProcess(tmp_path_factory.mktemp("tool-enforce"), idp=idp)
    gw.use_idp_client(idp)
    gw.start()
    try:
        gw.add_server(upstream.url, ANA["email"], "Docs", "--id", SRV)
        gw.cli("servers", "edit", SRV, "--tools-deny", "delete_*")
        gw.cli("grants", "add", SRV, "--email", BOB["email"], "--read-only")
        gw.cli("grants", "add", SRV, "--email", CAROL["email"], "--tools-deny", "write_*")
        gw.cli("grants", "add", SRV, "--domain", "corp.example", "--tools-allow", "search")
        gw.cli("grants", "add", SRV, "--email", EVE["email"], "--read-only")
        tokens = asyncio.run(_tokens(gw))
        # The owner's first listing fills the catalog (read-only needs its annotations).
        assert names(asyncio.run(list_tools(gw, tokens["ana"]))) == {"read_doc", "search", "write_doc"}
        yield gw, upstream, tokens
    finally:
        gw.stop()
        upstream.stop()


async def _tokens(gw: GatewayProcess) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Tool enforcement")
        tokens = {}
        for key, who in (("ana", ANA), ("bob", BOB), ("carol", CAROL), ("dan", DAN), ("eve", EVE)):
            async with ScriptedBrowser() as browser:
                tokens[key] = await access_token(gw.url, http, browser, client_id, who)
        return tokens


async def session(gw, token, action, server_id=SRV):
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, trust_env=False, timeout=30) as http:
        async with Client(streamable_http_client(f"{gw.url}/mcp/{server_id}", http_client=http), mode="legacy",
                          cache=None) as client:
            return await action(client)


async def list_tools(gw, token, server_id=SRV):
    return await session(gw, token, lambda client: client.list_tools(), server_id)


async def call_tool(gw, token, name, arguments, server_id=SRV):
    return await session(gw, token, lambda client: client.call_tool(name, arguments), server_id)


def names(result) -> set[str]:
    return {tool.name for tool in result.tools}


def refused_call(gw, token, name, arguments, server_id=SRV) -> MCPError:
    """The MCPError the SDK raises for the call (it may come wrapped in an exception group)."""
    try:
        asyncio.run(call_tool(gw, token, name, arguments, server_id))
    except BaseException as exc:  # noqa: BLE001 - unwrapped below
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        assert isinstance(exc, MCPError), repr(exc)
        return exc
    raise AssertionError(f"the call of {name} was not refused")


def post(gw, token, body, version=LEGACY) -> httpx.Response:
    return httpx.post(f"{gw.url}/mcp/{SRV}", content=json.dumps(body), trust_env=False, timeout=30, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": version})


def sse_messages(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def test_read_only_grant_sees_read_only_tools_and_its_write_call_never_reaches_the_upstream(rig):
    gw, upstream, tokens = rig
    assert names(asyncio.run(list_tools(gw, tokens["bob"]))) == READ_ONLY
    before = upstream.calls()
    error = refused_call(gw, tokens["bob"], "write_doc", {"path": "a", "text": "b"})
    assert (error.code, error.message) == (-32602, "tool not available")
    assert upstream.calls() == before  # the upstream got no call
    result = asyncio.run(call_tool(gw, tokens["bob"], "search", {"query": "q"}))
    assert result.content[0].text == "found: q"
    assert upstream.calls().get("search", 0) == before.get("search", 0) + 1


def test_deny_glob_of_a_grant_narrows_the_server_default(rig):
    gw, upstream, tokens = rig
    # Carol's grant denies write_*; the server's default already denies delete_*.
    assert names(asyncio.run(list_tools(gw, tokens["carol"]))) == READ_ONLY
    before = upstream.calls()
    for tool, arguments in (("write_doc", {"path": "a", "text": "b"}), ("delete_all", {})):
        assert refused_call(gw, tokens["carol"], tool, arguments).code == -32602
    assert upstream.calls() == before


def test_domain_grant_rule_and_an_e_mail_grant_that_comes_first(rig):
    gw, upstream, tokens = rig
    assert names(asyncio.run(list_tools(gw, tokens["dan"]))) == {"search"}
    assert refused_call(gw, tokens["dan"], "read_doc", {"path": "x"}).code == -32602
    # Eve is in the domain too, but her own e-mail grant (read-only) is the one that applies.
    assert names(asyncio.run(list_tools(gw, tokens["eve"]))) == READ_ONLY
    assert asyncio.run(call_tool(gw, tokens["eve"], "read_doc", {"path": "x"})).content[0].text == "contents of x"


def test_owner_is_limited_by_the_server_default_only(rig):
    gw, upstream, tokens = rig
    assert names(asyncio.run(list_tools(gw, tokens["ana"]))) == {"read_doc", "search", "write_doc"}
    before = upstream.calls()
    assert refused_call(gw, tokens["ana"], "delete_all", {}).code == -32602
    assert upstream.calls() == before
    result = asyncio.run(call_tool(gw, tokens["ana"], "write_doc", {"path": "p", "text": "xyz"}))
    assert result.content[0].text == "wrote 3 characters to p"


def test_a_batch_holding_a_refused_call_is_refused_whole(rig):
    gw, upstream, tokens = rig
    before = upstream.calls()
    batch = [rpc("tools/call", 1, name="read_doc", arguments={"path": "x"}),
             rpc("tools/call", 2, name="write_doc", arguments={"path": "x", "text": "y"}),
             rpc("notifications/progress", None, progressToken="t", progress=1)]
    response = post(gw, tokens["bob"], batch, version="2025-03-26")
    assert response.status_code == 200, response.text
    errors = {item["id"]: item["error"] for item in response.json()}
    assert set(errors) == {1, 2}  # one answer per request, none for the notification
    assert errors[2] == {"code": -32602, "message": "tool not available"}
    assert errors[1]["code"] == -32602
    assert upstream.calls() == before


def test_paginated_listing_is_filtered_page_by_page_and_keeps_next_cursor(rig):
    gw, upstream, tokens = rig
    upstream.list_mode("paginate")
    try:
        first = post(gw, tokens["bob"], rpc("tools/list", 3))
        second = post(gw, tokens["bob"], rpc("tools/list", 4, cursor="page2"))
        owner_second = post(gw, tokens["ana"], rpc("tools/list", 5, cursor="page2"))
    finally:
        upstream.list_mode("")
    page = first.json()["result"]
    assert page["nextCursor"] == "page2" and {t["name"] for t in page["tools"]} <= READ_ONLY
    assert second.json()["result"] == {"tools": [], "_meta": {"page": 2}}
    assert [t["name"] for t in owner_second.json()["result"]["tools"]] == ["write_doc"]


def test_sse_listing_is_filtered_and_other_events_pass(rig):
    gw, upstream, tokens = rig
    upstream.list_mode("sse")
    try:
        response = post(gw, tokens["bob"], rpc("tools/list", 6))
        via_sdk = asyncio.run(list_tools(gw, tokens["bob"]))
    finally:
        upstream.list_mode("")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    note, answer = sse_messages(response.text)
    assert note["method"] == "notifications/message"
    assert answer["id"] == 6 and {t["name"] for t in answer["result"]["tools"]} == READ_ONLY
    assert "id: e2\n" in response.text
    assert names(via_sdk) == READ_ONLY


def test_a_resumed_stream_replaying_a_tools_list_answer_is_filtered(rig):
    gw, _, tokens = rig
    response = httpx.get(f"{gw.url}/mcp/{SRV}", trust_env=False, timeout=30, headers={
        "Authorization": f"Bearer {tokens['bob']}", "Accept": "text/event-stream",
        "MCP-Protocol-Version": LEGACY, "Last-Event-ID": "e1"})
    assert response.status_code == 200, response.text
    note, answer = sse_messages(response.text)
    assert note["method"] == "notifications/message"
    assert answer["id"] == "r1" and {t["name"] for t in answer["result"]["tools"]} == READ_ONLY


@pytest.mark.parametrize("mode", ["malformed", "huge"])
def test_malformed_or_huge_listing_is_an_error_never_the_list(rig, mode):
    gw, upstream, tokens = rig
    upstream.list_mode(mode)
    try:
        answers = {who: post(gw, tokens[who], rpc("tools/list", 7)) for who in ("bob", "ana")}
    finally:
        upstream.list_mode("")
    for response in answers.values():  # the owner's unrestricted listing is checked as well
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == -32603 and "write_doc" not in response.text


def denials(gw) -> float:
    text = httpx.get(f"{gw.url}/metrics", trust_env=False, timeout=10).text
    match = re.search(r'^mcpgw_policy_denials_total\{reason="tool"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_denied_call_is_in_usage_as_denied_and_counted(rig):
    gw, _, tokens = rig
    before = denials(gw)
    refused_call(gw, tokens["bob"], "delete_all", {})
    assert denials(gw) == before + 1
    deadline = time.monotonic() + 15  # the recorder flushes in batches, about once a second
    rows = []
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{gw.state_dir / 'gateway.db'}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT user_sub, outcome FROM usage_events WHERE server_id = ? AND "
                                "method = 'tools/call' AND target = 'delete_all'", (SRV,)).fetchall()
        if (BOB["sub"], "denied:read_only") in rows or (BOB["sub"], "denied:server_rule") in rows:
            break
        time.sleep(0.3)
    assert any(sub == BOB["sub"] and outcome.startswith("denied:") for sub, outcome in rows), rows


def eventually(check, seconds: float = 15) -> bool:
    """Poll `check` (a rule changed with the CLI reaches the gateway's caches within 3 s)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def test_pinned_server_hides_a_changed_tool_until_the_owner_approves_it(rig):
    gw, upstream, tokens = rig
    gw.add_server(upstream.url, ANA["email"], "Pinned", "--id", SRV_PIN)
    gw.cli("grants", "add", SRV_PIN, "--email", BOB["email"])

    def listed(who: str) -> set[str]:
        return names(asyncio.run(list_tools(gw, tokens[who], SRV_PIN)))

    everything = {"delete_all", "read_doc", "search", "write_doc"}
    assert listed("ana") == everything  # fills the catalog
    gw.cli("servers", "edit", SRV_PIN, "--pin")  # approves the definitions there now
    try:
        upstream.describe("search", "Search the documents, and send them away.")
        assert eventually(lambda: "search" not in listed("ana")), "the changed tool is still listed"
        assert listed("bob") == everything - {"search"}
        before = upstream.calls()
        assert refused_call(gw, tokens["bob"], "search", {"query": "q"}, SRV_PIN).code == -32602
        assert upstream.calls() == before
        gw.cli("servers", "tools", "approve", SRV_PIN, "search")
        assert eventually(lambda: "search" in listed("bob")), "the approved tool is not listed again"
        result = asyncio.run(call_tool(gw, tokens["bob"], "search", {"query": "q"}, SRV_PIN))
        assert result.content[0].text == "found: q"
    finally:
        upstream.describe("search", "Search the documents.")
