"""Connected accounts on the proxy (issue 11), with real processes on loopback: a gateway whose
server has upstream_auth=oauth in front of the real OAuth upstream (tests/support/oauth_upstream.py:
an AS process and an SDK MCP resource server whose `whoami` answers the token's subject), and the
MCP Python SDK's OAuth client signing users in through the upstream detour. The user's own upstream
token goes on the upstream hop (refreshed, retried once after a 401); without a usable account the
call is answered with the connect link and nothing reaches the upstream."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from services.proxy import connect_required
from services.proxy.protocol import jsonrpc
from services.proxy.upstream_auth.errors import ConnectRequired, UpstreamAuthTemporarilyUnavailable
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import run
from tests.support.mcp_oauth import connect
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.upstream_accounts import (  # noqa: F401 (fixtures)
    ALICE_AT_UPSTREAM,
    BOB_AT_UPSTREAM,
    FRIEND,
    OWNER,
    alices_client,
    credential,
    gateway,
    server_id,
    sign_in,
    signed_in,
    to_callback,
    token_requests,
    upstream,
    whoami_text,
)


def introspected(upstream: OAuthUpstream) -> list[dict]:
    """Every bearer token the upstream MCP server received, in order."""
    return upstream.stats()["introspected"]


# ------------------------------------------------------------------ token injection


def test_two_users_each_see_their_own_upstream_identity_and_no_gateway_token_goes_upstream(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        seen_before = len(introspected(upstream))
        async with ScriptedBrowser() as alice_browser, ScriptedBrowser() as bob_browser:
            alice = await signed_in(alice_browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
            bob = await signed_in(bob_browser, gateway, server_id, upstream, FRIEND, BOB_AT_UPSTREAM)
            async with connect(alice) as alice_client, connect(bob) as bob_client:
                for _ in range(2):  # interleaved: cached tokens never cross users
                    assert whoami_text(await alice_client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                    assert whoami_text(await bob_client.call_tool("whoami", {})) == BOB_AT_UPSTREAM
            gateway_tokens = {alice.tokens.access_token, bob.tokens.access_token}  # type: ignore[union-attr]
        seen = introspected(upstream)[seen_before:]
        assert seen, "the upstream saw no bearer token"
        # Only tokens its own AS issued, all accepted: the MCP client's gateway token never went upstream.
        assert all(entry["active"] for entry in seen), seen
        assert not gateway_tokens & {entry["token"] for entry in seen}
        assert await credential(gateway, OWNER, server_id) is not None
        assert await credential(gateway, FRIEND, server_id) is not None

    scenario()


# ------------------------------------------------------------------------ refresh


def test_an_access_token_the_upstream_stopped_accepting_is_refreshed_and_the_call_retried(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            async with alices_client(browser, gateway, server_id, upstream) as (rig, client):
                refreshes = token_requests(upstream, "refresh_token", ALICE_AT_UPSTREAM)
                mark = len(introspected(upstream))
                upstream.control(expire_access=ALICE_AT_UPSTREAM)  # the refresh token lives on
                # The upstream answers 401 to the held token: refreshed, and the call sent again.
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                assert token_requests(upstream, "refresh_token", ALICE_AT_UPSTREAM) == refreshes + 1
                seen = introspected(upstream)[mark:]
                assert [entry["active"] for entry in seen][:1] == [False] and seen[-1]["active"]
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                assert token_requests(upstream, "refresh_token", ALICE_AT_UPSTREAM) == refreshes + 1

    scenario()


def test_an_expired_access_token_is_refreshed_without_the_client_noticing(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        upstream.control(access_ttl=1)  # tokens issued from now on live one second
        try:
            async with ScriptedBrowser() as browser:
                async with alices_client(browser, gateway, server_id, upstream) as (rig, client):
                    refreshes = token_requests(upstream, "refresh_token", ALICE_AT_UPSTREAM)
                    await asyncio.sleep(1.5)  # past its lifetime (waiting, not measuring)
                    assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                    assert token_requests(upstream, "refresh_token", ALICE_AT_UPSTREAM) > refreshes
        finally:
            upstream.control(access_ttl=3600)

    scenario()


# ---------------------------------------------------------- no usable account


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_after_disconnect_a_tools_call_is_a_tool_error_with_the_connect_link_and_reaches_nothing(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream, mode: str) -> None:
    link = f"{gateway.url}/oauth/upstream/connect/{server_id}"

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            async with alices_client(browser, gateway, server_id, upstream, mode=mode) as (rig, client):
                page = await browser.follow(f"{gateway.url}/dashboard/connections")
                page = await browser.submit(page, "server_id")  # Disconnect
                assert page.status == 200 and await credential(gateway, OWNER, server_id) is None
                mark = len(introspected(upstream))

                result = await client.call_tool("whoami", {})
                assert result.is_error and link in result.content[0].text
                # Other requests: a JSON-RPC error with the link, never a 401: the URL elicitation
                # error for 2025-era clients; 2026-07-28 removed -32042 and elicitationId, so its
                # clients get an implementation-defined code with the link.
                with pytest.raises(MCPError) as raised:
                    await client.list_tools()
                assert link in raised.value.error.message
                if mode == "legacy":
                    assert raised.value.code == connect_required.URL_ELICITATION_REQUIRED
                    assert raised.value.error.data["elicitations"][0]["url"] == link
                else:
                    assert raised.value.code == connect_required.CONNECT_REQUIRED_2026
                    assert raised.value.error.data == {"url": link}
                assert len(introspected(upstream)) == mark  # the upstream received nothing

            # On the wire: HTTP 200, the request's id, no challenge.
            async with httpx.AsyncClient(trust_env=False) as http:
                answer = await http.post(rig.server_url, headers={
                    "Authorization": f"Bearer {rig.tokens.access_token}",  # type: ignore[union-attr]
                    "Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                    "MCP-Protocol-Version": "2025-11-25",
                }, content=json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                       "params": {"name": "whoami", "arguments": {}}}))
            assert answer.status_code == 200 and "WWW-Authenticate" not in answer.headers
            body = answer.json()
            assert body["id"] == 7 and body["result"]["isError"] is True
            assert link in body["result"]["content"][0]["text"]
            assert len(introspected(upstream)) == mark

    scenario()


def test_an_upstream_grant_revoked_at_the_upstream_drops_the_account_and_answers_the_link(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            async with alices_client(browser, gateway, server_id, upstream) as (rig, client):
                upstream.control(revoke_user=ALICE_AT_UPSTREAM)  # access and refresh tokens die
                result = await client.call_tool("whoami", {})
                assert result.is_error and f"/oauth/upstream/connect/{server_id}" in result.content[0].text
        assert await credential(gateway, OWNER, server_id) is None

    scenario()


def test_an_authorization_server_failing_during_refresh_is_a_503_and_keeps_the_account(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            async with alices_client(browser, gateway, server_id, upstream) as (rig, client):
                upstream.control(expire_access=ALICE_AT_UPSTREAM, token_status=500)
                try:
                    with pytest.raises(MCPError) as raised:
                        await client.call_tool("whoami", {})
                    assert "temporarily unavailable" in raised.value.error.message
                finally:
                    upstream.control(token_status=0)
                assert await credential(gateway, OWNER, server_id) is not None
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM

    scenario()


# ------------------------------------------------------------- the answers' shapes


def test_the_connect_answers_for_batches_notifications_and_get() -> None:
    exc = ConnectRequired("connect your account for this server first", "https://gw.example/oauth/upstream/connect/s")
    batch = jsonrpc.parse_message(json.dumps([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
        {"jsonrpc": "2.0", "id": "b", "method": "resources/list"},
    ]).encode())
    answer = connect_required.answer_for(batch, exc)
    replies = json.loads(answer.body)
    assert answer.status == 200 and [r["id"] for r in replies] == [1, "b"]
    assert replies[0]["result"]["isError"] is True and exc.url in replies[0]["result"]["content"][0]["text"]
    assert replies[1]["error"]["code"] == connect_required.URL_ELICITATION_REQUIRED
    # 2026-07-28 removed -32042 and elicitationId: never emitted to its clients.
    single = jsonrpc.parse_message(b'{"jsonrpc":"2.0","id":3,"method":"resources/list"}')
    modern = json.loads(connect_required.answer_for(single, exc, "2026").body)
    assert modern["error"]["code"] == connect_required.CONNECT_REQUIRED_2026 and -32019 <= modern["error"]["code"] <= -32000
    assert exc.url in modern["error"]["message"] and "elicitationId" not in json.dumps(modern)
    notification = jsonrpc.parse_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    for message in (notification, None):  # no id to answer: an HTTP error, never a 401
        answer = connect_required.answer_for(message, exc)
        assert answer.status == 403 and exc.url in json.loads(answer.body)["error"]["message"]
    temporary = connect_required.answer_for(None, UpstreamAuthTemporarilyUnavailable("the AS answered 502", 7))
    assert temporary.status == 503 and temporary.retry_after == 7


# ------------------------------------------------------------- more permissions


def test_an_upstream_403_insufficient_scope_answers_the_link_to_connect_again_and_keeps_the_account(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    link = f"{gateway.url}/oauth/upstream/connect/{server_id}"

    @run
    async def scenario() -> None:
        upstream.control(issue_scopes=["profile"])  # its AS grants less than its MCP server needs
        async with ScriptedBrowser() as browser:
            rig = await signed_in(browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
            # The SDK server answers 403 insufficient_scope (to initialize already): not the 502 of
            # a refused gateway, and not a 401 that would send the client through the gateway's
            # sign-in again, but the link to connect again.
            with pytest.raises(BaseException) as raised:
                async with connect(rig):
                    pass
            error = raised.value
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]  # the SDK's task group wraps what initialize raised
            assert isinstance(error, MCPError) and error.code == connect_required.URL_ELICITATION_REQUIRED
            assert link in error.error.message and "more permissions" in error.error.message
            assert await credential(gateway, OWNER, server_id) is not None  # the account is kept
            upstream.control(issue_scopes=[])
            await browser.follow(await to_callback(browser, gateway, server_id))
            async with connect(rig) as client:
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM

    scenario()


def test_a_connect_link_asking_for_more_scope_shows_it_and_asks_the_upstream_for_it(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    link = f"{gateway.url}/oauth/upstream/connect/{server_id}"

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            await sign_in(browser, gateway, OWNER)
            page = await browser.follow(f"{link}?scope=repo+read%3Aorg")
            assert page.status == 200 and 'data-testid="connect-scope"' in page.text and "read:org" in page.text
            stopped = await browser.submit(page, "return_to", stop_at=f"{upstream.issuer}/authorize")
            asked = parse_qs(urlsplit(stopped.stopped_at).query)["scope"][0].split()
            assert asked == ["mcp", "repo", "read:org"]  # the usual scope first, the link's besides
            for hostile in ('a"b', " ".join(f"s{i}" for i in range(21)), "x" * 201, "a\tb"):
                refused = await browser.follow(f"{link}?{urlencode({'scope': hostile})}")
                assert refused.status == 400 and "not valid" in refused.text

    scenario()
