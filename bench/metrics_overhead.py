"""Metrics on the hot path (issue 9): proxy throughput of one gateway process with its metrics
recording and with them switched off (signals flip the recorders to no-ops), in the same run.
Not part of the test run.

  1. throughput, 32 concurrent clients, JSON tools/call, the gateway pinned to core 0, runs
     with and without metrics interleaved (median ratio), and its CPU time per request in
     each state over all rounds (steadier on a shared machine); goal: metrics cost <= 3 %
  2. metric operations per proxied request (from /metrics) and the cost of one operation
     in this process: in memory (one worker) and in mmap files (multi-process mode),
     i.e. the expected share of a request's CPU time; with py-spy installed, the share of
     the gateway's samples in metrics code
  3. what the storage timing wrapper adds to a storage call (a no-op coroutine, SQLite)

Run: .venv/bin/python bench/metrics_overhead.py [--seconds 2] [--rounds 10]
The upstream and this load generator share core 1. A run with metrics off is checked to
have counted nothing, a run with them on to have counted every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_upstream  # noqa: E402
from bench.proxy import Connection, bearer_token, throughput  # noqa: E402
from tests.support import gateway as gateway_support  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402

RECORDERS = ("inc", "gauge_add", "gauge_set", "observe")


def serve_with_switch() -> None:
    """`gateway.py serve` whose Metrics stop recording on SIGUSR1 and record again on SIGUSR2
    (run by the shim below): one process measured both ways, so nothing else differs."""
    import services.app as app
    from services.common.metrics import Metrics

    instances = []

    class SwitchableMetrics(Metrics):
        def __init__(self):
            super().__init__()
            instances.append(self)

    def nothing(*args, **kwargs) -> None:
        return None

    def off(*_) -> None:
        for metrics in instances:
            for name in RECORDERS:
                setattr(metrics, name, nothing)  # shadows the method on the instance

    def on(*_) -> None:
        for metrics in instances:
            for name in RECORDERS:
                metrics.__dict__.pop(name, None)

    app.Metrics = SwitchableMetrics
    signal.signal(signal.SIGUSR1, off)
    signal.signal(signal.SIGUSR2, on)
    import gateway

    sys.exit(gateway.main(["serve"]))


SHIM = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from bench.metrics_overhead import serve_with_switch
serve_with_switch()
"""


def start_with_switch(gateway: GatewayProcess, shim_dir: Path) -> GatewayProcess:
    """GatewayProcess runs ROOT/gateway.py: point it at a shim for this one start."""
    (shim_dir / "gateway.py").write_text(SHIM)
    real_root = gateway_support.ROOT
    gateway_support.ROOT = shim_dir
    try:
        return gateway.start()
    finally:
        gateway_support.ROOT = real_root


