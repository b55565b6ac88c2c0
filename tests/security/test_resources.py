"""Resource exhaustion from the outside (issue 7, findings 7 and 8), against a real gateway
process on loopback: memory stays flat under a stream of bad unauthenticated requests, and
running out of file descriptors answers 503 instead of spinning the accept loop."""

from __future__ import annotations

import http.client
import os
import time
from pathlib import Path

from tests.support.gateway import GatewayProcess

TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def hammer(port: int, path: str, count: int, deadline: float) -> int:
    """`count` GETs of `path` on one keep-alive connection; how many were answered 400."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    refused = 0
    try:
        for _ in range(count):
            assert time.monotonic() < deadline, "the request loop ran out of time"
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            refused += response.status == 400
    finally:
        conn.close()
    return refused


# ----------------------------------------------------------------- finding 7: memory


def test_unknown_consent_requests_keep_memory_flat(tmp_path):
    """GET /authorize/consent?req=x once raised one module-level exception object, whose
    traceback (and every frame on it) grew with each raise: ~6.6 MB per 1,000 requests."""
    gateway = GatewayProcess(tmp_path / "gw").start()
    try:
        deadline = time.monotonic() + 120
        path = "/authorize/consent?req=x"
        assert hammer(gateway.port, path, 1000, deadline) == 1000  # warm-up: caches, allocator
        before = rss_mb(gateway.pid)
        assert hammer(gateway.port, path, 10_000, deadline) == 10_000
        growth = rss_mb(gateway.pid) - before
        assert growth < 8, f"RSS grew {growth:.1f} MB over 10,000 unknown consent requests"
        assert "Traceback" not in gateway.log_text()
    finally:
        gateway.stop()
