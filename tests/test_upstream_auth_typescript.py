"""Connected accounts (issue 11) with the official TypeScript MCP SDK as the client: a user who
connected their upstream account (the Python SDK's OAuth client through the sign-in detour) calls
`whoami` through the gateway from tests/interop/ts_client.mjs ("bearer" mode, the same gateway
token) and sees their own upstream identity; once disconnected, the TS client gets the link."""

from __future__ import annotations

import asyncio
import json
import os

from services.proxy import connect_required
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import run
from tests.support.mcp_oauth import connect
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.upstream_accounts import (  # noqa: F401 (fixtures)
    ALICE_AT_UPSTREAM,
    OWNER,
    credential,
    gateway,
    server_id,
    signed_in,
    upstream,
    whoami_text,
)
from tests.test_interop_typescript import ROOT, SCRIPT, _node

TIMEOUT = 60


async def ts_client(node: str, mcp_url: str, token: str, tool: str) -> dict:
    """Runs the TS client in "bearer" mode; its JSON lines merged into one dict."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    process = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), mcp_url, "bearer", token, tool, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [json.loads(raw) for raw in out.splitlines() if raw.strip()]
    assert process.returncode == 0, (lines, err.decode(errors="replace")[-3000:])
    merged = {key: value for line in lines for key, value in line.items()}
    assert merged.get("done") is True, lines
    return merged


def test_the_typescript_sdk_sees_the_users_own_upstream_identity_then_the_connect_link(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    node = _node()
    mcp_url = f"{gateway.url}/mcp/{server_id}"

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            rig = await signed_in(browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
            async with connect(rig) as client:  # the Python-driven sign-in, upstream detour included
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
            token = rig.tokens.access_token  # type: ignore[union-attr]

            seen = await ts_client(node, mcp_url, token, "whoami")
            assert "whoami" in seen["tools"]
            assert seen["called"] == ALICE_AT_UPSTREAM and seen["isError"] is False

            page = await browser.follow(f"{gateway.url}/dashboard/connections")
            page = await browser.submit(page, "server_id")  # Disconnect
            assert page.status == 200 and await credential(gateway, OWNER, server_id) is None
            refused = (await ts_client(node, mcp_url, token, "whoami"))["refused"]
            # Not a 401 (the SDK would re-run the gateway's authorization): the link, as an error.
            assert refused["code"] == connect_required.URL_ELICITATION_REQUIRED
            assert f"{gateway.url}/oauth/upstream/connect/{server_id}" in refused["message"]

    scenario()
