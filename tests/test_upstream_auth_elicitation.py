"""Connected accounts for 2026-07-28 clients (issue 11): without a usable account, a tools/call
from a client that declared URL elicitation is answered with an `input_required` result asking
the user to open the connect page; the SDK client's retry (new id, the gateway's sealed
requestState and the user's answer) reaches the stock SDK upstream with neither, as the call it
was. Real processes: the gateway, the OAuth upstream (its MCPServer refuses any requestState it did
not mint) and the MCP Python SDK client."""

from __future__ import annotations

import json

import httpx
import mcp_types
import pytest

from services.authserver.keys import SecretBox
from services.proxy import connect_elicitation
from services.proxy.protocol import jsonrpc
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import run
from tests.support.mcp_oauth import connect
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.upstream_accounts import (  # noqa: F401 (fixtures)
    ALICE_AT_UPSTREAM,
    OWNER,
    alices_client,
    credential,
    gateway,
    server_id,
    signed_in,
    to_callback,
    upstream,
    whoami_text,
)

MODERN = "2026-07-28"


def introspected(upstream: OAuthUpstream) -> int:
    return len(upstream.stats()["introspected"])


async def disconnect(browser: ScriptedBrowser, gateway: GatewayProcess, server_id: str) -> None:
    page = await browser.follow(f"{gateway.url}/dashboard/connections")
    page = await browser.submit(page, "server_id")  # Disconnect
    assert page.status == 200 and await credential(gateway, OWNER, server_id) is None


