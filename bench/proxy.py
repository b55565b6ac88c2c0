"""Proxy benchmark (issue 3): one gateway process against a minimal fast upstream, and the
same upstream directly, in the same run. Not part of the test run.

  1. added latency of a JSON tools/call, sequential (target: p50 <= 1 ms, p99 <= 3 ms added)
  2. throughput, 32 concurrent clients, gateway pinned to one core (target >= 2,000 req/s)
  3. N idle SSE streams held open through the gateway: gateway memory per stream
     (client side + upstream side, target <= 32 KiB) and the time an event takes to
     cross while they are open (target: p50 <= 1 ms added)
  4. upstream TCP connections opened per 1,000 sequential requests (keep-alive)

Run: .venv/bin/python bench/proxy.py [--streams 5000] [--seconds 5] [--requests 2000]
The gateway is pinned to core 0; the upstream and this load generator share core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_upstream  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402

TOOLS_CALL = json.dumps(
    {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
     "params": {"name": "search", "arguments": {"query": "quarterly revenue by region", "limit": 10}}}
).encode()
REDIRECT = "http://127.0.0.1:9/cb"


# ------------------------------------------------------------------ a minimal client


class Connection:
    """Keep-alive HTTP/1.1 on asyncio streams: cheap, so the servers are what is measured."""

    def __init__(self, port: int, path: str, token: str | None):
        self.port, self.path = port, path
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n"
                     f"{auth}Content-Length: {len(TOOLS_CALL)}\r\n\r\n").encode() + TOOLS_CALL
        self.reader = self.writer = None

    async def post(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(self.head)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def sequential(port: int, path: str, token: str | None, count: int) -> list[float]:
    connection = Connection(port, path, token)
    for _ in range(200):
        await connection.post()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await connection.post()
        samples.append((time.perf_counter() - start) * 1000)
    connection.close()
    return samples


async def throughput(port: int, path: str, token: str | None, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        connection = Connection(port, path, token)
        while time.perf_counter() < deadline:
            await connection.post()
            done += 1
        connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(32)))
    return done / (time.perf_counter() - start)


async def stats(port: int) -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/__stats")).json()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_stream(port: int, path: str, token: str | None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{auth}\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    await reader.readuntil(b"\n\n")  # the upstream's first event: the stream is up end to end
    return reader, writer


async def crossing_times(upstream_port: int, probe, samples: int) -> list[float]:
    """Push one event into the newest stream (the probe, opened after the idle ones) and
    time its arrival at the client."""
    reader, _ = probe
    times = []
    async with httpx.AsyncClient() as client:
        for _ in range(samples):
            start = time.perf_counter()
            await client.get(f"http://127.0.0.1:{upstream_port}/__push")
            await reader.readuntil(b"\n\n")
            times.append((time.perf_counter() - start) * 1000)
    return times


# -------------------------------------------------------------------- the gateway side


def bearer_token(gateway: GatewayProcess, server_id: str) -> str:
    http = httpx.Client(base_url=gateway.url)
    client_id = http.post("/register", json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
                                             "client_name": "bench"}).json()["client_id"]
    http.get("/login")
    http.post("/login", data={"email": "bench@example.com", "next": "/", "_xsrf": http.cookies["_xsrf"]})
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    resource = f"{gateway.url}/mcp/{server_id}"
    page = http.get("/authorize", params={
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "resource": resource,
        "code_challenge": challenge, "code_challenge_method": "S256", "state": "s"})
    page = http.get(page.headers["location"])
    req = re.search(r'name="req" value="([^"]+)"', page.text).group(1)
    page = http.post("/authorize/consent", data={"req": req, "decision": "approve", "_xsrf": http.cookies["_xsrf"]})
    code = re.search(r"code=([^&]+)", page.headers["location"]).group(1)
    return http.post("/token", data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                     "client_id": client_id, "redirect_uri": REDIRECT}).json()["access_token"]


def line(label: str, value: str, target: str = "") -> None:
    print(f"  {label:<52} {value:<34} {target}")


async def run(args, upstream_port: int, gateway: GatewayProcess, server_id: str, token: str) -> None:
    gw_port, mcp_path = gateway.port, f"/mcp/{server_id}"
    print(f"token {len(token)} bytes; gateway pid {gateway._process.pid} pinned to core 0\n")

    print("1. sequential JSON tools/call")
    direct = await sequential(upstream_port, "/mcp", None, args.requests)
    before = (await stats(upstream_port))["accepted"]
    proxied = await sequential(gw_port, mcp_path, token, args.requests)
    opened = (await stats(upstream_port))["accepted"] - before
    d50, d99 = statistics.median(direct), statistics.quantiles(direct, n=100)[98]
    p50, p99 = statistics.median(proxied), statistics.quantiles(proxied, n=100)[98]
    line("direct p50 / p99", f"{d50:.3f} / {d99:.3f} ms")
    line("through the gateway p50 / p99", f"{p50:.3f} / {p99:.3f} ms")
    line("added p50 / p99", f"+{p50 - d50:.3f} / +{p99 - d99:.3f} ms", "(target +1 / +3 ms)")

    if os.environ.get("BENCH_PROFILE"):  # a py-spy profile of the gateway under load
        subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "-o", os.environ["BENCH_PROFILE"],
                          "-f", "raw", "-r", "400", "-d", str(int(args.seconds) + 4), "-p", str(gateway._process.pid)])
        await asyncio.sleep(1)
    print("2. throughput, 32 concurrent clients")
    direct_rps = await throughput(upstream_port, "/mcp", None, args.seconds)
    gateway_rps = await throughput(gw_port, mcp_path, token, args.seconds)
    line("direct", f"{direct_rps:,.0f} req/s")
    line("through the gateway (one core)", f"{gateway_rps:,.0f} req/s = {gateway_rps / direct_rps:.2f}x direct",
         "(target >= 2,000 req/s)")

    print("4. upstream connections opened per 1,000 sequential requests")
    per_thousand = opened * 1000 / (args.requests + 200)
    line("through the gateway", f"{per_thousand:.1f}", "(keep-alive: about 1)")

    print(f"3. {args.streams} idle SSE streams held through the gateway")
    baseline_kib = rss_kib(gateway._process.pid)
    streams = []
    for start in range(0, args.streams, 250):
        streams += await asyncio.gather(*(open_stream(gw_port, mcp_path, token)
                                          for _ in range(min(250, args.streams - start))))
    await asyncio.sleep(1)
    held_kib = rss_kib(gateway._process.pid)
    upstream_streams = (await stats(upstream_port))["streams"]
    per_stream = (held_kib - baseline_kib) / len(streams)
    line("streams open at the upstream", f"{upstream_streams}")
    line("gateway memory per open stream (both sides)", f"{per_stream:.1f} KiB", "(target <= 32 KiB)")
    probe = await open_stream(gw_port, mcp_path, token)
    via = await crossing_times(upstream_port, probe, 300)
    for _, writer in [*streams, probe]:
        writer.close()
    await asyncio.sleep(1)
    probe = await open_stream(upstream_port, "/mcp", None)
    straight = await crossing_times(upstream_port, probe, 300)
    probe[1].close()
    v50, s50 = statistics.median(via), statistics.median(straight)
    line("event crossing p50: direct / through the gateway", f"{s50:.3f} / {v50:.3f} ms")
    line("added p50 while the streams are open", f"+{v50 - s50:.3f} ms", "(target +1 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        upstream, upstream_port = minimal_upstream.start(Path(tmp) / "port")
        gateway = None
        try:
            os.sched_setaffinity(upstream.pid, {1})
            os.sched_setaffinity(0, {1})
            gateway = GatewayProcess(Path(tmp) / "gw").start()
            os.sched_setaffinity(gateway._process.pid, {0})
            server_id = gateway.add_server(f"http://127.0.0.1:{upstream_port}/mcp", "bench@example.com")
            token = bearer_token(gateway, server_id)
            asyncio.run(run(args, upstream_port, gateway, server_id, token))
        finally:
            if gateway is not None:
                gateway.stop()
            upstream.terminate()
            upstream.wait(10)


if __name__ == "__main__":
    main()
