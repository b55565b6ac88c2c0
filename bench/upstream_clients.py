"""Benchmark: which HTTP client should the proxy use for its upstream hop?

Starts a minimal, fast HTTP/1.1 upstream (raw asyncio, keep-alive, JSON answer to any
POST, one SSE endpoint, counters of accepted/open connections) in a subprocess pinned to
the last core, then measures each available client, pinned to the first core, in this
process:

  * sequential latency p50/p99 of 2,000 JSON-RPC POSTs (after a warm-up),
  * throughput with 32 concurrent requests for ~5 s,
  * upstream connections opened per 1,000 sequential requests (keep-alive reuse),
  * upstream SSE streams still open 0.5 s after the client dropped 50 of them (cancellation).

Clients: a minimal hand-written asyncio-streams keep-alive client that does not even
parse headers (the floor every ratio is taken against); services.proxy.upstream.pool.UpstreamClient
(the real one: asyncio streams, pooled, SSRF-checked); minimal pooled clients on Tornado's
IOStream and on Tornado's HTTP1Connection (the designs it was measured against);
aiohttp's pooled ClientSession; Tornado's curl_httpclient; Tornado's simple_httpclient.
Missing packages are skipped (aiohttp and pycurl are not project dependencies)::

    python bench/upstream_clients.py [--rounds 3] [--seconds 5] [--requests 2000]

Rounds are interleaved (every client once per round) and the median per figure is shown,
since absolute numbers move ±20 % between runs on shared machines; compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import minimal_upstream  # noqa: E402

BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": "quarterly revenue by region", "limit": 10}},
    }
).encode()
HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "Mcp-Session-Id": "5f0c1c4e9a7b4d7e8f6a2b3c4d5e6f70",
    "MCP-Protocol-Version": "2025-11-25",
}
STREAMS = 50

# --------------------------------------------------------------------------- upstream


async def upstream_stats(port: int) -> dict[str, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /__stats HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])  # "open" excludes this very connection


# --------------------------------------------------------------------------- clients
# Each client: post() -> response body; stream_and_drop() opens /sse, reads the first
# event and drops the stream the way that client can; close().


class RawFloor:
    """Minimal keep-alive client on asyncio streams: the cost floor, not a real client."""

    name = "raw asyncio floor"

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        head = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in HEADERS.items()
        )
        self.request = (head + f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY

    async def post(self) -> bytes:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        at = head.lower().find(b"content-length:")
        length = int(head[at + 15 : head.find(b"\r\n", at)])
        body = await reader.readexactly(length)
        self.idle.append((reader, writer))
        return body

    async def stream_and_drop(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        await reader.readuntil(b"\n\n")
        writer.close()

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


class GatewayClient:
    """services.proxy.upstream.pool.UpstreamClient: the real thing (SSRF guard, timeouts, chunked, SSE)."""

    name = "services.proxy.upstream.pool.UpstreamClient (asyncio streams, pooled, SSRF-checked)"

    def __init__(self, port: int) -> None:
        from services.proxy.upstream.policy import AddressPolicy
        from services.proxy.upstream.pool import UpstreamClient

        self.url = f"http://127.0.0.1:{port}/mcp"
        self.sse = f"http://127.0.0.1:{port}/sse"
        self.client = UpstreamClient(AddressPolicy.from_setting("127.0.0.0/8"), max_per_origin=64)

    async def post(self) -> bytes:
        response = await self.client.request("POST", self.url, HEADERS, BODY)
        return await response.read_all(1 << 20)

    async def stream_and_drop(self) -> None:
        response = await self.client.request("GET", self.sse, {"Accept": "text/event-stream"})
        await response.read_chunk()
        response.close()

    async def close(self) -> None:
        self.client.close()


class IOStreamClient:
    """The same pooling framed by hand on Tornado's IOStream (an earlier design of
    services.proxy.upstream). Minimal: no SSRF check, no timeouts, Content-Length bodies only."""

    name = "pooled on Tornado IOStream (minimal)"

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list = []

    async def _stream(self):  # type: ignore[no-untyped-def]
        from tornado.iostream import IOStream

        if self.idle:
            return self.idle.pop()
        stream = IOStream(socket.socket())
        await stream.connect(("127.0.0.1", self.port))
        return stream

    async def _head(self, stream, payload: bytes):  # type: ignore[no-untyped-def]
        from tornado.httputil import HTTPHeaders, parse_response_start_line

        stream.write(payload)
        head = (await stream.read_until(b"\r\n\r\n")).decode("latin-1")
        start_line, _, rest = head.partition("\r\n")
        parse_response_start_line(start_line)
        return HTTPHeaders.parse(rest)

    async def post(self) -> bytes:
        stream = await self._stream()
        lines = ["POST /mcp HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in HEADERS.items()] + [f"Content-Length: {len(BODY)}", "\r\n"]
        headers = await self._head(stream, "\r\n".join(lines).encode("latin-1") + BODY)
        body = await stream.read_bytes(int(headers["Content-Length"]))
        self.idle.append(stream)
        return body

    async def stream_and_drop(self) -> None:
        stream = await self._stream()
        await self._head(stream, b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        await stream.read_bytes(1, partial=True)
        stream.close()

    async def close(self) -> None:
        for stream in self.idle:
            stream.close()


class Http1ConnectionClient:
    """Candidate (i) as first sketched: Tornado's client-side HTTP1Connection per request on
    a pooled IOStream, kept via detach() when the response allows keep-alive. Minimal: no
    SSRF check, no timeouts, no streaming hand-off task, so a floor for that design."""

    name = "pooled on Tornado HTTP1Connection (minimal)"

    def __init__(self, port: int) -> None:
        from tornado.http1connection import HTTP1ConnectionParameters

        self.port = port
        self.idle: list = []
        self.params = HTTP1ConnectionParameters(max_body_size=2**62)

    async def _stream(self):  # type: ignore[no-untyped-def]
        from tornado.iostream import IOStream

        if self.idle:
            return self.idle.pop()
        stream = IOStream(socket.socket())
        await stream.connect(("127.0.0.1", self.port))
        return stream

    async def _exchange(self, method: str, path: str, headers: dict, body: bytes | None, delegate):  # type: ignore[no-untyped-def]
        from tornado.http1connection import HTTP1Connection
        from tornado.httputil import HTTPHeaders, RequestStartLine

        stream = await self._stream()
        connection = HTTP1Connection(stream, True, self.params)
        request_headers = HTTPHeaders(headers)
        request_headers["Host"] = f"127.0.0.1:{self.port}"
        if body is not None:
            request_headers["Content-Length"] = str(len(body))
        connection.write_headers(RequestStartLine(method, path, "HTTP/1.1"), request_headers, body)
        connection.finish()
        return connection, connection.read_response(delegate)

    async def post(self) -> bytes:
        from tornado.httputil import HTTPMessageDelegate

        class Collect(HTTPMessageDelegate):
            def __init__(self) -> None:
                self.chunks: list[bytes] = []

            def data_received(self, chunk: bytes) -> None:
                self.chunks.append(chunk)

        collect = Collect()
        connection, reading = await self._exchange("POST", "/mcp", HEADERS, BODY, collect)
        if await reading and not connection.stream.closed():
            self.idle.append(connection.detach())
        return b"".join(collect.chunks)

    async def stream_and_drop(self) -> None:
        from tornado.httputil import HTTPMessageDelegate

        first = asyncio.get_running_loop().create_future()

        class First(HTTPMessageDelegate):
            def data_received(self, chunk: bytes) -> None:
                if not first.done():
                    first.set_result(None)

        connection, reading = await self._exchange(
            "GET", "/sse", {"Accept": "text/event-stream"}, None, First()
        )
        task = asyncio.ensure_future(reading)
        await first
        connection.close()
        await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for stream in self.idle:
            stream.close()


class AiohttpClient:
    """aiohttp ClientSession with a pooled TCPConnector (SSRF check would go in a resolver)."""

    name = "aiohttp ClientSession (pooled)"

    def __init__(self, port: int) -> None:
        import aiohttp

        self.url = f"http://127.0.0.1:{port}/mcp"
        self.sse = f"http://127.0.0.1:{port}/sse"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=64),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def post(self) -> bytes:
        async with self.session.post(self.url, data=BODY, headers=HEADERS, allow_redirects=False) as response:
            return await response.read()

    async def stream_and_drop(self) -> None:
        response = await self.session.get(self.sse, headers={"Accept": "text/event-stream"})
        await response.content.readany()
        response.close()

    async def close(self) -> None:
        await self.session.close()


class TornadoClient:
    """Tornado's AsyncHTTPClient (simple_httpclient or curl_httpclient)."""

    def __init__(self, port: int, implementation: str) -> None:
        from tornado.httpclient import AsyncHTTPClient

        self.url = f"http://127.0.0.1:{port}/mcp"
        self.sse = f"http://127.0.0.1:{port}/sse"
        if implementation == "curl":
            from tornado.curl_httpclient import CurlAsyncHTTPClient

            self.client = CurlAsyncHTTPClient(force_instance=True, max_clients=64)
            self.name = "Tornado curl_httpclient (pycurl)"
        else:
            self.client = AsyncHTTPClient(force_instance=True, max_clients=64)
            self.name = "Tornado simple_httpclient"
        self.tasks: list[asyncio.Future[object]] = []

    async def post(self) -> bytes:
        response = await self.client.fetch(
            self.url, method="POST", headers=HEADERS, body=BODY, follow_redirects=False
        )
        return response.body

    async def stream_and_drop(self) -> None:
        first = asyncio.get_running_loop().create_future()

        def on_chunk(chunk: bytes) -> None:
            if not first.done():
                first.set_result(None)

        fetch = self.client.fetch(
            self.sse,
            headers={"Accept": "text/event-stream"},
            streaming_callback=on_chunk,
            request_timeout=3600,
            raise_error=False,
        )
        # No way to abort it: all we can do is stop listening (and not warn at exit).
        fetch.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.tasks.append(fetch)
        await first

    async def close(self) -> None:
        self.client.close()


