"""Connected-accounts benchmark (issue 11). Not part of the test run.

  1. the added cost of injecting a user's own upstream token on the warm hot path: one gateway
     process, two servers in front of the same minimal upstream (bench/minimal_upstream.py),
     one with a static `Authorization` header, one with upstream_auth=oauth and a credential
     seeded through the storage API (the minimal upstream ignores the token); interleaved
     rounds of sequential p50/p99 and requests per CPU-second of the gateway
     (goal: oauth within +0.1 ms of static at p50)
  2. the cost of one refresh against the real test authorization server
     (tests/support/oauth_upstream.py), in this process: `UpstreamAuth.get_token` forced to
     refresh (lease, token request, sealing, conditional write) vs the bare token request
     alone with the same HTTP client; p50 of --refreshes

Run: .venv/bin/python bench/upstream_auth.py [--seconds 3] [--requests 2000] [--rounds 3] [--refreshes 200]
The gateway is pinned to core 0; the upstream and this load generator share core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_upstream  # noqa: E402
from bench.proxy import TOOLS_CALL, bearer_token, line, measure_round, percentiles  # noqa: E402
from config import Config  # noqa: E402
from services.authserver.keys import SecretBox  # noqa: E402
from services.proxy.upstream.policy import AddressPolicy  # noqa: E402
from services.proxy.upstream_auth.clients import UpstreamAuthSettings  # noqa: E402
from services.proxy.upstream_auth.sealing import TokenSet, open_tokens, seal_tokens  # noqa: E402
from services.proxy.upstream_auth.service import UpstreamAuth  # noqa: E402
from services.proxy.upstream_auth.tokens import token_request  # noqa: E402
from storage import open_storage  # noqa: E402
from storage.sqlite.store import SqliteStorage  # noqa: E402
from storage.upstream_auth import UpstreamCredential  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402
from tests.support.oauth_upstream import OAuthUpstream  # noqa: E402

OWNER = "bench@example.com"
ISSUER = "http://127.0.0.1:9/"  # never reached: the seeded token stays fresh for the whole run


async def seed(gateway: GatewayProcess, server_id: str) -> None:
    """A connected account for the bench user, written with the gateway's own storage and key."""
    config = Config.from_env(gateway.env)
    storage = open_storage(config.storage_url)
    await storage.open()
    try:
        box = SecretBox(config.secret_key)
        sub = (await storage.users_matching("email", OWNER))[0].sub
        token = "at-" + secrets.token_urlsafe(32)
        now = time.time()
        await storage.upstream_auth.put_credential(UpstreamCredential(
            sub, server_id, ISSUER, seal_tokens(box, sub, server_id, ISSUER, TokenSet(token, "rt-unused")),
            expires_at=now + 86400, scope="mcp", upstream_subject="bench", updated_at=now))
    finally:
        await storage.close()


def check_answer(port: int, path: str, token: str) -> None:
    """The oauth server really relays (not the connect link, which is a 200 tool error too)."""
    answer = httpx.post(f"http://127.0.0.1:{port}{path}", content=TOOLS_CALL, trust_env=False, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"})
    if answer.status_code != 200 or "connect your account" in answer.text:
        raise RuntimeError(f"{path} did not relay: {answer.status_code} {answer.text[:200]}")


def hot_path(args, tmp: Path) -> None:
    upstream, upstream_port = minimal_upstream.start(tmp / "port")
    gateway = None
    try:
        os.sched_setaffinity(upstream.pid, {1})
        os.sched_setaffinity(0, {1})
        gateway = GatewayProcess(tmp / "gw").start()
        os.sched_setaffinity(gateway.pid, {0})
        url = f"http://127.0.0.1:{upstream_port}/mcp"
        # Same header size on both: a static bearer as long as the seeded one.
        static_id = gateway.add_server(url, OWNER, "static", "--header",
                                       "Authorization: Bearer at-" + secrets.token_urlsafe(32))
        oauth_id = gateway.add_server(url, OWNER, "oauth", "--upstream-auth", "oauth",
                                      "--upstream-client-id", "bench-client")
        targets = {"static header": (gateway.port, f"/mcp/{static_id}", bearer_token(gateway, static_id),
                                     gateway.pid)}
        # Connected before the sign-in, so that the sign-in needs no trip to the upstream.
        asyncio.run(seed(gateway, oauth_id))
        targets["oauth (user's token)"] = (gateway.port, f"/mcp/{oauth_id}", bearer_token(gateway, oauth_id),
                                           gateway.pid)
        for _, path, token, _ in targets.values():
            check_answer(gateway.port, path, token)
        rounds = []
        for number in range(args.rounds):
            # Alternate the order so neither target always runs on a warmer machine.
            order = dict(reversed(targets.items())) if number % 2 else targets
            rounds.append(asyncio.run(measure_round(args, order, upstream_port)))
        print(f"1. token injection on the warm hot path (median of {args.rounds} interleaved rounds)")
        med = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("p50", "p99", "per_cpu")}
               for name in targets}
        for name, values in med.items():
            line(name, f"p50 {values['p50']:.3f} ms  p99 {values['p99']:.3f} ms  {values['per_cpu']:.0f} req/CPU-s")
        static, oauth = med["static header"], med["oauth (user's token)"]
        line("added p50 (oauth - static)", f"{oauth['p50'] - static['p50']:+.3f} ms", "goal <= +0.1 ms")
        line("requests per CPU-second (oauth / static)", f"{oauth['per_cpu'] / static['per_cpu']:.3f}x")
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.terminate()
        upstream.wait(10)


