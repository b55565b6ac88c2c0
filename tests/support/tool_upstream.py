"""A real MCP upstream for tool policy tests: the `mcp` package's MCPServer with read-only
annotated tools beside write tools, and a control route that changes a tool's description
while it serves (the drift a pinned server must catch).

Run: python -m tests.support.tool_upstream --fd FD  (ToolUpstream below starts it)
Control: POST /control/describe {"tool": NAME, "description": TEXT}; POST /control/add
{"names": [NAME, ...]} adds read-only tools (a long catalog); GET /control/calls counts the
tools/call requests that reached it, by tool; POST /control/list {"mode": M} answers tools/list
as M says: "paginate" (two pages), "sse" (an SSE stream, a notification first), "malformed"
(a tool without a name), "huge" (9 MiB), "" (the server's own answer). A GET with Last-Event-ID replays a
tools/list answer (id "r1", every tool) as a resumed SSE stream would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import httpx
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from starlette.requests import Request
from starlette.responses import JSONResponse

server = MCPServer("tool-upstream")
CALLS: Counter[str] = Counter()  # tools/call requests received, by tool name
LIST_MODE = {"mode": ""}
READ_ONLY = ToolAnnotations(readOnlyHint=True)


def search(query: str) -> str:
    return f"found: {query}"


def read_doc(path: str) -> str:
    return f"contents of {path}"


def write_doc(path: str, text: str) -> str:
    return f"wrote {len(text)} characters to {path}"


def delete_all() -> str:
    return "deleted everything"


# name -> (function, title, description, annotations)
TOOLS = {
    "search": (search, "Search", "Search the documents.", READ_ONLY),
    "read_doc": (read_doc, "Read a document", "Read one document.", READ_ONLY),
    "write_doc": (write_doc, "Write a document", "Write one document.", ToolAnnotations(readOnlyHint=False)),
    "delete_all": (delete_all, "Delete everything", "Delete every document.", ToolAnnotations(destructiveHint=True)),
}


def register(name: str, description: str) -> None:
    fn, title, _, annotations = TOOLS[name]
    server.add_tool(fn, name=name, title=title, description=description, annotations=annotations)


for _name, (_fn, _title, _description, _annotations) in TOOLS.items():
    register(_name, _description)


@server.custom_route("/control/describe", methods=["POST"])
async def describe(request: Request) -> JSONResponse:
    """Change a tool's description (the rest of its definition stays)."""
    body = await request.json()
    server.remove_tool(body["tool"])
    register(body["tool"], body["description"])
    return JSONResponse({"changed": body["tool"]})


@server.custom_route("/control/add", methods=["POST"])
async def add(request: Request) -> JSONResponse:
    names = (await request.json())["names"]
    for name in names:
        server.add_tool(search, name=name, description=f"Search, as {name}.", annotations=READ_ONLY)
    return JSONResponse({"added": len(names)})


@server.custom_route("/control/calls", methods=["GET"])
async def calls(request: Request) -> JSONResponse:
    return JSONResponse(dict(CALLS))


@server.custom_route("/control/list", methods=["POST"])
async def list_mode(request: Request) -> JSONResponse:
    LIST_MODE["mode"] = (await request.json())["mode"]
    return JSONResponse(LIST_MODE)


class Recorder:
    """ASGI middleware: counts every tools/call POSTed to /mcp, and answers tools/list itself
    in a scripted LIST_MODE; everything else goes to the server as it came."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/mcp" and \
                any(name == b"last-event-id" for name, _ in scope["headers"]):
            return await self.scripted({"id": "r1"}, send, "sse")
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/mcp":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            event = await receive()
            body += event.get("body", b"")
            more = event.get("more_body", False)
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        for item in message if isinstance(message, list) else [message]:
            if isinstance(item, dict) and item.get("method") == "tools/call":
                CALLS[str((item.get("params") or {}).get("name"))] += 1
        if isinstance(message, dict) and message.get("method") == "tools/list" and LIST_MODE["mode"]:
            return await self.scripted(message, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def scripted(self, message: dict, send, mode: str = "") -> None:
        mode = mode or LIST_MODE["mode"]
        tools = [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in await server.list_tools()]
        cursor = (message.get("params") or {}).get("cursor")
        result: dict = {"tools": tools}
        if mode == "paginate":
            result = {"tools": tools[2:], "_meta": {"page": 2}} if cursor == "page2" else \
                {"tools": tools[:2], "nextCursor": "page2"}
        elif mode == "malformed":
            result = {"tools": [*tools, {"description": "a tool without a name"}]}
        elif mode == "huge":  # past the gateway's 8 MiB bound for one answer
            result = {"tools": [*tools, {"name": "huge", "description": "x" * (9 * 1024 * 1024)}]}
        answer = json.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": result}).encode()
        if mode == "sse":
            note = json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                               "params": {"level": "info", "data": "listing"}}).encode()
            body, content_type = b"event: message\ndata: " + note + b"\n\nid: e2\nevent: message\ndata: " + \
                answer + b"\n\n", b"text/event-stream"
        else:
            body, content_type = answer, b"application/json"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@server.custom_route("/ready", methods=["GET"])
async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"ready": True})


class ToolUpstream:
    """This module's server in a process, serving a socket this test process bound."""

    def __init__(self) -> None:
        from tests.support.ports import bind_unused_port

        sock, port = bind_unused_port()
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/mcp"
        with sock:  # the child holds the only copy once it runs
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.tool_upstream", "--fd", str(sock.fileno())],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
            )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tool upstream exited with {self.process.returncode}")
            try:
                httpx.get(f"{self.base}/ready", timeout=5, trust_env=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("tool upstream did not start") from None
                time.sleep(0.1)

    def describe(self, tool: str, description: str) -> None:
        response = httpx.post(f"{self.base}/control/describe", json={"tool": tool, "description": description},
                              timeout=10, trust_env=False)
        response.raise_for_status()

    def calls(self) -> dict[str, int]:
        """The tools/call requests this upstream got, by tool."""
        return httpx.get(f"{self.base}/control/calls", timeout=10, trust_env=False).json()

    def list_mode(self, mode: str) -> None:
        httpx.post(f"{self.base}/control/list", json={"mode": mode}, timeout=10, trust_env=False).raise_for_status()

    def add(self, names: list[str]) -> None:
        httpx.post(f"{self.base}/control/add", json={"names": names}, timeout=10, trust_env=False).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def main(argv: list[str]) -> None:
    import anyio
    import uvicorn

    app = server.streamable_http_app(host="127.0.0.1", stateless_http=True, json_response=True)
    config = uvicorn.Config(Recorder(app), log_level="warning", fd=int(argv[argv.index("--fd") + 1]))
    anyio.run(uvicorn.Server(config).serve)


if __name__ == "__main__":
    main(sys.argv[1:])
