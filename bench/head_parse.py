"""Benchmark: parsing an upstream response head, before and after llhttp (issue 7, finding 13).

1. CPU per head, in this process, for three real-world heads (a uvicorn JSON answer, a
   Tornado SSE answer, a 20-field head): the hand-written parser the upstream client had
   until issue 7 (status line and fields through ``tornado.httputil``, kept below
   verbatim as the baseline) against ``services.proxy.upstream``'s llhttp parse as the client
   runs it (``_Parse``: llhttp via httptools plus the client's own rules and the
   `ResponseHeaders` it hands out). Best of 5 repeats of N parses each.
2. Time to an error on a malformed head: `UpstreamClient` against a raw loopback
   upstream that answers every request with the given bytes (bare-LF line endings,
   status 600, a NUL in a field), against the same exchange with a well-formed head in
   the same run. Before the change a bare-LF head waited for the header timeout (60 s).
   (An error closes its connection, so each malformed exchange also pays a new TCP
   connection; the well-formed ones reuse one.)

Run: .venv/bin/python bench/head_parse.py [--heads 50000] [--exchanges 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import timeit
from pathlib import Path

from tornado import httputil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.proxy.upstream.errors import UpstreamProtocolError  # noqa: E402
from services.proxy.upstream.http11 import _Parse  # noqa: E402
from services.proxy.upstream.policy import AddressPolicy  # noqa: E402
from services.proxy.upstream.pool import UpstreamClient  # noqa: E402

HEADS = {
    "uvicorn JSON (5 fields)": (
        b"HTTP/1.1 200 OK\r\ndate: Mon, 30 Nov 2026 03:34:51 GMT\r\nserver: uvicorn\r\n"
        b"content-type: application/json\r\nmcp-session-id: 8f0c2a7e1b9d4c3a9e7f6d5c4b3a2910\r\n"
        b"content-length: 123\r\n\r\n"
    ),
    "Tornado SSE (chunked, 5 fields)": (
        b"HTTP/1.1 200 OK\r\nServer: TornadoServer/6.6.1\r\nContent-Type: text/event-stream\r\n"
        b"Date: Mon, 30 Nov 2026 03:34:51 GMT\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    ),
    "20 fields": (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-Field-%d: value number %d of this head\r\n" % (n, n) for n in range(19))
        + b"Content-Length: 0\r\n\r\n"
    ),
}


def old_parse_head(head: bytes) -> httputil.HTTPHeaders:
    """The hand-written head parser of the upstream client before issue 7 (the baseline)."""
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    start_line = httputil.parse_response_start_line(lines[0])
    headers = httputil.HTTPHeaders()
    add = headers.add
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise httputil.HTTPInputError("obsolete header line folding")
        name, colon, value = line.partition(":")
        if not colon:
            raise httputil.HTTPInputError("header line without a colon")
        add(name, value.strip(" \t"))
    connection = headers.get("Connection", "").lower()
    keep_alive = "close" not in connection if start_line.version == "HTTP/1.1" else "keep-alive" in connection
    if "Content-Length" in headers:
        values = {v.strip() for v in headers["Content-Length"].split(",")}
        value = values.pop() if len(values) == 1 else ""
        if not value.isdigit():
            raise httputil.HTTPInputError("bad Content-Length")
    _ = keep_alive, headers.get("Transfer-Encoding")
    return headers


def new_parse_head(head: bytes) -> object:
    parse = _Parse("POST", 65536)
    parse.feed(head)
    assert parse.head_done
    parse.parser = None  # as UpstreamResponse does when the response ends
    return parse.headers


def per_head(count: int) -> None:
    print(f"1. CPU per response head, best of 5 x {count:,}")
    print(f"  {'head':34} {'hand-written (baseline)':>24} {'llhttp':>10} {'ratio':>8}")
    for name, head in HEADS.items():
        old_parse_head(head)
        new_parse_head(head)
        old = min(timeit.repeat(lambda h=head: old_parse_head(h), number=count, repeat=5)) / count
        new = min(timeit.repeat(lambda h=head: new_parse_head(h), number=count, repeat=5)) / count
        print(f"  {name:34} {old * 1e6:21.2f} µs {new * 1e6:7.2f} µs {new / old:7.2f}x")


MALFORMED = {
    "well-formed (baseline)": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "bare LF line endings": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "status 600": b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
    "NUL in a field value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
}


async def time_to_error(count: int) -> None:
    print(f"\n2. request to outcome through UpstreamClient, {count} exchanges each (p50)")
    policy = AddressPolicy.from_setting("127.0.0.0/8")
    results: dict[str, float] = {}
    for name, answer in MALFORMED.items():

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer=answer) -> None:
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(answer)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp"
        client = UpstreamClient(policy, header_timeout=60)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            try:
                response = await client.request("GET", url)
                await response.read_all(100)
                outcome = "answered"
            except UpstreamProtocolError:
                outcome = "UpstreamProtocolError (502)"
            samples.append(time.perf_counter() - started)
        client.close()
        server.close()
        results[name] = statistics.median(samples)
        base = results["well-formed (baseline)"]
        print(f"  {name:26} {results[name] * 1e3:8.3f} ms {results[name] / base:6.2f}x  {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=50000)
    parser.add_argument("--exchanges", type=int, default=300)
    args = parser.parse_args()
    per_head(args.heads)
    asyncio.run(time_to_error(args.exchanges))


if __name__ == "__main__":
    main()
