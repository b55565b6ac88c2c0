"""The floor of the proxy benchmark: a plain Tornado pass-through (one RequestHandler relaying
to the upstream over the gateway's pooled keep-alive UpstreamClient, no auth, no policy).

Whatever a Tornado gateway does per request costs at least this much: Tornado's HTTP/1.1
server and handler machinery, one upstream exchange, the relay. The gateway's figures in
bench/proxy.py are given as ratios to it. Same loop (uvloop) and server options as the
gateway; SSE answers are relayed chunk by chunk and flushed, like the gateway's streams.

Run: python bench/floor.py PORT_FILE UPSTREAM_URL  (writes the port it listens on there)
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.proxy.upstream.errors import UpstreamError  # noqa: E402
from services.proxy.upstream.policy import AddressPolicy  # noqa: E402
from services.proxy.upstream.pool import UpstreamClient  # noqa: E402

FORWARDED = ("Accept", "Content-Type", "MCP-Protocol-Version")


class PassThrough(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST")

    def initialize(self, client: UpstreamClient, url: str) -> None:
        self.client, self.url = client, url
        self.response = None

    def on_connection_close(self) -> None:
        if self.response is not None:
            self.response.close()

    async def post(self) -> None:
        await self.relay(self.request.body)

    async def get(self) -> None:
        await self.relay(None)

    async def relay(self, body: bytes | None) -> None:
        incoming = self.request.headers
        headers = [(name, value) for name in FORWARDED if (value := incoming.get(name))]
        try:
            response = await self.client.request(self.request.method, self.url, headers, body)
        except UpstreamError:
            self.send_error(502)
            return
        self.response = response
        try:
            self.set_status(response.status)
            content_type = response.headers.get("Content-Type", "")
            self.set_header("Content-Type", content_type)
            streaming = content_type.startswith("text/event-stream")
            while chunk := await response.read_chunk():
                self.write(chunk)
                if streaming:
                    await self.flush()
            self.finish()
        except (StreamClosedError, UpstreamError):
            pass
        finally:
            response.close()
            self.response = None

    def log_exception(self, *args) -> None:  # a client gone mid-stream is not news here
        pass


async def serve(port_file: str, upstream_url: str) -> None:
    client = UpstreamClient(AddressPolicy(["127.0.0.0/8"]))
    app = tornado.web.Application([(r"/.*", PassThrough, {"client": client, "url": upstream_url})],
                                  log_function=lambda handler: None)
    server = HTTPServer(app, max_body_size=4 * 1024 * 1024, idle_connection_timeout=75)
    sockets = tornado.netutil.bind_sockets(0, address="127.0.0.1")
    server.add_sockets(sockets)
    Path(port_file).write_text(str(sockets[0].getsockname()[1]))
    await asyncio.sleep(3600)  # the benchmark terminates it; bounded anyway


def start(port_file: Path, upstream_url: str) -> tuple[subprocess.Popen, int]:
    """Start the floor process; (process, port) once it listens."""
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, str(port_file), upstream_url])
    deadline = time.monotonic() + 10
    while not (port_file.exists() and port_file.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the floor pass-through did not start")
        time.sleep(0.05)
    return process, int(port_file.read_text())


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(sys.argv[1], sys.argv[2]))
