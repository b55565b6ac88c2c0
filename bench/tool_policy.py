"""Tool policy benchmark (issue 10), not part of the test run: the cost of a tool rule on a warm
tools/call through the gateway, and of filtering a 500-tool tools/list, against baselines of the same run.

  1. one gateway process, two servers on the same minimal upstream, both shared with the caller:
     "ruled" (a grant with an allow list and read-only) and "plain" (a grant without any rule).
     Sequential warm tools/call p50 and CPU per request (32 clients) of each, rounds interleaved
     (goal: ruled - plain <= +0.05 ms p50). The minimal upstream cannot answer tools/list, so
     the catalog entry read-only needs (the tool's readOnlyHint) is written into the gateway's
     SQLite storage with ToolService.observe_probe, the call Test connection makes.
  2. in-process, a 500-tool tools/list answer: ToolService's parse + record + filter + write
     (read-only grant, every tool's catalog entry current) vs plain json.loads + json.dumps.

Run: .venv/bin/python bench/tool_policy.py [--requests 2000] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_upstream  # noqa: E402
from bench.proxy import TOOLS_CALL, bearer_token, cpu_seconds, sequential, throughput  # noqa: E402
from services.common.access import AccessPolicy, Principal  # noqa: E402
from services.proxy.tools.filtering import read_tools_response  # noqa: E402
from services.proxy.tools.service import ToolService  # noqa: E402
from storage.urls import open_storage  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402

CALLER = "bench@example.com"
OWNER = "owner@example.com"
SEARCH = {"name": "search", "title": "Search", "description": "Search the documents.",
          "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}},
          "annotations": {"readOnlyHint": True}}


def listing(count: int) -> bytes:
    """A tools/list answer of `count` tools, every other one read-only."""
    tools = [{"name": f"tool_{i:03d}", "title": f"Tool {i}", "description": f"Does thing number {i}. " * 4,
              "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}, "n": {"type": "integer"}},
                              "required": ["path"]},
              "annotations": {"readOnlyHint": i % 2 == 0}} for i in range(count)]
    return json.dumps({"jsonrpc": "2.0", "id": 2, "result": {"tools": tools}}).encode()


async def seed_catalog(db: Path, server_id: str, tools: list[dict]) -> None:
    store = open_storage(f"sqlite:///{db}")
    await store.open()
    try:
        await ToolService(store, AccessPolicy(store)).observe_probe(server_id, tools)
    finally:
        await store.close()


async def gateway_rounds(args, gateway: GatewayProcess, targets: dict[str, tuple[str, str]]) -> None:
    for name, (path, token) in targets.items():  # a refused call is a 200 too: check it is answered
        answer = httpx.post(f"{gateway.url}{path}", content=TOOLS_CALL, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}).json()
        if "result" not in answer:
            raise SystemExit(f"{name}: the tools/call was not answered by the upstream: {answer}")
    rounds = []
    for number in range(args.rounds):
        r: dict[str, dict] = {name: {} for name in targets}
        order = list(targets) if number % 2 == 0 else list(reversed(targets))
        for name in order:
            path, token = targets[name]
            r[name]["p50"] = statistics.median(await sequential(gateway.port, path, token, args.requests))
        for name in order:
            path, token = targets[name]
            cpu = cpu_seconds(gateway.pid)
            _, done = await throughput(gateway.port, path, token, args.seconds)
            r[name]["cpu_us"] = (cpu_seconds(gateway.pid) - cpu) / done * 1e6
        rounds.append(r)
        print(f"  round {number + 1}: p50 plain {r['plain']['p50']:.3f} ms, ruled {r['ruled']['p50']:.3f} ms; "
              f"CPU/request plain {r['plain']['cpu_us']:.0f} us, ruled {r['ruled']['cpu_us']:.0f} us")
    med = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("p50", "cpu_us")}
           for name in targets}
    delta = statistics.median(r["ruled"]["p50"] - r["plain"]["p50"] for r in rounds)
    print(f"\n  warm tools/call p50: plain {med['plain']['p50']:.3f} ms, ruled {med['ruled']['p50']:.3f} ms, "
          f"delta {delta:+.3f} ms (median of rounds; goal <= +0.05 ms)")
    print(f"  CPU per request: plain {med['plain']['cpu_us']:.0f} us, ruled {med['ruled']['cpu_us']:.0f} us, "
          f"ratio {med['ruled']['cpu_us'] / med['plain']['cpu_us']:.3f}x")


async def filtering(repeat: int, tmp: Path) -> None:
    store = open_storage(f"sqlite:///{tmp / 'filter.db'}")
    await store.open()
    try:
        server = await store.get_server(await _server(store))
        service = ToolService(store, AccessPolicy(store))
        await service.add_grant(server.server_id, "email", CALLER, read_only=True)
        server, grants = await service.rules(server.server_id)
        grants = tuple(grants)
        caller = Principal("u-bench", email=CALLER)
        data = listing(500)
        first = read_tools_response(data)
        await service.filter_listing(caller, server, grants, first, complete=True)  # the catalog, current
        kept = len(json.loads(await service.filter_listing(caller, server, grants, read_tools_response(data),
                                                           complete=True))["result"]["tools"])

        async def filtered() -> None:
            await service.filter_listing(caller, server, grants, read_tools_response(data), complete=True)

        def plain() -> None:
            json.dumps(json.loads(data), separators=(",", ":")).encode()

        samples: dict[str, list[float]] = {"plain": [], "filtered": []}
        for _ in range(repeat):
            start = time.perf_counter()
            plain()
            samples["plain"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await filtered()
            samples["filtered"].append((time.perf_counter() - start) * 1000)
        p_plain, p_filtered = (statistics.median(samples[k]) for k in ("plain", "filtered"))
        await decisions(service, server, grants, caller)
        print(f"\n  500-tool tools/list ({len(data) / 1024:.0f} KiB, {kept} tools kept by read-only): "
              f"json.loads+dumps {p_plain:.2f} ms, parse+record+filter+write {p_filtered:.2f} ms, "
              f"ratio {p_filtered / p_plain:.2f}x, +{p_filtered - p_plain:.2f} ms (medians of {repeat})")
    finally:
        await store.close()


async def decisions(service: ToolService, server, grants, caller: Principal, count: int = 20000) -> None:
    """The check itself, warm, as the proxy makes it per tools/call: a ruled caller (read-only
    grant: the catalog view is read from the cache) vs the owner (no rule: nothing read)."""
    owner = Principal("u-owner", email=OWNER)
    figures = {}
    for label, who in (("owner, no rule", owner), ("read-only grant", caller)):
        assert (await service.decide_call(who, server, grants, "tool_000")).allowed
        start = time.perf_counter()
        for _ in range(count):
            await service.decide_call(who, server, grants, "tool_000")
        figures[label] = (time.perf_counter() - start) / count * 1e6
    print("  decide_call in-process, warm: " + ", ".join(f"{k} {v:.2f} us" for k, v in figures.items()))


async def _server(store) -> str:
    from storage.base import Server

    server = Server(server_id="bench-filter", name="Filter bench", upstream_url="http://127.0.0.1:9/mcp",
                    owner_email=OWNER)
    await store.create_server(server)
    return server.server_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=200, help="500-tool listings filtered")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        upstream, upstream_port = minimal_upstream.start(Path(tmp) / "port")
        gateway = None
        try:
            if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                os.sched_setaffinity(upstream.pid, {1})
                os.sched_setaffinity(0, {1})
            gateway = GatewayProcess(Path(tmp) / "gw").start()
            if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                os.sched_setaffinity(gateway.pid, {0})
            url = f"http://127.0.0.1:{upstream_port}/mcp"
            ruled = gateway.add_server(url, OWNER, "ruled")
            plain = gateway.add_server(url, OWNER, "plain")
            gateway.cli("grants", "add", ruled, "--email", CALLER, "--tools-allow", "search,read_*", "--read-only")
            gateway.cli("grants", "add", plain, "--email", CALLER)
            asyncio.run(seed_catalog(Path(tmp) / "gw" / "gateway.db", ruled, [SEARCH]))
            targets = {"plain": (f"/mcp/{plain}", bearer_token(gateway, plain)),
                       "ruled": (f"/mcp/{ruled}", bearer_token(gateway, ruled))}
            print(f"gateway pid {gateway.pid}; {args.rounds} rounds, interleaved, medians\n")
            asyncio.run(gateway_rounds(args, gateway, targets))
        finally:
            if gateway is not None:
                gateway.stop()
            upstream.terminate()
            upstream.wait(10)
        asyncio.run(filtering(args.repeat, Path(tmp)))


if __name__ == "__main__":
    main()
