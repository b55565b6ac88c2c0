"""The MCP SDK client through the gateway to the MCP SDK server, both protocol eras, with
the whole OAuth flow at a real OIDC provider in front."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from tests.support.browser import ScriptedBrowser
from tests.support.mcp_oauth import connect, make_oauth_rig

ALICE = {"sub": "alice-proxy", "email": "alice@example.com", "email_verified": True, "name": "Alice"}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("which", ["stateful", "stateless"])
def test_tools_resources_prompts_through_the_gateway(gateway, upstream, stateless_upstream, mode, which):
    target = upstream if which == "stateful" else stateless_upstream
    server_id = gateway.add_server(target.url, ALICE["email"])

    async def main():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE)
            progress: list[float] = []

            async def on_progress(value, total, message):
                progress.append(value)

            async with connect(rig, mode=mode) as client:
                tools = await client.list_tools()
                assert {"echo", "count", "fail"} <= {t.name for t in tools.tools}
                result = await client.call_tool("echo", {"text": "hi"})
                assert result.content[0].text == "echo: hi"
                result = await client.call_tool("count", {"steps": 3}, progress_callback=on_progress)
                assert result.content[0].text == "counted 3"
                failed = await client.call_tool("fail", {})
                assert failed.is_error
                resource = await client.read_resource("memo://greeting")
                assert resource.contents[0].text == "hello from the upstream"
                prompt = await client.get_prompt("review", {"code": "x = 1"})
                assert "Please review: x = 1" in prompt.messages[0].content.text
            if which == "stateful" and mode == "legacy":
                assert progress == [1, 2, 3]

    asyncio.run(main())



def accepting_elicitation():
    """The prompts an elicitation callback was asked, and the callback: it accepts with
    {"confirm": true}."""
    from mcp import types

    asked: list[str] = []

    async def on_elicit(context, params):
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    return asked, on_elicit

@pytest.mark.parametrize("mode", ["legacy"])
def test_elicitation_round_trip_through_the_gateway(gateway, upstream, mode):
    """A server→client request (elicitation) crosses the gateway inside the SSE stream
    and the client's answer comes back through it. (2026-07-28 has no such back-channel:
    elicitation there is an input_required result the client retries, a plain request.)"""
    server_id = gateway.add_server(upstream.url, ALICE["email"])
    asked, on_elicit = accepting_elicitation()

    async def main():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE)
            async with connect(rig, mode=mode, elicitation_callback=on_elicit) as client:
                result = await client.call_tool("ask", {})
        return result

    result = asyncio.run(main())
    assert asked == ["Proceed?"]
    assert result.content[0].text.startswith("answer: accept")


def test_sampling_round_trip_through_the_gateway(gateway, upstream):
    """sampling/createMessage from the upstream reaches the client through the gateway's
    relayed stream, and the client's answer, POSTed back, reaches the upstream."""
    from mcp import types

    server_id = gateway.add_server(upstream.url, ALICE["email"])
    prompts: list[str] = []

    async def on_sample(context, params):
        prompts.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="short"), model="test-model"
        )

    async def main():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE)
            async with connect(rig, mode="legacy", sampling_callback=on_sample) as client:
                return await client.call_tool("summarize", {"text": "a long text"})

    result = asyncio.run(main())
    assert prompts == ["a long text"]
    assert result.content[0].text == "summary: short"


def test_subscriptions_listen_stream_through_the_gateway(gateway, upstream):
    """2026-07-28: a subscriptions/listen POST stream stays open through the gateway and
    carries the upstream's change event to the client."""
    server_id = gateway.add_server(upstream.url, ALICE["email"])

    async def main():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE)
            async with connect(rig, mode="2026-07-28") as client:
                async with client.listen(tools_list_changed=True) as subscription:
                    assert (await client.call_tool("announce", {})).content[0].text == "announced"
                    with anyio.fail_after(10):
                        event = await subscription.__anext__()
        return event

    event = asyncio.run(main())
    assert type(event).__name__ == "ToolsListChanged"


def test_an_input_required_round_through_the_gateway_is_one_call_in_usage(gateway, upstream):
    """2026-07-28: the upstream answers a tools/call with input_required (its MCPServer's
    Resolve(Elicit)), the SDK client answers and retries with a new id; the gateway relays both
    untouched (the upstream's own requestState) and records one logical call, not two."""
    import sqlite3

    from tests.support.workers import wait_for

    server_id = gateway.add_server(upstream.url, ALICE["email"])
    asked, on_elicit = accepting_elicitation()

    async def main():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE)
            async with connect(rig, mode="2026-07-28", elicitation_callback=on_elicit) as client:
                result = await client.call_tool("confirm", {})
                await client.call_tool("echo", {"text": "after"})  # written after confirm's record
        return result

    result = asyncio.run(main())
    assert asked == ["Proceed?"] and result.content[0].text == "answer: True"

    def rows() -> list[tuple[str, str]]:
        with sqlite3.connect(f"file:{gateway.state_dir / 'gateway.db'}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT target, outcome FROM usage_events WHERE server_id = ? AND "
                                "method = 'tools/call' ORDER BY id", (server_id,)).fetchall()

    wait_for(lambda: ("echo", "ok") in rows(), 15, "the usage rows")  # usage is written in order
    assert rows() == [("confirm", "ok"), ("echo", "ok")]
