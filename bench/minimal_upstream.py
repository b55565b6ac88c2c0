"""The minimal, fast upstream both proxy benchmarks measure against: raw asyncio HTTP/1.1
(so the client or the gateway is what is measured), keep-alive, run as its own process.

  POST (any path)   a fixed JSON-RPC tools/call result
  GET (any path)    an SSE stream: one event, then silent until the client leaves
  GET /__push       writes one more event into the newest open stream (event crossing)
  GET /__stats      {"accepted": connections ever, "open": connections now, "streams": open streams}

Run: python bench/minimal_upstream.py PORT_FILE  (writes the port it listens on there)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ANSWER = json.dumps(
    {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "x" * 200}], "isError": False}}
).encode()
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER
)
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def serve(port_file: str) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {os.cpu_count() - 1})  # the last core; the measured side gets core 0
    stats = {"accepted": 0, "open": 0}
    streams: list[asyncio.Transport] = []

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport, self.buffer = transport, bytearray()
            stats["accepted"] += 1
            stats["open"] += 1

        def connection_lost(self, exc) -> None:
            stats["open"] -= 1
            if self.transport in streams:
                streams.remove(self.transport)

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = bytes(self.buffer[:end]).lower()
                match = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                length = int(match.group(1)) if match else 0
                if len(self.buffer) < end + 4 + length:
                    return
                del self.buffer[: end + 4 + length]
                method, path = head.split(b" ", 2)[:2]
                if path == b"/__stats":
                    body = json.dumps({**stats, "open": stats["open"] - 1, "streams": len(streams)}).encode()
                    self.transport.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                    )
                    self.transport.close()
                    return
                if path == b"/__push":
                    if streams:
                        streams[-1].write(chunk(EVENT))
                    self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                elif method == b"get":
                    self.transport.write(SSE_HEAD + chunk(EVENT))
                    streams.append(self.transport)
                else:
                    self.transport.write(JSON_RESPONSE)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", 0, backlog=4096)
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        await asyncio.sleep(3600)  # the parent terminates it; bounded anyway

    asyncio.run(main())


def start(port_file: Path) -> tuple[subprocess.Popen, int]:
    """Start the upstream process; (process, port) once it listens."""
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, str(port_file)])
    deadline = time.monotonic() + 10
    while not (port_file.exists() and port_file.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the minimal upstream did not start")
        time.sleep(0.05)
    return process, int(port_file.read_text())


if __name__ == "__main__":
    serve(sys.argv[1])
