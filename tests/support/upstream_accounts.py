"""Shared set-up of the connected-accounts tests (issue 11): the real OAuth upstream and a
gateway process as fixtures, the users, and the browser steps of connecting an account."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode

import pytest

from storage import SqliteStorage
from storage.upstream_auth import UpstreamCredential
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.mcp_oauth import OAuthRig, connect, make_oauth_rig
from tests.support.oauth_upstream import OAuthUpstream

OWNER = "owner@example.com"
FRIEND = "friend@example.com"
ALICE_AT_UPSTREAM = "alice-at-upstream"
BOB_AT_UPSTREAM = "bob-at-upstream"


@pytest.fixture(scope="module")
def upstream():
    process = OAuthUpstream().wait_ready()
    yield process
    process.stop()


@pytest.fixture
def gateway(tmp_path: Path):
    process = GatewayProcess(tmp_path / "gw").start()
    yield process
    process.stop()


@pytest.fixture
def server_id(gateway: GatewayProcess, upstream: OAuthUpstream) -> str:
    """An oauth server of OWNER, shared with FRIEND; the upstream's test knobs back to normal."""
    upstream.control(access_ttl=3600, token_status=0, issue_scopes=[])
    server = gateway.add_server(upstream.mcp_url, OWNER, "Upstream with accounts", "--upstream-auth", "oauth")
    gateway.cli("grants", "add", server, "--email", FRIEND)
    return server


async def sign_in(browser: ScriptedBrowser, gateway: GatewayProcess, email: str) -> None:
    page = await browser.follow(f"{gateway.url}/login?next=/dashboard")
    page = await browser.submit(page, "email", {"email": email})
    assert page.status == 200, page.text


async def upstream_user(browser: ScriptedBrowser, upstream: OAuthUpstream, who: str) -> None:
    """Who the upstream AS signs in (its test cookie; the AS shows no form)."""
    await browser.follow(f"{upstream.issuer}/signin?{urlencode({'user': who})}")


async def to_callback(browser: ScriptedBrowser, gateway: GatewayProcess, server_id: str) -> str:
    """Connect page → Connect (POST) → the upstream AS → the callback URL (not requested)."""
    page = await browser.follow(f"{gateway.url}/oauth/upstream/connect/{server_id}")
    assert page.status == 200 and 'data-testid="connect-button"' in page.text, page.text
    stopped = await browser.submit(page, "return_to", stop_at=f"{gateway.url}/oauth/upstream/callback")
    assert stopped.stopped_at, stopped.text
    return stopped.stopped_at


async def owners_trip(browser: ScriptedBrowser, gateway: GatewayProcess, server_id: str,
                      upstream: OAuthUpstream) -> str:
    """OWNER signed in, ALICE_AT_UPSTREAM at the upstream: the callback URL of a connect trip."""
    await sign_in(browser, gateway, OWNER)
    await upstream_user(browser, upstream, ALICE_AT_UPSTREAM)
    return await to_callback(browser, gateway, server_id)


async def credential(gateway: GatewayProcess, email: str, server_id: str) -> UpstreamCredential | None:
    """The stored upstream credential of the user with this e-mail (the gateway's own SQLite file)."""
    storage = SqliteStorage(str(gateway.state_dir / "gateway.db"))
    await storage.open()
    try:
        users = await storage.users_matching("email", email)
        assert len(users) == 1
        return await storage.upstream_auth.get_credential(users[0].sub, server_id)
    finally:
        await storage.close()


async def signed_in(browser: ScriptedBrowser, gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream,
                    email: str, who: str) -> OAuthRig:
    """An SDK client of `email`, whose sign-in connected the upstream account `who`."""
    await upstream_user(browser, upstream, who)
    return make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, email=email)


@asynccontextmanager
async def alices_client(browser: ScriptedBrowser, gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream,
                        **client_kwargs):
    """(rig, client): OWNER's SDK client through the gateway, signed in with ALICE_AT_UPSTREAM
    connected, checked by one whoami that answers that identity."""
    rig = await signed_in(browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
    async with connect(rig, **client_kwargs) as client:
        assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
        yield rig, client


def whoami_text(result) -> str:
    assert not result.is_error, result
    return result.content[0].text


def token_requests(upstream: OAuthUpstream, grant_type: str, subject: str) -> int:
    """How many token requests of this grant type the upstream AS answered for `subject`."""
    return sum(1 for r in upstream.stats()["token_requests"]
               if r["grant_type"] == grant_type and r["subject"] == subject)