def mcp_answers_counted(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mcpgw_http_requests_total" and sample.labels == {"route": "mcp", "status": "200"}:
                return sample.value
    return 0.0


def operations_per_request(port: int, requests: int, run_requests) -> dict[str, float]:
    """Counter increments and histogram samples per proxied request, read from /metrics:
    the request's own (usage and storage series move per flush, off the request path)."""
    def totals() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
        count = {"inc": 0.0, "observe": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name.startswith(("mcpgw_usage_", "mcpgw_storage_")):
                continue
            kind = {"counter": "inc", "histogram": "observe"}.get(family.type)
            suffix = "_total" if kind == "inc" else "_count"
            for sample in family.samples:
                if kind and sample.name.endswith(suffix):
                    count[kind] += sample.value
        return count

    before = totals()
    run_requests(requests)
    after = totals()
    # Less the first scrape's own request (one inc, one observe).
    return {kind: (after[kind] - before[kind] - 1) / requests for kind in after}


def cost_per_operation(multiprocess: bool) -> dict[str, float]:
    """Microseconds per inc / observe of a labelled series, in a fresh interpreter (the
    multi-process mode is process-wide)."""
    code = textwrap.dedent(f"""
        import json, sys, tempfile, timeit
        sys.path.insert(0, {str(ROOT)!r})
        from services.common import metrics as M
        if {multiprocess}:
            M.prepare_multiprocess(tempfile.mkdtemp())
        m = M.Metrics()
        n = 200000
        inc = timeit.timeit(lambda: m.inc("http_requests_total", route="mcp", status="200"), number=n)
        obs = timeit.timeit(lambda: m.observe("proxy_gateway_seconds", 0.0003, server="srv_a"), number=n)
        print(json.dumps({{"inc": inc / n * 1e6, "observe": obs / n * 1e6}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def storage_wrapper_cost(directory: Path) -> dict[str, float]:
    """Microseconds time_storage adds to one call: on a coroutine that does nothing (the
    wrapper alone), and a real SQLite get_server with and without it."""
    from services.common.metrics import Metrics, _timed, time_storage
    from storage import open_storage

    async def nothing(server_id: str) -> None:
        return None

    async def measure() -> dict[str, float]:
        metrics = Metrics()
        timed = _timed(nothing, "get_server", metrics)

        async def per_call(call, count: int) -> float:
            start = time.perf_counter()
            for _ in range(count):
                await call("srv_x")
            return (time.perf_counter() - start) / count * 1e6

        raw_storage = open_storage(f"sqlite:///{directory}/wrapper.db")
        await raw_storage.open()
        timed_storage = time_storage(open_storage(f"sqlite:///{directory}/wrapper.db"), metrics)
        await timed_storage.open()
        result = {"bare": min([await per_call(nothing, 200000) for _ in range(3)]),
                  "wrapped": min([await per_call(timed, 200000) for _ in range(3)]),
                  "sqlite": min([await per_call(raw_storage.get_server, 2000) for _ in range(3)]),
                  "sqlite_timed": min([await per_call(timed_storage.get_server, 2000) for _ in range(3)])}
        await raw_storage.close()
        await timed_storage.close()
        return result

    return asyncio.run(measure())


def sampled_share(pid: int, load, seconds: float) -> float | None:
    """Share of py-spy's samples of the gateway under load that are in metrics code (its own
    frames and prometheus_client's; a storage call awaited inside time_storage is not); None
    without py-spy (not a project dependency)."""
    py_spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
    if not Path(py_spy).exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        recorder = subprocess.Popen([py_spy, "record", "-o", out.name, "-f", "raw", "-r", "500",
                                     "-d", str(int(seconds)), "-p", str(pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        load(seconds)
        recorder.wait()
        total = inside = 0
        for entry in Path(out.name).read_text().splitlines():
            stack, _, count = entry.rpartition(" ")
            total += int(count)
            frames = stack.split(";")
            first = next((i for i, f in enumerate(frames) if "common/metrics.py" in f or "prometheus_client" in f),
                         None)
            if first is not None and "_timed.<locals>.timed" not in frames[first]:
                inside += int(count)
            elif first is not None and first + 1 < len(frames) and "prometheus_client" in frames[first + 1]:
                inside += int(count)  # the wrapper's own observe, not the storage call it awaits
    return inside / total if total else None


def line(label: str, value: str, target: str = "") -> None:
    print(f"  {label:<56} {value:<34} {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        upstream, upstream_port = minimal_upstream.start(tmp / "port")
        gw = None
        try:
            os.sched_setaffinity(upstream.pid, {1})
            os.sched_setaffinity(0, {1})
            (tmp / "shim").mkdir()
            gw = start_with_switch(GatewayProcess(tmp / "gw"), tmp / "shim")
            os.sched_setaffinity(gw.pid, {0})
            server_id = gw.add_server(f"http://127.0.0.1:{upstream_port}/mcp", "bench@example.com")
            token = bearer_token(gw, server_id)
            path = f"/mcp/{server_id}"
            asyncio.run(throughput(gw.port, path, token, 1.0))  # warm: caches, pool
            print(f"gateway pid {gw.pid} on core 0, its metrics switched on and off between runs; "
                  f"{args.rounds} rounds of {args.seconds:g} s, order alternating\n")
            states = {"metrics": signal.SIGUSR2, "no-op": signal.SIGUSR1}
            rounds, cpu_ratios, cpu, done = [], [], dict.fromkeys(states, 0.0), dict.fromkeys(states, 0)
            for number in range(args.rounds):
                order = list(states) if number % 2 == 0 else list(reversed(states))
                result, spent = {}, {}
                for name in order:
                    os.kill(gw.pid, states[name])
                    asyncio.run(throughput(gw.port, path, token, 0.2))  # the handler has run
                    counted = mcp_answers_counted(gw.port)
                    before = cpu_seconds(gw.pid)
                    result[name], count = asyncio.run(throughput(gw.port, path, token, args.seconds))
                    spent[name] = (cpu_seconds(gw.pid) - before) / count
                    cpu[name] += spent[name] * count
                    done[name] += count
                    moved = mcp_answers_counted(gw.port) - counted
                    assert moved == (count if name == "metrics" else 0), (name, moved, count)
                rounds.append(result)
                cpu_ratios.append(spent["metrics"] / spent["no-op"])
                print(f"  round {number + 1}: metrics {result['metrics']:,.0f} req/s, no-op {result['no-op']:,.0f} "
                      f"req/s, ratio {result['metrics'] / result['no-op']:.3f}; CPU per request "
                      f"{1e6 * spent['metrics']:.0f} / {1e6 * spent['no-op']:.0f} µs")
            ratios = [r["metrics"] / r["no-op"] for r in rounds]
            cpu_per_request = {name: cpu[name] / done[name] * 1e6 for name in states}
            os.kill(gw.pid, signal.SIGUSR2)

            def run_requests(count: int) -> None:
                async def go():
                    connection = Connection(gw.port, path, token)
                    for _ in range(count):
                        await connection.post()
                    connection.close()
                asyncio.run(go())

            ops = operations_per_request(gw.port, 500, run_requests)
            share = sampled_share(gw.pid, lambda seconds: asyncio.run(throughput(gw.port, path, token, seconds)),
                                  8.0)
        finally:
            if gw is not None:
                gw.stop()
            upstream.terminate()
            upstream.wait(10)

    memory, files = cost_per_operation(False), cost_per_operation(True)
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = storage_wrapper_cost(Path(tmp))
    rps = statistics.median(r["no-op"] for r in rounds)
    request_us = cpu_per_request["no-op"]
    print("\n1. throughput, 32 concurrent clients, one core (median of rounds)")
    line("no-op Metrics", f"{rps:,.0f} req/s = 1.000x")
    line("metrics", f"{statistics.median(r['metrics'] for r in rounds):,.0f} req/s = "
         f"{statistics.median(ratios):.3f}x", "(goal >= 0.97x)")
    line("ratio per round", " ".join(f"{x:.3f}" for x in ratios))
    line("gateway CPU per request: no-op / metrics",
         f"{cpu_per_request['no-op']:.0f} / {cpu_per_request['metrics']:.0f} µs = "
         f"{cpu_per_request['metrics'] / cpu_per_request['no-op'] - 1:+.1%}", "(goal <= +3 %)")
    line("CPU per request, metrics / no-op, median of rounds", f"{statistics.median(cpu_ratios) - 1:+.1%}")
    print("2. cost of the operations a proxied request makes")
    line("metric operations per proxied request: inc / observe", f"{ops['inc']:.1f} / {ops['observe']:.1f}")
    for label, cost in (("one worker (memory)", memory), ("multi-process (mmap files)", files)):
        per_request = ops["inc"] * cost["inc"] + ops["observe"] * cost["observe"]
        line(f"{label}: inc / observe", f"{cost['inc']:.2f} / {cost['observe']:.2f} µs")
        line(f"{label}: per request, share of {request_us:.0f} µs CPU", f"{per_request:.1f} µs = "
             f"{100 * per_request / request_us:.2f} %")
    line("py-spy: share of the gateway's samples in metrics code",
         "(py-spy not installed, or no samples)" if share is None else f"{share:.2%}")
    report_storage(wrapper)


def report_storage(wrapper: dict[str, float]) -> None:
    print("3. storage timing (time_storage), per storage call")
    line("a coroutine doing nothing: bare / timed", f"{wrapper['bare']:.2f} / {wrapper['wrapped']:.2f} µs "
         f"(+{wrapper['wrapped'] - wrapper['bare']:.2f} µs)")
    line("SQLite get_server: bare / timed", f"{wrapper['sqlite']:.1f} / {wrapper['sqlite_timed']:.1f} µs")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"\n({time.monotonic() - started:.0f} s)")
