"""Two gateway processes behind one public URL on one DynamoDB table (moto in server mode
on loopback): any instance serves any request. A token issued by one is verified by the
other, an MCP session started on one continues on the other, and a revocation or a
sharing change made through one reaches the other within the caches' bound."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.tokens import access_token, register_public_client

ALICE = {"sub": "alice-multi", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
BOB = {"sub": "bob-multi", "email": "bob@example.com", "email_verified": True, "name": "Bob"}
LEGACY = "2025-11-25"


@pytest.fixture
def pair(idp, dynamodb_endpoint, tmp_path):
    """Instances A and B: one issuer (A's URL stands for the load balancer's), one table,
    one master secret; each with its own state directory and port."""
    table = f"gw-{uuid.uuid4().hex[:12]}"
    shared = {
        "MCPGW_STORAGE": f"dynamodb://{table}?region=us-east-1&endpoint={dynamodb_endpoint}",
        "MCPGW_SECRET_KEY": "m" * 48,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    first = GatewayProcess(tmp_path / "a", idp=idp, extra_env=shared)
    second = GatewayProcess(tmp_path / "b", idp=idp, extra_env={**shared, "MCPGW_PUBLIC_URL": first.url})
    client = idp.register_client([first.url + "/oauth/callback"])
    for gateway in (first, second):
        gateway.env.update(MCPGW_OIDC_CLIENT_ID=client.client_id, MCPGW_OIDC_CLIENT_SECRET=client.client_secret)
    first.start()
    second.start()
    yield first, second
    second.stop()
    first.stop()


def mcp(instance: GatewayProcess, server_id: str, token: str, message: dict, session: str | None = None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": LEGACY}
    if session:
        headers["Mcp-Session-Id"] = session
    return httpx.post(f"{instance.listen_url}/mcp/{server_id}", content=json.dumps(message),
                      headers=headers, timeout=20)


def answer(response: httpx.Response) -> dict:
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])
    return response.json()


def test_any_instance_serves_any_request(pair, upstream):
    a, b = pair
    server_id = a.add_server(upstream.url, ALICE["email"])
    b.cli("grants", "add", server_id, "--email", BOB["email"])  # a change made through B

    async def tokens():
        async with httpx.AsyncClient(base_url=a.url, timeout=20) as http:
            client_id = await register_public_client(http, "Multi-instance")
            resource = f"{a.url}/mcp/{server_id}"
            async with ScriptedBrowser() as browser:
                alice = await access_token(a.url, http, browser, client_id, ALICE, resource=resource)
            async with ScriptedBrowser() as browser:
                bob = await access_token(a.url, http, browser, client_id, BOB, resource=resource)
            return alice, bob

    alice, bob = asyncio.run(tokens())

    # Issued by A, verified by B (the signing key comes from the shared table).
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    started = mcp(b, server_id, alice, initialize)
    assert started.status_code == 200, started.text
    session = started.headers["mcp-session-id"]
    assert session.startswith("mcpgw-")
    mcp(b, server_id, alice, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)

    # The session started on B continues on A.
    listed = mcp(a, server_id, alice, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    assert listed.status_code == 200, listed.text
    assert "echo" in {tool["name"] for tool in answer(listed)["result"]["tools"]}
    # Bob (shared through B's CLI) may use the server, but not Alice's session, anywhere.
    assert mcp(a, server_id, bob, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, session).status_code == 404
    assert mcp(b, server_id, bob, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, session).status_code == 404

    # Removing Bob's grant through A is refused on B within the cache bound.
    a.cli("grants", "remove", server_id, "--email", BOB["email"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if mcp(b, server_id, bob, initialize).status_code == 403:
            break
        time.sleep(0.3)
    assert mcp(b, server_id, bob, initialize).status_code == 403

    # Revoking Alice's authorization through A's CLI stops her token on B too.
    a.cli("authorizations", "revoke", "--user", ALICE["email"], "--client",
          json.loads(a.cli("--json", "authorizations", "list", "--user", ALICE["email"]).stdout)[0]["client_id"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if mcp(b, server_id, alice, initialize).status_code == 401:
            break
        time.sleep(0.3)
    refused = mcp(b, server_id, alice, initialize)
    assert refused.status_code == 401 and "invalid_token" in refused.headers["www-authenticate"]
