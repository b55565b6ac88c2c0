"""Proxy benchmark (issues 3 and 8): one gateway process, the floor (bench/floor.py: a plain
Tornado pass-through over the same pooled upstream client, no auth) and direct access to a
minimal fast upstream, side by side in the same run. Not part of the test run.

  1. added latency of a JSON tools/call over direct access, sequential: floor and gateway
     (goal: the gateway within +0.1 ms of the floor at p50, +0.3 ms at p99)
  2. throughput, 32 concurrent clients, gateway and floor each pinned to one core
     (goal: the gateway >= 0.85x the floor)
  3. N idle SSE streams held open: memory per stream (client side + upstream side) of the
     floor and of the gateway (goal <= 20 KiB), and the time an event takes to cross
     through the gateway while they are open
  4. upstream TCP connections opened per 1,000 sequential requests (keep-alive)

Rounds interleave the three targets; medians of --rounds rounds (default 3).
Run: .venv/bin/python bench/proxy.py [--streams 2000] [--seconds 5] [--requests 2000] [--rounds 3] [--lean]
The gateway and the floor are pinned to core 0; the upstream and this load generator share core 1.
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import floor as bench_floor  # noqa: E402
from bench import lean_floor, minimal_upstream  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402
from tests.support.workers import child_processes  # noqa: E402

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Pin `pid` and its child processes (the usage writer, which a gateway starts with the
    recorder, before the bench can pin the gateway) to `cpus`."""
    os.sched_setaffinity(pid, cpus)
    for child, _ in child_processes(pid):
        try:
            os.sched_setaffinity(child, cpus)
        except OSError:  # gone meanwhile
            continue


def children_cpu_seconds(pid: int) -> float:
    """CPU time of the live child processes of `pid` (the gateway's SQLite usage writer)."""
    return sum(int(fields[11]) + int(fields[12]) for _, fields in child_processes(pid)) / os.sysconf("SC_CLK_TCK")


async def throughput(port: int, path: str, token: str | None, seconds: float,
                     clients: int = 32) -> tuple[float, int]:
    """(requests per second, requests done) with `clients` concurrent keep-alive clients."""
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
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - start), done


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
    print(f"  {label:<52} {value:<40} {target}")


def percentiles(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=100)[98]


async def measure_round(args, targets: dict[str, tuple[int, str, str | None, int]],
                        upstream_port: int) -> dict[str, dict]:
    """One round: sequential latency, then throughput at 32 clients, of every target in turn."""
    result = {name: {} for name in targets}
    for name, (port, path, token, _) in targets.items():
        before = (await stats(upstream_port))["accepted"]
        result[name]["p50"], result[name]["p99"] = percentiles(await sequential(port, path, token, args.requests))
        result[name]["opened"] = (await stats(upstream_port))["accepted"] - before
    for name, (port, path, token, pid) in targets.items():
        cpu, helpers = cpu_seconds(pid), children_cpu_seconds(pid)
        result[name]["rps"], done = await throughput(port, path, token, args.seconds)
        # Requests per CPU-second of the serving process: what one core would do alone. The
        # machine is shared, so wall-clock req/s also measures the neighbours; this much less.
        spent = max(cpu_seconds(pid) - cpu, 1e-9)
        result[name]["per_cpu"] = done / spent
        # The same with its child processes' CPU (the usage writer): the machine's cost.
        result[name]["per_cpu_all"] = done / (spent + max(children_cpu_seconds(pid) - helpers, 0.0))
    return result


async def stream_memory(pid: int, port: int, path: str, token: str | None, count: int, upstream_port: int):
    """KiB of the process's RSS per idle SSE stream held open through it (client side +
    upstream side), and the streams open at the upstream meanwhile; the streams stay open."""
    baseline_kib = rss_kib(pid)
    streams = []
    for start in range(0, count, 250):
        streams += await asyncio.gather(*(open_stream(port, path, token) for _ in range(min(250, count - start))))
    await asyncio.sleep(1)
    per_stream = (rss_kib(pid) - baseline_kib) / len(streams)
    return per_stream, (await stats(upstream_port))["streams"], streams


