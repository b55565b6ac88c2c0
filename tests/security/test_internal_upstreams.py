"""Internal upstreams after registration (issue 7, finding 20, the DNS-rebinding half): a
server someone other than an administrator registered may reach public addresses only,
at every connection the gateway makes for it (the proxy, the session-ending DELETE, Test
connection, the CLI's test), not only when it was registered. Internal addresses
(MCPGW_UPSTREAM_ALLOW=127.0.0.0/8 here) stay open to servers an administrator or the CLI
approved (Server.internal_upstream).

A real gateway process with MCPGW_ADMIN_EMAILS set. DNS cannot be re-pointed here, and no
traffic may leave loopback, so the rebinding is staged as its outcome: Mallory (no role)
registers a server on a public address through the gateway's own ServerRegistry (which
only resolves, never connects), then the stored upstream is changed behind the registry's
back to a loopback URL, by host name and by literal: the server's target is now internal
without anyone having approved it, as a DNS change would make it. The loopback upstreams
count every connection they accept: the refused ones must see none.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import httpx
import pytest

from config import Config
from services import build_services
from services.authserver.signin import dev_subject
from services.proxy.upstream.errors import UpstreamRefused
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream.pool import UpstreamClient
from storage.base import Consent, RefreshFamily, RefreshToken
from tests.support.fake_upstream import RawExchange, RawUpstream
from tests.support.gateway import GatewayProcess

ROOT = "root@example.com"  # an administrator
MALLORY = "mallory@example.com"  # signed in, no role
PUBLIC_URL = "http://8.8.8.8:9/mcp"  # stored only: the registry resolves a literal without connecting
POLICY_REFUSAL = "the gateway's address policy refuses the upstream MCP server's address"
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2025-11-25"}


async def answer(exchange: RawExchange) -> None:
    try:
        request_id = json.loads(exchange.body or b"null").get("id")
    except (ValueError, AttributeError):
        request_id = None
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {"path": exchange.path}}).encode()
    exchange.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body))


# -------------------------------------------------------------------------- fixtures


class Rig:
    def __init__(self, gw: GatewayProcess, victim: RawUpstream, approved: RawUpstream):
        self.gw = gw
        self.victim = victim  # the internal service Mallory wants to read
        self.approved = approved  # an internal service administrators put behind the gateway
        self.users: dict[str, httpx.Client] = {}
        self.families = 0

    @property
    def db(self) -> str:
        return str(self.gw.state_dir / "gateway.db")

    def user(self, email: str) -> httpx.Client:
        if email not in self.users:
            client = httpx.Client(base_url=self.gw.url, follow_redirects=False, timeout=30, trust_env=False)
            client.get("/login")
            response = client.post("/login", data={"email": email, "next": "/dashboard",
                                                   "_xsrf": client.cookies["_xsrf"]})
            assert response.status_code == 302, response.text
            client.get("/api/me")  # sets the _xsrf cookie for the API
            self.users[email] = client
        return self.users[email]

    def api(self, email: str, method: str, path: str, body=None) -> httpx.Response:
        client = self.user(email)
        return client.request(method, path, json=body, headers={"X-XSRFToken": client.cookies["_xsrf"]})

    def services(self, job):
        """Run `job(services)` on the gateway's own services, built in this process on its
        storage and secret (the registry as every way in uses it; token minting)."""

        async def main():
            services = build_services(Config.from_env(self.gw.env))
            await services.start(background=False)
            try:
                return await job(services)
            finally:
                await services.stop()

        return asyncio.run(main())

    def register_as_mallory(self, name: str) -> str:
        self.user(MALLORY)
        server = self.services(lambda s: s.servers.add(
            name=name, upstream_url=PUBLIC_URL, owner_email=MALLORY, owner_sub=dev_subject(MALLORY),
            internal_allowed=False))
        assert self.stored(server.server_id) == (PUBLIC_URL, 0)
        return server.server_id

    def stored(self, server_id: str) -> tuple[str, int]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT upstream_url, internal_upstream FROM servers WHERE server_id = ?",
                                (server_id,)).fetchone()

    def rebind(self, server_id: str, url: str) -> None:
        """What re-pointing the name at an internal address achieves, behind the registry."""
        with sqlite3.connect(self.db) as conn:
            changed = conn.execute("UPDATE servers SET upstream_url = ? WHERE server_id = ? AND upstream_url = ?",
                                   (url, server_id, PUBLIC_URL)).rowcount
        assert changed == 1  # never let the gateway near the public address
        assert self.stored(server_id) == (url, 0)

    def token(self, email: str, server_id: str) -> str:
        self.user(email)
        self.families += 1
        family_id = f"fam-internal-{self.families}"

        async def mint(s):
            user = await s.storage.get_user(dev_subject(email))
            client, _ = await s.clients.register({"client_name": "Internal upstreams",
                                                  "redirect_uris": ["http://127.0.0.1:9/cb"],
                                                  "token_endpoint_auth_method": "none"})
            audience = s.config.server_resource(server_id)
            now = time.time()
            scope = "mcp:connect mcp:invoke"
            family = RefreshFamily(family_id, client.client_id, user.sub, audience, scope, now, now + 86400,
                                   last_used_at=now)
            await s.storage.create_family(family, RefreshToken(
                "h-" + family_id, family_id, client.client_id, user.sub, scope, audience, now, now + 3600,
                now + 86400))
            await s.storage.put_consent(Consent(user.sub, client.client_id, audience, scope, now))
            return s.tokens.mint_access_token(user, client.client_id, scope, audience, family_id)

        return self.services(mint)

    def ping(self, server_id: str, token: str, request_id: int = 1) -> httpx.Response:
        return httpx.post(f"{self.gw.url}/mcp/{server_id}",
                          json={"jsonrpc": "2.0", "id": request_id, "method": "ping"},
                          headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}, timeout=30, trust_env=False)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    victim = RawUpstream(answer).start()
    approved = RawUpstream(answer).start()
    gw = GatewayProcess(tmp_path_factory.mktemp("internal-upstreams"),
                        extra_env={"MCPGW_ADMIN_EMAILS": ROOT, "MCPGW_UPSTREAM_ALLOW": "127.0.0.0/8"})
    gw.start()
    rig = Rig(gw, victim, approved)
    try:
        yield rig
    finally:
        for client in rig.users.values():
            client.close()
        gw.stop()
        victim.stop()
        approved.stop()
        assert "Traceback" not in gw.log_text()


def refused_by_policy(response: httpx.Response, request_id: int = 1) -> None:
    assert response.status_code == 502, (response.status_code, response.text[:300])
    assert response.json() == {"jsonrpc": "2.0", "id": request_id,
                               "error": {"code": -32603, "message": POLICY_REFUSAL}}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_non_admin_server_re_pointed_inward_is_refused_at_every_connection(rig, host):
    """Before: the proxy checked the connection against the whole allow-list, so Mallory's
    server, public at registration, read the internal service once it pointed there."""
    server_id = rig.register_as_mallory(f"Rebound via {host}")
    rig.rebind(server_id, f"http://{host}:{rig.victim.port}/victim")
    token = rig.token(MALLORY, server_id)
    mark = len(rig.gw.log_text())

    refused_by_policy(rig.ping(server_id, token))
    refused_by_policy(rig.ping(server_id, token, 2), 2)  # and again, from the DNS cache
    log = rig.gw.log_text()[mark:]
    assert f"upstream {server_id} refused by the address policy" in log
    assert "is a loopback address" in log and "public addresses only" in log

    # Test connection (the dashboard's probe) connects as the proxy would for this server.
    tested = rig.api(MALLORY, "POST", f"/api/servers/{server_id}/test")
    assert tested.status_code == 200, tested.text
    assert tested.json()["ok"] is False
    assert tested.json()["error"].startswith("refused by the gateway's address guard: upstream address 127.0.0.1")
    assert "public addresses only" in tested.json()["error"]

    # Her edits (the URL unchanged) never approve it.
    url = f"http://{host}:{rig.victim.port}/victim"
    edited = rig.api(MALLORY, "PATCH", f"/api/servers/{server_id}", {"name": "Renamed", "upstream_url": url})
    assert edited.status_code == 200, edited.text
    assert edited.json()["internal_upstream"] is False
    assert rig.stored(server_id) == (url, 0)
    refused_by_policy(rig.ping(server_id, token, 3), 3)

    assert rig.victim.connections == 0 and rig.victim.exchanges == []


def test_servers_administrators_or_the_cli_registered_reach_internal_upstreams(rig):
    registered = rig.api(ROOT, "POST", "/api/servers", {
        "name": "Approved tools", "upstream_url": f"http://localhost:{rig.approved.port}/admin", "headers": ""})
    assert registered.status_code == 201, registered.text
    assert registered.json()["internal_upstream"] is True
    by_admin = registered.json()["server_id"]
    by_cli = rig.gw.add_server(f"{rig.approved.url}/cli", ROOT, "Operator's tools")

    for server_id, path in ((by_admin, "/admin"), (by_cli, "/cli")):
        response = rig.ping(server_id, rig.token(ROOT, server_id))
        assert response.status_code == 200, response.text
        assert response.json()["result"] == {"path": path}
        assert rig.approved.of(path)
    shown = rig.gw.cli_json("servers", "show", by_cli)
    assert shown["internal_upstream"] is True
    assert "internal_upstream: True" in rig.gw.cli("servers", "show", by_admin).stdout


def test_an_administrator_edit_approves_and_a_non_admin_url_change_withdraws(rig):
    server_id = rig.register_as_mallory("Approved later")
    url = f"http://localhost:{rig.approved.port}/later"
    rig.rebind(server_id, url)
    token = rig.token(MALLORY, server_id)
    refused_by_policy(rig.ping(server_id, token))
    assert rig.approved.of("/later") == []

    # An administrator saving the server's URL (unchanged) approves it for internal addresses.
    edited = rig.api(ROOT, "PATCH", f"/api/servers/{server_id}", {"upstream_url": url})
    assert edited.status_code == 200, edited.text
    assert edited.json()["internal_upstream"] is True
    assert rig.stored(server_id) == (url, 1)
    deadline = time.monotonic() + 10  # the access cache takes up the change within seconds
    while (response := rig.ping(server_id, token)).status_code == 502 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert response.status_code == 200, response.text
    assert rig.approved.of("/later")

    # Mallory pointing it elsewhere withdraws the approval (through the registry: the
    # dashboard would also connect to check the new address, and nothing may leave loopback).
    moved = rig.services(lambda s: s.servers.update(server_id, upstream_url="http://8.8.4.4:9/mcp",
                                                    internal_allowed=False))
    assert moved.internal_upstream is False
    assert rig.stored(server_id) == ("http://8.8.4.4:9/mcp", 0)
    kept = rig.services(lambda s: s.servers.update(server_id, name="Renamed", internal_allowed=False))
    assert kept.internal_upstream is False


def test_the_upstream_client_public_only_check_ignores_the_allow_list_and_the_pool():
    """UpstreamClient.request(public_only=True): a literal or a name that resolves inward is
    refused before any connection, even when the allow-list covers it and the same client
    holds a pooled connection there, or has the name's answer cached."""

    async def main():
        async with RawUpstream(answer) as upstream:
            client = UpstreamClient(AddressPolicy.from_setting("127.0.0.0/8"))
            try:
                for host in ("127.0.0.1", "localhost"):
                    url = f"http://{host}:{upstream.port}/pooled"
                    response = await client.request("POST", url, [("Content-Type", "application/json")], b"{}")
                    await response.read_all(10000)
                    assert response.status == 200
                    opened = upstream.connections
                    assert client.idle_connections() >= 1
                    with pytest.raises(UpstreamRefused, match="public addresses only"):
                        await client.request("POST", url, None, b"{}", public_only=True)
                    assert upstream.connections == opened
                return len(upstream.exchanges)
            finally:
                client.close()

    assert asyncio.run(main()) == 2
