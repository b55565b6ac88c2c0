""""Connected as who" (issue 11): the account's name comes from the upstream authorization server's
own userinfo endpoint (real AS process on loopback) and the Connections page shows it."""

from __future__ import annotations

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


def test_the_connections_page_shows_who_the_upstream_says_the_account_is(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        asked = upstream.stats()["userinfo"]
        async with ScriptedBrowser() as browser:
            rig = await signed_in(browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
            async with connect(rig) as client:
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
            assert upstream.stats()["userinfo"] == asked + 1  # asked once, with the new token
            stored = await credential(gateway, OWNER, server_id)
            assert stored is not None and stored.upstream_subject == ALICE_AT_UPSTREAM
            page = await browser.follow(f"{gateway.url}/dashboard/connections")
            assert page.status == 200
            assert f"Connected as <strong>{ALICE_AT_UPSTREAM}</strong>" in page.text

    scenario()


def test_an_upstream_that_will_not_say_who_leaves_the_account_connected_without_a_name(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        upstream.control(userinfo_status=403)
        try:
            async with ScriptedBrowser() as browser:
                rig = await signed_in(browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
                async with connect(rig) as client:
                    assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                stored = await credential(gateway, OWNER, server_id)
                assert stored is not None and stored.upstream_subject == ""
                page = await browser.follow(f"{gateway.url}/dashboard/connections")
                assert page.status == 200 and 'data-status="connected"' in page.text
                assert "Connected as" not in page.text and ALICE_AT_UPSTREAM not in page.text
        finally:
            upstream.control(userinfo_status=0)

    scenario()