async def run(args, upstream_port: int, gateway: GatewayProcess, server_id: str, token: str,
              floor_pid: int, floor_port: int, baseline: tuple | None, upstream_pid: int) -> None:
    gw_port, mcp_path = gateway.port, f"/mcp/{server_id}"
    print(f"token {len(token)} bytes; gateway pid {gateway.pid} and floor pid {floor_pid} pinned to core 0; "
          f"{args.rounds} rounds, medians\n")
    targets = {"direct": (upstream_port, "/mcp", None, upstream_pid), "floor": (floor_port, "/mcp", None, floor_pid),
               "gateway": (gw_port, mcp_path, token, gateway.pid)}
    if baseline is not None:  # --baseline-tree: the gateway of another checkout, same upstream
        targets["baseline"] = baseline
    targets.update(args.lean_targets)  # --lean: the pass-through on leaner server layers (prototypes)
    if os.environ.get("BENCH_PROFILE"):  # a py-spy profile under load (before the rounds)
        # BENCH_PROFILE_TARGET=floor profiles the floor instead of the gateway.
        port, path, profile_token, pid = targets[os.environ.get("BENCH_PROFILE_TARGET", "gateway")]
        py_spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")  # not a project dependency
        subprocess.Popen([py_spy, "record", "-o", os.environ["BENCH_PROFILE"],
                          "-f", "raw", "-r", "400", "-d", str(int(args.seconds) + 4), "-p", str(pid)])
        await asyncio.sleep(1)
        await throughput(port, path, profile_token, args.seconds)  # (the figures are in the rounds)
    rounds = []
    for number in range(args.rounds):
        rounds.append(await measure_round(args, targets, upstream_port))
        r = rounds[-1]
        print(f"  round {number + 1}: req/s direct {r['direct']['rps']:,.0f}  floor {r['floor']['rps']:,.0f}  "
              f"gateway {r['gateway']['rps']:,.0f} ({r['gateway']['rps'] / r['floor']['rps']:.2f}x floor; "
              f"per CPU-second {r['gateway']['per_cpu'] / r['floor']['per_cpu']:.2f}x); "
              f"p50 {r['direct']['p50']:.3f} / {r['floor']['p50']:.3f} / {r['gateway']['p50']:.3f} ms")
    med = {name: {key: statistics.median(r[name][key] for r in rounds)
                  for key in ("p50", "p99", "rps", "per_cpu", "per_cpu_all")}
           for name in targets}
    ratios = [r["gateway"]["rps"] / r["floor"]["rps"] for r in rounds]
    direct, floor, gw = med["direct"], med["floor"], med["gateway"]

    print("\n1. sequential JSON tools/call, added over direct access (median of rounds)")
    line("direct p50 / p99", f"{direct['p50']:.3f} / {direct['p99']:.3f} ms")
    line("floor: added p50 / p99", f"+{floor['p50'] - direct['p50']:.3f} / +{floor['p99'] - direct['p99']:.3f} ms")
    line("gateway: added p50 / p99", f"+{gw['p50'] - direct['p50']:.3f} / +{gw['p99'] - direct['p99']:.3f} ms")
    line("gateway over the floor p50 / p99", f"+{gw['p50'] - floor['p50']:.3f} / +{gw['p99'] - floor['p99']:.3f} ms",
         "(goal +0.1 / +0.3 ms)")

    print("2. throughput, 32 concurrent clients, one core (median of rounds)")
    line("direct", f"{direct['rps']:,.0f} req/s")
    line("floor (plain Tornado pass-through)", f"{floor['rps']:,.0f} req/s = 1.00x")
    line("gateway", f"{gw['rps']:,.0f} req/s = {gw['rps'] / floor['rps']:.2f}x floor",
         "(goal >= 0.85x)")
    line("gateway / floor, per round", " ".join(f"{x:.2f}" for x in ratios))
    cpu_ratios = [r["gateway"]["per_cpu"] / r["floor"]["per_cpu"] for r in rounds]
    line("requests per CPU-second: floor / gateway", f"{floor['per_cpu']:,.0f} / {gw['per_cpu']:,.0f} "
         f"= {statistics.median(cpu_ratios):.2f}x floor", "(goal >= 0.85x)")
    line("  per round", " ".join(f"{x:.2f}" for x in cpu_ratios))
    all_ratios = [r["gateway"]["per_cpu_all"] / r["floor"]["per_cpu"] for r in rounds]
    line("  with its child processes (usage writer)", f"{gw['per_cpu_all']:,.0f} = "
         f"{statistics.median(all_ratios):.2f}x floor")
    if baseline is not None:
        base = med["baseline"]
        base_cpu = statistics.median(r["baseline"]["per_cpu"] / r["floor"]["per_cpu"] for r in rounds)
        base_all = statistics.median(r["baseline"]["per_cpu_all"] / r["floor"]["per_cpu"] for r in rounds)
        line("baseline tree's gateway", f"{base['rps'] / floor['rps']:.2f}x floor, per CPU-second {base_cpu:.2f}x "
             f"({base_all:.2f}x with children), added p50 / p99 +{base['p50'] - direct['p50']:.3f} / "
             f"+{base['p99'] - direct['p99']:.3f} ms (+{base['p50'] - floor['p50']:.3f} / "
             f"+{base['p99'] - floor['p99']:.3f} over the floor)")

    for name, label in (("delegate", "Tornado HTTPServer, bare delegate, no RequestHandler"),
                        ("asyncio", "no Tornado: asyncio Protocol + httptools")):
        if name in args.lean_targets:
            lean_cpu = statistics.median(r[name]["per_cpu"] / r["floor"]["per_cpu"] for r in rounds)
            line(f"lean pass-through: {label}", f"{med[name]['per_cpu']:,.0f} per CPU-s = {lean_cpu:.2f}x floor, "
                 f"p50 {med[name]['p50'] - floor['p50']:+.3f} ms")

    print("4. upstream connections opened per 1,000 sequential requests (all rounds)")
    for name in ("floor", "gateway"):
        opened = sum(r[name]["opened"] for r in rounds)
        line(name, f"{opened * 1000 / (args.rounds * (args.requests + 200)):.1f}", "(keep-alive: about 1)")

    print(f"3. {args.streams} idle SSE streams held open")
    floor_kib, floor_up, streams = await stream_memory(floor_pid, floor_port, "/mcp", None, args.streams,
                                                       upstream_port)
    for _, writer in streams:
        writer.close()
    await asyncio.sleep(1)
    if baseline is not None:
        port, path, base_token, pid = baseline
        base_kib, _, streams = await stream_memory(pid, port, path, base_token, args.streams, upstream_port)
        for _, writer in streams:
            writer.close()
        line("memory per open stream (both sides): baseline tree", f"{base_kib:.1f} KiB")
        await asyncio.sleep(1)
    gw_kib, gw_up, streams = await stream_memory(gateway.pid, gw_port, mcp_path, token, args.streams, upstream_port)
    line("streams open at the upstream: floor / gateway", f"{floor_up} / {gw_up}")
    line("memory per open stream (both sides): floor", f"{floor_kib:.1f} KiB")
    line("memory per open stream (both sides): gateway", f"{gw_kib:.1f} KiB", "(goal <= 20 KiB)")
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