def modern_call(request_id: int, params: dict, capabilities: dict) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {
        **params, "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                            "io.modelcontextprotocol/clientCapabilities": capabilities}}}


async def post(rig, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as http:
        return await http.post(rig.server_url, content=json.dumps(body), headers={
            "Authorization": f"Bearer {rig.tokens.access_token}",
            "Accept": "application/json, text/event-stream", "Content-Type": "application/json",
            "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": body["params"]["name"]})


def test_the_sdk_client_is_asked_to_connect_and_its_retry_reaches_the_upstream_as_the_plain_call(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    link = f"{gateway.url}/oauth/upstream/connect/{server_id}"
    asked: list[mcp_types.ElicitRequestURLParams] = []

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            async def connect_account(context, params):
                # The user opens the link and connects at the upstream, then says done.
                asked.append(params)
                assert (await browser.follow(await to_callback(browser, gateway, server_id))).status == 200
                return mcp_types.ElicitResult(action="accept")

            async with alices_client(browser, gateway, server_id, upstream, mode=MODERN,
                                     elicitation_callback=connect_account) as (rig, client):
                await disconnect(browser, gateway, server_id)
                mark = introspected(upstream)

                # One call: asked once, connected in between, answered by the upstream (whose SDK
                # server would refuse a requestState it did not mint with -32602).
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                assert len(asked) == 1 and asked[0].mode == "url" and asked[0].url == link
                assert "connect" in asked[0].message
                assert await credential(gateway, OWNER, server_id) is not None
                assert introspected(upstream) == mark + 1  # only the retry reached the upstream

    scenario()


@pytest.mark.parametrize("answer, times_asked", [
    ("decline", 1), ("cancel", 1), ("accept", connect_elicitation.MAX_ROUNDS)])
def test_an_elicitation_not_followed_by_connecting_ends_in_the_tool_error_and_reaches_nothing(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream, answer: str, times_asked: int) -> None:
    """Declined or cancelled: the tool result with the link at once. Accepted without connecting
    (the user closed the page): asked again, at most MAX_ROUNDS times for one call."""
    link = f"{gateway.url}/oauth/upstream/connect/{server_id}"
    asked: list[str] = []

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            async def respond(context, params):
                asked.append(params.url)
                return mcp_types.ElicitResult(action=answer)

            async with alices_client(browser, gateway, server_id, upstream, mode=MODERN,
                                     elicitation_callback=respond) as (rig, client):
                await disconnect(browser, gateway, server_id)
                mark = introspected(upstream)
                result = await client.call_tool("whoami", {})
                assert asked == [link] * times_asked
                assert result.is_error and link in result.content[0].text
                assert introspected(upstream) == mark

    scenario()


def test_a_client_that_declared_no_url_elicitation_gets_the_tool_error_with_the_link(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    link = f"{gateway.url}/oauth/upstream/connect/{server_id}"

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            # No elicitation callback: the client declares none.
            async with alices_client(browser, gateway, server_id, upstream, mode=MODERN) as (rig, client):
                await disconnect(browser, gateway, server_id)
                result = await client.call_tool("whoami", {})
                assert result.is_error and link in result.content[0].text
            # Form elicitation only: asking for a URL would be an input type it did not declare.
            answer = await post(rig, modern_call(3, {"name": "whoami", "arguments": {}}, {"elicitation": {"form": {}}}))
            assert answer.status_code == 200 and answer.json()["result"]["isError"] is True
            assert answer.json()["result"]["resultType"] == "complete"

    scenario()


def test_the_gateways_request_state_is_sealed_bound_to_user_call_and_arguments_and_expires(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    url_capable = {"elicitation": {"url": {}}}

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            rig = await signed_in(browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
            async with connect(rig, mode=MODERN) as client:
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
            await disconnect(browser, gateway, server_id)
            first = await post(rig, modern_call(1, {"name": "whoami", "arguments": {"a": 1}}, url_capable))
            assert first.status_code == 200
            result = first.json()["result"]
            assert result["resultType"] == "input_required" and "ttlMs" not in result
            request = result["inputRequests"][connect_elicitation.INPUT_KEY]
            assert request["method"] == "elicitation/create" and request["params"]["mode"] == "url"
            state = result["requestState"]
            assert state.startswith(connect_elicitation.STATE_PREFIX) and "whoami" not in state  # opaque
            answered = {connect_elicitation.INPUT_KEY: {"action": "accept"}}

            async def retry(params: dict) -> httpx.Response:
                return await post(rig, modern_call(2, {"name": "whoami", "inputResponses": answered, **params},
                                                   url_capable))

            # Tampered, for other arguments, for another tool: refused, -32602, nothing sent on.
            mark = introspected(upstream)
            tampered = state[:-4] + ("AAAA" if not state.endswith("AAAA") else "BBBB")
            for params in ({"arguments": {"a": 1}, "requestState": tampered},
                           {"arguments": {"a": 2}, "requestState": state}):
                refused = await retry(params)
                assert refused.status_code == 400, refused.text
                assert refused.json()["error"]["code"] == jsonrpc.INVALID_PARAMS
            other_tool = await post(rig, {**modern_call(2, {"name": "other", "arguments": {"a": 1}}, url_capable)})
            assert other_tool.json()["result"]["resultType"] == "input_required"  # a new call, asked anew
            assert introspected(upstream) == mark
            # The right one: still not connected, so asked again (round 2).
            again = await retry({"arguments": {"a": 1}, "requestState": state})
            assert again.json()["result"]["resultType"] == "input_required"

    scenario()


def test_request_state_does_not_open_for_another_user_or_server_or_after_its_ttl() -> None:
    box = SecretBox(b"k" * 32)
    message = jsonrpc.parse_message(json.dumps(modern_call(1, {"name": "t", "arguments": {}}, {})))
    reply = connect_elicitation.input_required(box, message, "alice", "srv", "https://gw/x", "connect",
                                               rounds=0, now=1000.0)
    retry = jsonrpc.parse_message(json.dumps(modern_call(2, {
        "name": "t", "arguments": {}, "requestState": reply["result"]["requestState"],
        "inputResponses": {connect_elicitation.INPUT_KEY: {"action": "accept"}, "other": {"action": "accept"}}}, {})))
    taken = connect_elicitation.take_retry(box, retry, "alice", "srv", now=1000.0 + connect_elicitation.STATE_TTL - 1)
    assert taken is not None and taken.rounds == 1 and taken.action == "accept"
    forwarded = json.loads(taken.body)
    assert forwarded["id"] == 2 and "requestState" not in forwarded["params"]
    assert "inputResponses" not in forwarded["params"] and forwarded["params"]["_meta"]
    for sub, server, now in (("bob", "srv", 1000.0), ("alice", "other", 1000.0),
                             ("alice", "srv", 1000.0 + connect_elicitation.STATE_TTL + 1)):
        with pytest.raises(connect_elicitation.InvalidRequestState):
            connect_elicitation.take_retry(box, retry, sub, server, now=now)
    # An upstream's own round passes untouched.
    upstream_round = jsonrpc.parse_message(json.dumps(modern_call(3, {"name": "t", "requestState": "theirs"}, {})))
    assert connect_elicitation.take_retry(box, upstream_round, "alice", "srv", now=1000.0) is None

