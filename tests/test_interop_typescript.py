"""The official TypeScript MCP SDK (tests/interop, pinned in its package-lock.json) as the
client, through the gateway to the Python SDK upstream, with the SDK's own OAuth code doing
discovery, registration, PKCE, the code exchange and the reactive refresh on 401.

tests/interop/ts_client.mjs prints one JSON line per step; this test plays the user agent:
it walks the ``{"authorize": URL}`` line through the gateway's sign-in at the real IdP and
the consent page, and writes the code back to the script's stdin. `make .venv/.dev` (so
`make test`) installs tests/interop/node_modules with `npm ci`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.support.browser import ScriptedBrowser

ROOT = Path(__file__).resolve().parent.parent
INTEROP = ROOT / "tests" / "interop"
SCRIPT = INTEROP / "ts_client.mjs"
SDK_PACKAGE = INTEROP / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json"
REDIRECT_URI = "http://127.0.0.1:53683/callback"
CAROL = {"sub": "carol-ts", "email": "carol@example.com", "email_verified": True, "name": "Carol"}
STEP_TIMEOUT = 30  # seconds for any one line of the script
TOTAL_TIMEOUT = 60


def _node() -> str:
    node = shutil.which("node")
    assert node, "node is not on PATH: the TypeScript interop test needs Node 20+"
    assert SDK_PACKAGE.exists(), (
        f"{SDK_PACKAGE.relative_to(ROOT)} is missing: run `make .venv/.dev` "
        "(or `npm ci --prefix tests/interop`)"
    )
    return node


def _pinned_sdk_version() -> str:
    lock = json.loads((INTEROP / "package-lock.json").read_text())
    return lock["packages"]["node_modules/@modelcontextprotocol/sdk"]["version"]


class ScriptFailed(AssertionError):
    pass


async def _drive(node: str, mcp_url: str, gateway_url: str) -> tuple[dict, dict, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    process = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), mcp_url,
        cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stderr_task = asyncio.create_task(process.stderr.read())
    lines: list[dict] = []

    async def failure(message: str) -> ScriptFailed:
        if process.returncode is None:
            process.kill()
        await process.wait()
        stderr = (await stderr_task).decode(errors="replace")
        return ScriptFailed(f"{message}\nstdout lines: {lines}\nstderr:\n{stderr[-4000:]}")

    async def next_line() -> dict:
        try:
            raw = await asyncio.wait_for(process.stdout.readline(), STEP_TIMEOUT)
        except TimeoutError:
            raise await failure("the TypeScript client went silent") from None
        if not raw:
            raise await failure("the TypeScript client exited early")
        line = json.loads(raw)
        lines.append(line)
        if "error" in line:
            raise await failure(f"the TypeScript client failed: {line['error']}")
        return line

    try:
        first = await next_line()
        assert set(first) == {"authorize"}, first
        authorize_url = first["authorize"]
        async with ScriptedBrowser() as browser:
            redirect = await browser.authorize(authorize_url, stop_at=REDIRECT_URI, idp_login=CAROL)
        process.stdin.write(redirect.get("code", "").encode() + b"\n")
        await process.stdin.drain()
        while True:
            line = await next_line()
            if line == {"done": True}:
                break
        if await asyncio.wait_for(process.wait(), STEP_TIMEOUT) != 0:
            raise await failure(f"the TypeScript client exited with status {process.returncode}")
        return parse_qs(urlsplit(authorize_url).query), redirect, lines
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if not stderr_task.done():
            stderr_task.cancel()


def test_typescript_sdk_client_does_oauth_and_mcp_through_the_gateway(gateway, upstream):
    node = _node()
    assert _pinned_sdk_version().startswith("1.")
    server_id = gateway.add_server(upstream.url, CAROL["email"])
    mcp_url = f"{gateway.url}/mcp/{server_id}"

    query, redirect, lines = asyncio.run(
        asyncio.wait_for(_drive(node, mcp_url, gateway.url), TOTAL_TIMEOUT)
    )

    # What the TS SDK put in the authorization request (its own startAuthorization).
    assert query["response_type"] == ["code"]
    assert query["redirect_uri"] == [REDIRECT_URI]
    assert query["code_challenge_method"] == ["S256"]
    assert query["resource"] == [mcp_url]
    # What the gateway sent back to the redirect URI.
    assert "error" not in redirect, redirect
    assert redirect["code"]
    assert redirect["iss"] == gateway.url
    assert redirect["state"] == query["state"][0]

    results = {key: value for line in lines for key, value in line.items()}
    assert results["authorized"]["has_refresh_token"] is True
    assert results["authorized"]["token_type"].lower() == "bearer"
    assert {"echo", "count", "fail"} <= set(results["tools"])
    assert results["echo"] == "echo: hi"
    assert results["count"] == "counted 3"
    assert results["progress"] == [1, 2, 3]
    assert results["fail"]["isError"] is True
    assert results["fail"]["text"].startswith("Error executing tool fail")
    assert results["resource"] == "hello from the upstream"
    assert results["prompt"] == "Please review: x"
    # The reactive refresh: a 401 on a garbage access token, the SDK refreshed and retried
    # without a second authorization, and the gateway handed back a refresh token.
    assert results["refreshed"] is True
    assert results["tools_after_refresh"] == len(results["tools"])
    assert results["has_refresh_token"] is True
    assert results["invalidated"] == []
    assert results["done"] is True
