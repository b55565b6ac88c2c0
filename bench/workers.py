"""Workers benchmark (issue 9): MCPGW_WORKERS=1 and =2, side by side in one run, on this
machine's cores shared with the minimal upstream and this load generator. Not part of the
test run.

For each setup: proxied JSON `tools/call` POSTs from C concurrent keep-alive clients for
--seconds, the total throughput, and requests per core-second of the gateway's processes
(the utime + stime of the parent and its workers from /proc over the same window), plus each
worker's share of that CPU (how evenly the shared socket spreads connections). Setups:

  one       MCPGW_WORKERS=1: one process (the baseline)
  workers   MCPGW_WORKERS=2: a supervisor and two forked workers sharing one listening socket
  reuseport two independent gateway processes, each handed its own SO_REUSEPORT socket on
            one port (LISTEN_FDS), so the kernel spreads connections: the alternative design

All share one SQLite file (usage recording on) and one public URL, so one token serves all.
Rounds interleave the setups; medians of --rounds (default 3).
Run: .venv/bin/python bench/workers.py [--seconds 5] [--clients 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_upstream  # noqa: E402
from bench.proxy import bearer_token, throughput  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
# Moves descriptor argv[1] to 3 (sd_listen_fds' first) and execs the gateway (same pid).
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


class Setup:
    def __init__(self, name: str, port: int, pids: list[int], workers: list[int]):
        self.name, self.port, self.pids, self.workers = name, port, pids, workers


async def load(port: int, path: str, token: str, clients: int, seconds: float) -> int:
    return (await throughput(port, path, token, seconds, clients))[1]


async def measure(setup: Setup, path: str, token: str, args) -> dict:
    await load(setup.port, path, token, args.clients, 2.0)  # warm: caches, pools, connections
    before = {pid: cpu_seconds(pid) for pid in setup.pids}
    start = time.perf_counter()
    done = await load(setup.port, path, token, args.clients, args.seconds)
    elapsed = time.perf_counter() - start
    used = {pid: cpu_seconds(pid) - before[pid] for pid in setup.pids}
    total = sum(used.values())
    shares = [used[pid] / total for pid in setup.workers] if total else []
    return {"rps": done / elapsed, "per_core": done / total if total else 0.0, "cores": total / elapsed,
            "shares": shares}


def start_reuseport(base: GatewayProcess, tmp: Path) -> tuple[int, list[subprocess.Popen]]:
    """Two gateways on one port, each with its own SO_REUSEPORT listening socket."""
    probe = socket.create_server(("127.0.0.1", 0), reuse_port=True)
    port = probe.getsockname()[1]
    processes = []
    for number in range(2):
        sock = probe if number == 0 else socket.create_server(("127.0.0.1", port), reuse_port=True)
        log = open(tmp / f"reuseport-{number}.log", "wb")
        processes.append(subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(sock.fileno()), str(ROOT / "gateway.py"), "serve"],
            cwd=ROOT, env={**base.env, "LISTEN_FDS": "1"}, pass_fds=(sock.fileno(),), stdout=log,
            stderr=subprocess.STDOUT))
        log.close()
        sock.close()
    deadline = time.monotonic() + 30
    for number in range(2):
        while f"listening on http://127.0.0.1:{port}" not in (tmp / f"reuseport-{number}.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError((tmp / f"reuseport-{number}.log").read_text())
            time.sleep(0.1)
    return port, processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        upstream, upstream_port = minimal_upstream.start(tmp / "port")
        one = two = None
        reuse: list[subprocess.Popen] = []
        try:
            one = GatewayProcess(tmp / "gw").start()
            two = GatewayProcess(tmp / "gw", share_storage_with=one, extra_env={"MCPGW_WORKERS": "2"}).start()
            deadline = time.monotonic() + 30
            while "2 workers serving" not in two.log_text():
                assert time.monotonic() < deadline, two.log_text()
                time.sleep(0.1)
            reuse_port, reuse = start_reuseport(one, tmp)
            server_id = one.add_server(f"http://127.0.0.1:{upstream_port}/mcp", "bench@example.com")
            token = bearer_token(one, server_id)
            path = f"/mcp/{server_id}"
            workers = children(two.pid)
            setups = [Setup("one", one.port, [one.pid], [one.pid]),
                      Setup("workers", two.port, [two.pid, *workers], workers),
                      Setup("reuseport", reuse_port, [p.pid for p in reuse], [p.pid for p in reuse])]
            print(f"{os.cpu_count()} cores, shared by the gateway, the upstream and this load generator; "
                  f"{args.clients} keep-alive clients, {args.seconds:g} s per measurement; "
                  f"load average {os.getloadavg()[0]:.1f}\n")
            rounds = []
            for number in range(args.rounds):
                result = {setup.name: asyncio.run(measure(setup, path, token, args)) for setup in setups}
                rounds.append(result)
                print(f"round {number + 1}: " + "  ".join(
                    f"{name} {r['rps']:,.0f} req/s, {r['per_core']:,.0f} per core-s ({r['cores']:.2f} cores"
                    + (f"; shares {'/'.join(f'{s:.0%}' for s in r['shares'])}" if len(r['shares']) > 1 else "")
                    + ")" for name, r in result.items()))
            med = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("rps", "per_core", "cores")}
                   for name in rounds[0]}
            base = med["one"]
            print("\nmedians of rounds            req/s   vs one   req per core-s   vs one   gateway cores")
            for name, m in med.items():
                print(f"  {name:<24} {m['rps']:>8,.0f}   {m['rps'] / base['rps']:>5.2f}x   {m['per_core']:>14,.0f}"
                      f"   {m['per_core'] / base['per_core']:>5.2f}x   {m['cores']:>6.2f}")
            print("\ngoal: workers' per-core figure >= 0.90x one's, and more total req/s than one")
        finally:
            for process in reuse:
                process.terminate()
                process.wait(15)
            for gateway in (two, one):
                if gateway is not None:
                    gateway.stop()
            upstream.terminate()
            upstream.wait(10)


if __name__ == "__main__":
    main()