def available_clients() -> list[tuple[str, Callable[[int], object]]]:
    factories: list[tuple[str, Callable[[int], object]]] = [
        ("raw", RawFloor),
        ("gateway", GatewayClient),
        ("iostream", IOStreamClient),
        ("http1connection", Http1ConnectionClient),
    ]
    try:
        import aiohttp  # noqa: F401

        factories.append(("aiohttp", AiohttpClient))
    except ImportError:
        print("aiohttp not installed: skipped (pip install aiohttp==3.14.5 to measure it)")
    try:
        import pycurl  # noqa: F401

        factories.append(("curl", lambda port: TornadoClient(port, "curl")))
    except ImportError:
        print("pycurl not installed: curl_httpclient skipped (pip install pycurl==7.49.0)")
    factories.append(("simple", lambda port: TornadoClient(port, "simple")))
    return factories


# --------------------------------------------------------------------------- measurements


async def sequential(post: Callable[[], Awaitable[bytes]], count: int) -> list[float]:
    for _ in range(200):
        await post()
    timings = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        await post()
        timings.append(clock() - start)
    return timings


async def throughput(post: Callable[[], Awaitable[bytes]], seconds: float, concurrency: int = 32) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await post()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def measure(key: str, factory: Callable[[int], object], port: int, args: argparse.Namespace) -> dict:
    client = factory(port)
    timings = await sequential(client.post, args.requests)  # type: ignore[attr-defined]
    before = await upstream_stats(port)
    for _ in range(1000):
        await client.post()  # type: ignore[attr-defined]
    after = await upstream_stats(port)
    rate = await throughput(client.post, args.seconds)  # type: ignore[attr-defined]
    await client.close()  # type: ignore[attr-defined]
    # Streams: a fresh client, so no pooled connection muddles the open-connection count.
    await asyncio.sleep(0.3)
    streamer = factory(port)
    baseline = (await upstream_stats(port))["open"]
    await asyncio.gather(*(streamer.stream_and_drop() for _ in range(STREAMS)))  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)
    left_open = (await upstream_stats(port))["open"] - baseline
    if key not in ("simple", "curl"):
        await streamer.close()  # type: ignore[attr-defined]
    timings.sort()
    return {
        "name": client.name,  # type: ignore[attr-defined]
        "p50": timings[len(timings) // 2] * 1e6,
        "p99": timings[int(len(timings) * 0.99)] * 1e6,
        "rps": rate,
        # minus the stats request's own connection
        "conns": after["accepted"] - before["accepted"] - 1,
        "left_open": left_open,
    }


async def run(args: argparse.Namespace, port: int) -> None:
    factories = available_clients()
    results: dict[str, list[dict]] = {key: [] for key, _ in factories}
    for round_no in range(args.rounds):
        for key, factory in factories:
            result = await measure(key, factory, port, args)
            results[key].append(result)
            print(
                f"  round {round_no + 1} {result['name']}: p50 {result['p50']:.0f} µs, "
                f"{result['rps']:.0f} req/s, {result['conns']} conns/1000",
                flush=True,
            )
    report(results, args)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def median(key: str, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    floor_p50, floor_p99, floor_rps = median("raw", "p50"), median("raw", "p99"), median("raw", "rps")
    real = [k for k in results if k != "raw"]
    best_rps = max(median(k, "rps") for k in real)
    print()
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, client pinned to CPU 0, upstream to the last; "
        f"medians of {args.rounds} rounds; {args.requests} sequential POSTs, 32 concurrent for {args.seconds:g} s"
    )
    print()
    print(
        "| client | p50 µs | p99 µs | +p50 / +p99 vs floor | req/s @32 | req/s vs floor | req/s vs best client "
        f"| upstream conns per 1,000 sequential | streams left open of {STREAMS} dropped |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in results:
        p50, p99, rps = median(key, "p50"), median(key, "p99"), median(key, "rps")
        print(
            f"| {results[key][0]['name']} | {p50:.0f} | {p99:.0f} | "
            f"{p50 - floor_p50:+.0f} / {p99 - floor_p99:+.0f} µs ({p50 / floor_p50:.2f}×) | {rps:.0f} | "
            f"{rps / floor_rps:.2f} | {rps / best_rps:.2f} | {median(key, 'conns'):.0f} | "
            f"{median(key, 'left_open'):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    server, port = minimal_upstream.start(Path(f"/tmp/upstream-bench-{os.getpid()}.port"))
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {0})
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        asyncio.run(run(args, port))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
