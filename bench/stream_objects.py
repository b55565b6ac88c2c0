"""Python objects an idle SSE stream holds in the gateway (tracemalloc), by source line.

A gateway process runs under tracemalloc (a wrapper script starts gateway.py with it and
dumps a snapshot on SIGUSR1); this process opens N idle streams through it to the minimal
upstream (the client side stays here, out of the count) and compares the snapshots taken
before and after. Figures: bench/README.md, "Proxy hot path against the floor".

Run: .venv/bin/python bench/stream_objects.py [--streams 1000] [--top 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_upstream  # noqa: E402
from bench.proxy import bearer_token, open_stream  # noqa: E402
from tests.support import gateway as support  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402

# Started as "gateway.py" of a directory of its own (GatewayProcess runs ROOT/gateway.py).
WRAPPER = """import runpy, signal, sys, tracemalloc
sys.path.insert(0, {root!r})
if sys.argv[1:2] == ["serve"]:
    tracemalloc.start(4)
    def dump(signum, frame, count=[0]):
        tracemalloc.take_snapshot().dump({out!r} + str(count[0]))
        count[0] += 1
    signal.signal(signal.SIGUSR1, dump)
sys.argv[0] = {gateway!r}
runpy.run_path({gateway!r}, run_name="__main__")
"""


def snapshot(pid: int, path: Path) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not path.exists() or path.stat().st_size == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("no snapshot from the gateway")
        time.sleep(0.2)
    time.sleep(1)  # written whole
    return tracemalloc.Snapshot.load(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        wrapper = tmp_path / "wrapper"
        wrapper.mkdir()
        (wrapper / "gateway.py").write_text(WRAPPER.format(root=str(ROOT), out=str(tmp_path / "snap"),
                                                           gateway=str(ROOT / "gateway.py")))
        upstream, port = minimal_upstream.start(tmp_path / "port")
        support.ROOT, saved = wrapper, support.ROOT
        gateway = None
        try:
            gateway = GatewayProcess(tmp_path / "gw").start()
            server_id = gateway.add_server(f"http://127.0.0.1:{port}/mcp", "bench@example.com")
            token = bearer_token(gateway, server_id)
            path = f"/mcp/{server_id}"

            async def measure() -> tuple[tracemalloc.Snapshot, tracemalloc.Snapshot]:
                warm = [await open_stream(gateway.port, path, token) for _ in range(50)]
                for _, writer in warm:
                    writer.close()
                await asyncio.sleep(1)
                before = snapshot(gateway.pid, tmp_path / "snap0")
                streams = []
                for _ in range(0, args.streams, 100):
                    streams += await asyncio.gather(*(open_stream(gateway.port, path, token) for _ in range(100)))
                await asyncio.sleep(2)
                after = snapshot(gateway.pid, tmp_path / "snap1")
                for _, writer in streams:
                    writer.close()
                return before, after

            before, after = asyncio.run(measure())
        finally:
            support.ROOT = saved
            if gateway is not None:
                gateway.stop()
            upstream.terminate()
            upstream.wait(10)
    count = len(range(0, args.streams, 100)) * 100
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"{count} idle streams: {total / count / 1024:.1f} KiB of Python objects per stream (gateway side)")
    for stat in after.compare_to(before, "lineno")[:args.top]:
        frame = stat.traceback[0]
        where = str(frame).replace(str(ROOT) + "/", "")
        print(f"  {stat.size_diff / count:7.0f} B  {stat.count_diff / count:5.1f} objects  {where}")


if __name__ == "__main__":
    main()