def start_baseline(tree: Path, state: Path, upstream_port: int) -> GatewayProcess:
    """A gateway process running the code of `tree` (its gateway.py and CLI), pinned to core 0."""
    from tests.support import gateway as support

    support.ROOT, saved = tree, support.ROOT
    try:
        other = GatewayProcess(state).start()
    finally:
        support.ROOT = saved

    class Cli(GatewayProcess):  # the CLI of that tree too: its storage schema may differ
        def cli(self, *args, **kwargs):
            support.ROOT, saved = tree, support.ROOT
            try:
                return super().cli(*args, **kwargs)
            finally:
                support.ROOT = saved

    other.__class__ = Cli
    time.sleep(0.5)  # its usage writer started
    pin(other.pid, {0})
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path,
                        help="also measure the gateway of this checkout (before/after comparisons in one run)")
    parser.add_argument("--lean", action="store_true",
                        help="also measure bench/lean_floor.py: the floor's pass-through without Tornado")
    args = parser.parse_args()
    args.lean_targets = {}
    with tempfile.TemporaryDirectory() as tmp:
        upstream, upstream_port = minimal_upstream.start(Path(tmp) / "port")
        gateway = floor = other = None
        leans = []
        try:
            os.sched_setaffinity(upstream.pid, {1})
            os.sched_setaffinity(0, {1})
            gateway = GatewayProcess(Path(tmp) / "gw").start()
            time.sleep(0.5)  # its usage writer started
            pin(gateway.pid, {0})
            floor, floor_port = bench_floor.start(Path(tmp) / "floor-port", f"http://127.0.0.1:{upstream_port}/mcp")
            os.sched_setaffinity(floor.pid, {0})
            server_id = gateway.add_server(f"http://127.0.0.1:{upstream_port}/mcp", "bench@example.com")
            token = bearer_token(gateway, server_id)
            for kind in ("delegate", "asyncio") if args.lean else ():
                lean, lean_port = lean_floor.start(Path(tmp) / f"{kind}-port", f"http://127.0.0.1:{upstream_port}/mcp",
                                                   kind)
                leans.append(lean)
                os.sched_setaffinity(lean.pid, {0})
                args.lean_targets[kind] = (lean_port, "/mcp", None, lean.pid)
            baseline = other = None
            if args.baseline_tree:
                other = start_baseline(args.baseline_tree.resolve(), Path(tmp) / "baseline", upstream_port)
                other_id = other.add_server(f"http://127.0.0.1:{upstream_port}/mcp", "bench@example.com")
                baseline = (other.port, f"/mcp/{other_id}", bearer_token(other, other_id), other.pid)
            asyncio.run(run(args, upstream_port, gateway, server_id, token, floor.pid, floor_port, baseline,
                            upstream.pid))
        finally:
            if other is not None:
                other.stop()
            if gateway is not None:
                gateway.stop()
            for process in (floor, *leans):
                if process is not None:
                    process.terminate()
                    process.wait(10)
            upstream.terminate()
            upstream.wait(10)


if __name__ == "__main__":
    main()
