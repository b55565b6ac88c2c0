"""Drain benchmark (issue 9): how long SIGTERM takes with N standalone GET streams open.
Not part of the test run.

One gateway process (dev sign-in, SQLite, the bench's minimal upstream) holds N idle SSE
streams opened through it; then SIGTERM. Measured from the signal: until every client saw a
clean end of stream (chunked terminator, never a reset), and until the process exited (0).
The baseline of the same run is the time the same process takes to exit on SIGTERM with no
stream open, so the figure is the cost of the streams, not of the machine.
Run: .venv/bin/python bench/drain.py [--streams 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_upstream  # noqa: E402
from bench.proxy import bearer_token, open_stream  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402


async def clean_end(reader) -> bool:
    """True when the stream ends with the chunked terminator (a normal end), False on a reset."""
    try:
        rest = await reader.read()
    except ConnectionError:
        return False
    return rest.endswith(b"0\r\n\r\n") or rest == b""


async def one_round(tmp: Path, number: int, upstream_port: int, streams: int) -> tuple[float, float, float, int]:
    gateway = GatewayProcess(tmp / f"gw{number}", nofile=streams * 2 + 512).start()
    try:
        server_id = gateway.add_server(f"http://127.0.0.1:{upstream_port}/mcp", "bench@example.com")
        token = bearer_token(gateway, server_id)
        path = f"/mcp/{server_id}"
        opened = []
        for start in range(0, streams, 100):  # in batches: the listen backlog is finite
            opened += await asyncio.gather(*(open_stream(gateway.port, path, token)
                                             for _ in range(min(100, streams - start))))
        process = gateway._process
        signalled = time.perf_counter()
        os.kill(process.pid, signal.SIGTERM)
        ends = await asyncio.gather(*(clean_end(reader) for reader, _ in opened))
        streams_ended = time.perf_counter() - signalled
        while process.poll() is None:
            await asyncio.sleep(0.005)
        exited = time.perf_counter() - signalled
        for _, writer in opened:
            writer.close()
        assert process.returncode == 0, gateway.log_text()[-2000:]
        return streams_ended, exited, sum(ends), process.returncode
    finally:
        gateway.stop()


async def empty_exit(tmp: Path, number: int) -> float:
    gateway = GatewayProcess(tmp / f"empty{number}").start()
    try:
        process = gateway._process
        signalled = time.perf_counter()
        os.kill(process.pid, signal.SIGTERM)
        while process.poll() is None:
            await asyncio.sleep(0.005)
        return time.perf_counter() - signalled
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the client ends
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        upstream, upstream_port = minimal_upstream.start(tmp / "port")
        try:
            results, empties = [], []
            for number in range(args.rounds):
                empties.append(asyncio.run(empty_exit(tmp, number)))
                results.append(asyncio.run(one_round(tmp, number, upstream_port, args.streams)))
                ended, exited, clean, _ = results[-1]
                print(f"round {number + 1}: {args.streams} streams: all ended in {ended:.3f} s "
                      f"({clean} clean ends), exit 0 after {exited:.3f} s; no streams: exit after "
                      f"{empties[-1]:.3f} s")
            print(f"\nmedians: streams ended {statistics.median(r[0] for r in results):.3f} s, "
                  f"exit {statistics.median(r[1] for r in results):.3f} s, "
                  f"exit with no stream {statistics.median(empties):.3f} s (baseline), "
                  f"ratio {statistics.median(r[1] for r in results) / statistics.median(empties):.2f}x")
        finally:
            upstream.terminate()
            upstream.wait(10)


if __name__ == "__main__":
    main()
