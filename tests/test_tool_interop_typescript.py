"""Tool policy (issue 10) seen by the official TypeScript MCP SDK (tests/interop/ts_client.mjs,
"tools" mode) through the gateway: a read-only grant lists only the read-only tools of the
real tool upstream, and its call of a write tool is refused (-32602) without reaching it."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from tests.support.browser import ScriptedBrowser
from tests.support.tool_upstream import ToolUpstream
from tests.test_interop_typescript import REDIRECT_URI, ROOT, SCRIPT, STEP_TIMEOUT, TOTAL_TIMEOUT, _node

OWNER = "tina@example.com"
READER = {"sub": "rob-ts-tools", "email": "rob@example.com", "email_verified": True, "name": "Rob"}


@pytest.fixture
def tool_upstream():
    upstream = ToolUpstream()
    yield upstream
    upstream.stop()


async def drive(node: str, mcp_url: str, *args: str) -> dict:
    """Run the script in `args` mode, play the user agent at its authorization; its lines merged."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    process = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), mcp_url, *args, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines: list[dict] = []
    try:
        while True:
            raw = await asyncio.wait_for(process.stdout.readline(), STEP_TIMEOUT)
            if not raw:
                stderr = (await process.stderr.read()).decode(errors="replace")
                raise AssertionError(f"the TypeScript client exited early: {lines}\n{stderr[-4000:]}")
            line = json.loads(raw)
            lines.append(line)
            assert "error" not in line, lines
            if "authorize" in line:
                async with ScriptedBrowser() as browser:
                    redirect = await browser.authorize(line["authorize"], stop_at=REDIRECT_URI, idp_login=READER)
                process.stdin.write(redirect.get("code", "").encode() + b"\n")
                await process.stdin.drain()
            if line == {"done": True}:
                break
        assert await asyncio.wait_for(process.wait(), STEP_TIMEOUT) == 0
        return {key: value for line in lines for key, value in line.items()}
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_typescript_client_with_a_read_only_grant_lists_read_only_tools_and_its_write_call_is_refused(
        gateway, tool_upstream):
    node = _node()
    server_id = gateway.add_server(tool_upstream.url, OWNER, "Docs")
    gateway.cli("grants", "add", server_id, "--email", READER["email"], "--read-only")
    mcp_url = f"{gateway.url}/mcp/{server_id}"

    before = tool_upstream.calls()
    results = asyncio.run(asyncio.wait_for(
        drive(node, mcp_url, "tools", "write_doc", json.dumps({"path": "a", "text": "b"})), TOTAL_TIMEOUT))

    assert sorted(results["tools"]) == ["read_doc", "search"]  # not write_doc, not delete_all
    assert "called" not in results, results
    assert results["refused"]["code"] == -32602
    assert "tool not available" in results["refused"]["message"]
    assert tool_upstream.calls() == before  # the upstream got no tools/call

    # The same grant may call a read-only tool: the refusal is the policy, not the client.
    results = asyncio.run(asyncio.wait_for(
        drive(node, mcp_url, "tools", "search", json.dumps({"query": "q"})), TOTAL_TIMEOUT))
    assert results["called"] == "found: q" and results["isError"] is False
    assert tool_upstream.calls().get("search", 0) == before.get("search", 0) + 1
