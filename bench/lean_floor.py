"""Prototypes for bench/proxy.py --lean: the floor's pass-through on leaner server layers,
relaying over the same UpstreamClient. `asyncio`: no Tornado (an asyncio Protocol parsing
requests with llhttp via httptools); `delegate`: Tornado's HTTPServer and HTTP1Connection
with a bare HTTPMessageDelegate (no Application, routing or RequestHandler).

They answer "what would a leaner server layer for /mcp/ give": against bench/floor.py, the
cost per request of Tornado's RequestHandler machinery (delegate) and of all of Tornado's
HTTP layer (asyncio). JSON answers only (read whole, sent with Content-Length); keep-alive;
no pipelining, no chunked request bodies, no auth: measurements, not servers to deploy.

Run: python bench/lean_floor.py PORT_FILE UPSTREAM_URL [asyncio|delegate]
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httptools
import tornado.netutil
from tornado import httputil
from tornado.httpserver import HTTPServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.proxy.upstream.errors import UpstreamError  # noqa: E402
from services.proxy.upstream.policy import AddressPolicy  # noqa: E402
from services.proxy.upstream.pool import UpstreamClient  # noqa: E402

FORWARDED = {b"accept": "Accept", b"content-type": "Content-Type", b"mcp-protocol-version": "MCP-Protocol-Version"}
MAX_BODY = 4 * 1024 * 1024


class Relay(asyncio.Protocol):
    def __init__(self, client: UpstreamClient, url: str) -> None:
        self.client, self.url = client, url
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        forwarded = FORWARDED.get(name.lower())
        if forwarded:
            self.headers.append((forwarded, value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        body = b"".join(self.body) if method == "POST" else None
        asyncio.ensure_future(self.relay(method, self.headers, body))

    async def relay(self, method: str, headers, body) -> None:
        try:
            response = await self.client.request(method, self.url, headers, body)
        except UpstreamError:
            self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            data = await response.read_all(MAX_BODY)
            content_type = response.headers.get("Content-Type", "application/json")
            self.transport.write(
                f"HTTP/1.1 {response.status} {response.reason or 'OK'}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode("latin-1") + data
            )
        except UpstreamError:
            self.transport.close()
        finally:
            response.close()


class DelegateRelay(httputil.HTTPMessageDelegate):
    """One request on Tornado's HTTP1Connection, answered without a RequestHandler."""

    def __init__(self, client: UpstreamClient, url: str, connection) -> None:
        self.client, self.url, self.connection = client, url, connection
        self.method = "GET"
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []

    def headers_received(self, start_line, headers) -> None:
        self.method = start_line.method
        self.headers = [(name, value) for name in FORWARDED.values() if (value := headers.get(name))]

    def data_received(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def finish(self) -> None:
        asyncio.ensure_future(self.relay())

    async def relay(self) -> None:
        body = b"".join(self.body) if self.method == "POST" else None
        try:
            response = await self.client.request(self.method, self.url, self.headers, body)
        except UpstreamError:
            self.answer(502, "Bad Gateway", "text/plain", b"")
            return
        try:
            data = await response.read_all(MAX_BODY)
            self.answer(response.status, response.reason or "OK",
                        response.headers.get("Content-Type", "application/json"), data)
        except UpstreamError:
            self.connection.detach().close()
        finally:
            response.close()

    def answer(self, status: int, reason: str, content_type: str, data: bytes) -> None:
        headers = httputil.HTTPHeaders({"Content-Type": content_type, "Content-Length": str(len(data))})
        self.connection.write_headers(httputil.ResponseStartLine("HTTP/1.1", status, reason), headers, data)
        self.connection.finish()


class DelegateRouter(httputil.HTTPServerConnectionDelegate):
    def __init__(self, client: UpstreamClient, url: str) -> None:
        self.client, self.url = client, url

    def start_request(self, server_conn, request_conn) -> DelegateRelay:
        return DelegateRelay(self.client, self.url, request_conn)


async def serve(port_file: str, upstream_url: str, kind: str) -> None:
    client = UpstreamClient(AddressPolicy(["127.0.0.0/8"]))
    if kind == "delegate":  # the floor's server options
        server = HTTPServer(DelegateRouter(client, upstream_url), max_body_size=MAX_BODY, idle_connection_timeout=75)
        sockets = tornado.netutil.bind_sockets(0, address="127.0.0.1")
        server.add_sockets(sockets)
    else:
        loop = asyncio.get_running_loop()
        sockets = (await loop.create_server(lambda: Relay(client, upstream_url), "127.0.0.1", 0)).sockets
    Path(port_file).write_text(str(sockets[0].getsockname()[1]))
    await asyncio.sleep(3600)  # the benchmark terminates it; bounded anyway


def start(port_file: Path, upstream_url: str, kind: str = "asyncio") -> tuple[subprocess.Popen, int]:
    """Start a lean pass-through (`asyncio` or `delegate`); (process, port) once it listens."""
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, str(port_file), upstream_url, kind])
    deadline = time.monotonic() + 10
    while not (port_file.exists() and port_file.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the lean pass-through did not start")
        time.sleep(0.05)
    return process, int(port_file.read_text())


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "asyncio"))
