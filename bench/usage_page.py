"""Usage page figures with a large history (not part of the test run).

Writes N usage events (default 1,000,000) into a fresh SQLite gateway database through
`storage.record_usage` in batches, spread over 30 days (busier by day than by night), 50
users and 40 tools with skewed popularity, log-normal latencies and ~2 % errors. Then it
starts one real gateway process on that database, signs the owner in (local sign-in) and
times, in the same run:
  - GET /healthz                                   the framework floor (baseline),
  - GET the owner's usage page for 24 h, 7 and 30 days,
  - GET the usage JSON (/api/…/usage?range=30d) and the CSV export,
printing p50 and the ratio to the /healthz floor.

Run: .venv/bin/python bench/usage_page.py [EVENTS] [RUNS]
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.authserver.signin import dev_subject  # noqa: E402
from storage.base import Server, UsageEvent, User  # noqa: E402
from storage.sqlite import SqliteStorage  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402

OWNER = "owner@example.com"
SERVER_ID = "srv_bench"
USERS = 50
TOOLS = 40
DAYS = 30
BATCH = 10_000


def events(n: int, now: float, rng: random.Random):
    users = [(f"sub-{i:02d}", f"user{i:02d}@example.com") for i in range(USERS)]
    tools = [f"tool_{i:02d}" for i in range(TOOLS)]
    user_weights = [1 / (i + 1) ** 0.8 for i in range(USERS)]
    tool_weights = [1 / (i + 1) for i in range(TOOLS)]
    start = now - DAYS * 86400
    batch: list[UsageEvent] = []
    for _ in range(n):
        # Busier in the (UTC) working day: accept a uniform time with a diurnal probability.
        while True:
            at = start + rng.random() * DAYS * 86400
            hour = (at % 86400) / 3600
            if rng.random() < 0.35 + 0.65 * math.sin(math.pi * max(0.0, min(1.0, (hour - 6) / 14))):
                break
        sub, email = rng.choices(users, user_weights)[0]
        tool = rng.choices(tools, tool_weights)[0]
        outcome = "ok" if rng.random() > 0.02 else rng.choice(["-32603", "tool_error", "502"])
        latency = rng.lognormvariate(math.log(40), 0.9)
        batch.append(UsageEvent(at, SERVER_ID, sub, email, "client-bench", "tools/call", tool, outcome,
                                latency, 300, 1200, "2025"))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


async def fill(db: Path, n: int) -> float:
    storage = SqliteStorage(str(db))
    await storage.open()
    now = time.time()
    sub = dev_subject(OWNER)
    await storage.upsert_user(User(sub, OWNER, True, "", "owner", "", now, now))
    await storage.create_server(Server(SERVER_ID, "Bench server", "http://127.0.0.1:9/mcp", sub, OWNER, "", False, now))
    rng = random.Random(7)
    started = time.perf_counter()
    for batch in events(n, now, rng):
        await storage.usage.record_usage(batch)
    elapsed = time.perf_counter() - started
    await storage.close()
    return elapsed


def timed(client: httpx.Client, path: str, runs: int) -> list[float]:
    client.get(path).raise_for_status()  # warm-up (templates, caches)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        response = client.get(path)
        samples.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return samples


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "gw"
        state.mkdir()
        gateway = GatewayProcess(state)
        print(f"writing {n:,} usage events through storage.record_usage (batches of {BATCH:,}) …", flush=True)
        seconds = asyncio.run(fill(state / "gateway.db", n))
        size = (state / "gateway.db").stat().st_size / 1e6
        print(f"  {seconds:.1f} s ({n / seconds:,.0f} events/s), database {size:,.0f} MB")
        gateway.start()
        try:
            with httpx.Client(base_url=gateway.url, timeout=120, trust_env=False) as client:
                client.get("/login")
                client.post("/login", data={"email": OWNER, "next": "/dashboard", "_xsrf": client.cookies["_xsrf"]})
                base = f"/dashboard/servers/{SERVER_ID}"
                floor = statistics.median(timed(client, "/healthz", runs * 4))
                print(f"\n{'request':<44} {'p50 ms':>9} {'x /healthz':>11}")
                print(f"{'GET /healthz (floor)':<44} {floor:9.2f} {1.0:11.1f}")
                for label, path in (
                    ("usage page, 24 h (hourly aggregates)", base + "/usage?range=24h"),
                    ("usage page, 7 days (aggregates)", base + "/usage?range=7d"),
                    ("usage page, 30 days (aggregates)", base + "/usage?range=30d"),
                    ("usage JSON, 30 days", f"/api/servers/{SERVER_ID}/usage?range=30d"),
                    ("usage CSV, 30 days", base + "/usage.csv?range=30d"),
                ):
                    p50 = statistics.median(timed(client, path, runs))
                    print(f"{label:<44} {p50:9.2f} {p50 / floor:11.1f}")
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