@dataclass(frozen=True)
class Srv:
    """The Server fields UpstreamAuth reads."""

    server_id: str
    upstream_url: str
    internal_upstream: bool = True
    upstream_client_id: str = ""
    upstream_client_secret_enc: str = ""
    upstream_send_resource: bool = True
    upstream_audience: str = ""


async def refreshes(args, tmp: Path, upstream: OAuthUpstream) -> None:
    box = SecretBox(secrets.token_bytes(32))
    storage = SqliteStorage(str(tmp / "refresh.db"))
    await storage.open()
    svc = UpstreamAuth(storage, box, AddressPolicy(["127.0.0.1/32"]), "http://127.0.0.1:9")
    server = Srv("bench", upstream.mcp_url)
    try:
        url = await svc.begin("bench-user", server, browser="b")
        async with httpx.AsyncClient(trust_env=False) as browser:
            answer = await browser.get(url)
        params = dict(httpx.URL(answer.headers["location"]).params)

        async def server_of(_):
            return server

        await svc.complete(params, "bench-user", "b", server_of)
        upstream.control(rotate=False)  # one refresh token for all (the service and the bare requests)
        token = await svc.get_token("bench-user", server)
        for _ in range(10):  # warm: connections, discovery cache, client identity
            token = await svc.get_token("bench-user", server, rejected=token)
        full = []
        for _ in range(args.refreshes):
            start = time.perf_counter()
            token = await svc.get_token("bench-user", server, rejected=token)
            full.append((time.perf_counter() - start) * 1000)
        credential = await storage.upstream_auth.get_credential("bench-user", "bench")
        refresh_token = open_tokens(box, credential).refresh_token
        discovery = await svc.discover(server)
        client = await svc.clients.identify("bench", discovery.server, UpstreamAuthSettings.of(server, box), False)
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "resource": discovery.resource}
        bare = []
        for _ in range(args.refreshes):
            start = time.perf_counter()
            await token_request(svc.http, discovery.server, client, form, public_only=False)
            bare.append((time.perf_counter() - start) * 1000)
        print(f"2. one refresh against the test authorization server (p50 / p99 of {args.refreshes})")
        line("get_token forced to refresh", "p50 {:.2f} ms  p99 {:.2f} ms".format(*percentiles(full)))
        line("the bare token request alone", "p50 {:.2f} ms  p99 {:.2f} ms".format(*percentiles(bare)))
        line("the gateway's share (lease, sealing, writes)",
             f"{statistics.median(full) - statistics.median(bare):+.2f} ms at p50")
    finally:
        upstream.control(rotate=True)
        svc.close()
        await storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--refreshes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.rounds:  # --rounds 0: the refresh cost only
            hot_path(args, Path(tmp))
        upstream = OAuthUpstream().wait_ready()
        try:
            asyncio.run(refreshes(args, Path(tmp), upstream))
        finally:
            upstream.stop()


if __name__ == "__main__":
    main()
