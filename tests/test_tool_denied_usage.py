"""A tools/call the tool policy refuses, seen in the owner's usage report (issue 10): a real
gateway, the real MCP tool upstream and the Python SDK client; the owner's usage page and
report show the user, the tool and the refusal's reason."""

from __future__ import annotations

import asyncio
import html
import secrets
import time
from urllib.parse import urlencode

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.support.browser import ScriptedBrowser
from tests.support.dashboard_client import api, sign_in
from tests.support.gateway import GatewayProcess
from tests.support.tokens import REDIRECT, pkce, register_public_client
from tests.support.tool_upstream import ToolUpstream

OWNER = "olga@example.com"
READER = "rita@example.com"  # a read-only grant
SRV = "srv_tool_denied_usage"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    upstream = ToolUpstream()
    gw = GatewayProcess(tmp_path_factory.mktemp("tool-denied-usage")).start()
    try:
        gw.add_server(upstream.url, OWNER, "Docs", "--id", SRV)
        gw.cli("grants", "add", SRV, "--email", READER, "--read-only")
        yield gw, upstream
    finally:
        gw.stop()
        upstream.stop()


async def dev_token(gw: GatewayProcess, email: str) -> str:
    """One real authorization with the local sign-in: /authorize, consent, /token."""
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Denied usage")
        verifier, challenge = pkce()
        query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT,
                 "state": secrets.token_hex(6), "code_challenge": challenge, "code_challenge_method": "S256",
                 "resource": f"{gw.url}/mcp/{SRV}"}
        async with ScriptedBrowser() as browser:
            result = await browser.authorize(f"{gw.url}/authorize?{urlencode(query)}", stop_at=REDIRECT,
                                             email=email)
        response = await http.post("/token", data={
            "grant_type": "authorization_code", "code": result["code"], "code_verifier": verifier,
            "redirect_uri": REDIRECT, "client_id": client_id})
        assert response.status_code == 200, response.text
        return response.json()["access_token"]


async def call_tool(gw, token, name, arguments):
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, trust_env=False, timeout=30) as http:
        async with Client(streamable_http_client(f"{gw.url}/mcp/{SRV}", http_client=http), mode="legacy",
                          cache=None) as client:
            await client.list_tools()  # fills the catalog read-only needs (and is what a client does)
            return await client.call_tool(name, arguments)


def refused(gw, token, name, arguments) -> MCPError:
    try:
        asyncio.run(call_tool(gw, token, name, arguments))
    except BaseException as exc:  # noqa: BLE001 - unwrapped below
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        assert isinstance(exc, MCPError), repr(exc)
        return exc
    raise AssertionError(f"the call of {name} was not refused")


def test_a_denied_call_shows_on_the_owners_usage_report_with_user_tool_and_reason(rig):
    gw, upstream = rig
    token = asyncio.run(dev_token(gw, READER))
    before = upstream.calls()
    error = refused(gw, token, "write_doc", {"path": "a", "text": "b"})
    assert (error.code, error.message) == (-32602, "tool not available")
    assert upstream.calls().get("write_doc", 0) == before.get("write_doc", 0)

    owner = sign_in(gw, OWNER)
    for _ in range(100):  # usage is recorded off the request path: wait for it to land
        report = api(owner, "GET", f"/api/servers/{SRV}/usage?range=24h").json()
        if any(event["tool"] == "write_doc" for event in report["recent"]):
            break
        time.sleep(0.1)
    recent = [e for e in report["recent"] if e["tool"] == "write_doc"]
    assert [(e["user_email"], e["method"], e["outcome"], e["denied"]) for e in recent] == [
        (READER, "tools/call", "denied:read_only", "read_only")], recent
    # The allowed calls before it (initialize, tools/list) are not denied.
    assert all(e["denied"] is None for e in report["recent"] if e["tool"] != "write_doc")

    page = owner.get(f"/dashboard/servers/{SRV}/usage?range=24h")
    assert page.status_code == 200
    rows = [row for row in html.unescape(page.text).split('data-testid="recent-row"')[1:] if "write_doc" in row]
    assert len(rows) == 1 and READER in rows[0] and "denied:read_only" in rows[0], rows


def write_doc_row(report: dict) -> dict:
    rows = [r for r in report["users_tools"] if r["tool"] == "write_doc" and r["user_email"] == READER]
    return rows[0] if rows else {"calls": 0, "errors": 0, "denied": 0}


def test_a_denied_call_counts_as_denied_not_as_an_error(rig):
    gw, _ = rig
    owner = sign_in(gw, OWNER)
    usage = f"/api/servers/{SRV}/usage?range=24h"
    before = write_doc_row(api(owner, "GET", usage).json())
    token = asyncio.run(dev_token(gw, READER))
    refused(gw, token, "write_doc", {"path": "a", "text": "b"})

    for _ in range(100):  # usage is recorded off the request path: wait for it to land
        report = api(owner, "GET", usage).json()
        if write_doc_row(report)["calls"] > before["calls"]:
            break
        time.sleep(0.1)
    row = write_doc_row(report)
    assert (row["calls"] - before["calls"], row["denied"] - before["denied"], row["errors"]) == (1, 1, 0), row
    assert report["denied"] >= 1 and report["errors"] == 0, report
    top = [t for t in report["top_tools"] if t["tool"] == "write_doc"]
    assert (top[0]["denied"], top[0]["errors"]) == (row["denied"], 0)

    csv_lines = owner.get(f"/dashboard/servers/{SRV}/usage.csv?range=24h").text.splitlines()
    header = csv_lines[0].split(",")
    assert header[4:7] == ["calls", "errors", "denied"]
    [line] = [dict(zip(header, c.split(","), strict=True)) for c in csv_lines[1:] if ",write_doc," in c]
    assert (line["errors"], line["denied"]) == ("0", str(row["denied"]))

    page = html.unescape(owner.get(f"/dashboard/servers/{SRV}/usage?range=24h").text)
    assert f'data-testid="stat-denied">{report["denied"]}<' in page

    human = gw.cli("usage", SRV, "--days", "1").stdout.splitlines()
    assert f'{report["denied"]} denied by the tool policy' in human[0]
    assert human[1].split("\t")[2:5] == ["calls", "errors", "denied"]
    [cli_row] = [line.split("\t") for line in human[2:] if line.split("\t")[1] == "write_doc"]
    assert cli_row[3:5] == ["0", str(row["denied"])]
