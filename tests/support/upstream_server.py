"""A real upstream: the `mcp` package's own MCPServer over Streamable HTTP, with tools that
stream progress, ask the client for elicitation (mid-call, or MRTR for 2026-07-28), fail, and count what
the gateway sends.

Run: python -m tests.support.upstream_server (--fd FD | PORT) [--stateless] [--json]
(--fd: serve the listening socket the parent bound and passed with Popen(pass_fds=...))."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve
from pydantic import BaseModel

server = MCPServer("upstream-under-test")
seen_headers: list[dict] = []


class Confirm(BaseModel):
    confirm: bool


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return f"echo: {text}"


@server.tool()
async def count(steps: int, ctx: Context) -> str:
    """Report progress `steps` times, then answer."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
        await asyncio.sleep(0.01)
    return f"counted {steps}"


@server.tool()
async def ask(ctx: Context) -> str:
    """Ask the client to confirm (elicitation round trip)."""
    result = await ctx.elicit("Proceed?", Confirm)
    return f"answer: {result.action} {getattr(result, 'data', None)}"


def _confirmation() -> Elicit[Confirm]:
    return Elicit("Proceed?", Confirm)


@server.tool()
def confirm(answer: Annotated[Confirm, Resolve(_confirmation)]) -> str:
    """Ask the client to confirm the way both eras can: mid-call for 2025 clients, an
    input_required result (MRTR) and a retry for 2026-07-28 ones."""
    return f"answer: {answer.confirm}"


@server.tool()
async def summarize(text: str, ctx: Context) -> str:
    """Ask the client's model to summarize (sampling round trip)."""
    from mcp import types

    result = await ctx.request_context.session.create_message(
        [types.SamplingMessage(role="user", content=types.TextContent(type="text", text=text))],
        max_tokens=50,
        related_request_id=ctx.request_id,
    )
    return f"summary: {result.content.text}"


@server.tool()
async def announce(ctx: Context) -> str:
    """Publish a tools list-changed event to subscriptions/listen streams (2026 era)."""
    await ctx.notify_tools_changed()
    return "announced"


@server.tool()
def fail() -> str:
    """Always raises: a tool error."""
    raise ValueError("this tool always fails")


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep, then answer (for disconnect tests)."""
    await asyncio.sleep(seconds)
    return "slept"


@server.resource("memo://greeting")
def greeting() -> str:
    return "hello from the upstream"


@server.prompt()
def review(code: str) -> str:
    return f"Please review: {code}"


def main(argv: list[str]) -> None:
    import anyio
    import uvicorn

    app = server.streamable_http_app(
        host="127.0.0.1", stateless_http="--stateless" in argv, json_response="--json" in argv
    )
    # What MCPServer.run(transport="streamable-http") does, plus uvicorn's own `fd` option.
    if "--fd" in argv:
        where = {"fd": int(argv[argv.index("--fd") + 1])}
    else:
        where = {"host": "127.0.0.1", "port": int(argv[0])}
    config = uvicorn.Config(app, log_level=server.settings.log_level.lower(), **where)
    anyio.run(uvicorn.Server(config).serve)


if __name__ == "__main__":
    main(sys.argv[1:])
