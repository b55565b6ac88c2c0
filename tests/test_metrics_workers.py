"""Metrics across processes (issue 9): prometheus_client's multi-process mode as the worker
supervisor uses it (forked workers, one dead), and a real gateway with MCPGW_WORKERS=2."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client import CONTENT_TYPE_LATEST

from services.common.metrics import Metrics, prepare_multiprocess, worker_exited
from tests.support.gateway import GatewayProcess
from tests.test_metrics import check_histograms, families, sample
from tests.test_workers import only, resume, start_workers, wait_for, workers_of

ROOT = Path(__file__).resolve().parent.parent


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _worker(index: int, commands: int, answers: int) -> None:
    """A forked worker: records its share, then renders /metrics whenever asked."""
    metrics = Metrics()
    metrics.inc("http_requests_total", index + 1, route="mcp", status="200")
    for _ in range(index + 1):
        metrics.observe("proxy_upstream_ttfb_seconds", 0.002, server="srv_a")
    metrics.gauge_add("sse_streams_open", 3)
    metrics.gauge_set("usage_queue_depth", 10 * (index + 1))
    os.write(answers, b"k")
    while os.read(commands, 1) == b"r":
        body = metrics.render()[0]
        os.write(answers, struct.pack("!I", len(body)) + body)


def multiprocess_scenario(directory: str) -> None:
    """Run in a fresh interpreter (prepare_multiprocess is process-wide): a parent and two
    forked workers, as the supervisor runs them; prints what each worker's /metrics shows."""
    prepare_multiprocess(directory)
    Metrics().inc("workers_restarted_total")
    workers = []
    for index in (0, 1):
        commands_r, commands_w = os.pipe()
        answers_r, answers_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _worker(index, commands_r, answers_w)
            finally:
                os._exit(0)
        workers.append((pid, commands_w, answers_r))
    for _, _, answers in workers:
        assert _read_exactly(answers, 1) == b"k"

    def render(worker) -> str:
        os.write(worker[1], b"r")
        size = struct.unpack("!I", _read_exactly(worker[2], 4))[0]
        return _read_exactly(worker[2], size).decode()

    shown = {"from_0": render(workers[0]), "from_1": render(workers[1])}
    os.kill(workers[1][0], signal.SIGKILL)  # no goodbye: the supervisor notices and reports it
    os.waitpid(workers[1][0], 0)
    worker_exited(workers[1][0])
    shown["after_1_died"] = render(workers[0])
    os.write(workers[0][1], b"q")
    os.waitpid(workers[0][0], 0)
    print(json.dumps(shown))


def test_multiprocess_mode_renders_every_worker_and_forgets_dead_workers_gauges(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    code = f"from tests.test_metrics_workers import multiprocess_scenario; multiprocess_scenario({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    shown = {name: families(text) for name, text in json.loads(result.stdout.splitlines()[-1]).items()}
    for name in ("from_0", "from_1", "after_1_died"):  # either worker shows the sum of all
        found = shown[name]
        assert sample(found, "http_requests_total", route="mcp", status="200") == 3, name
        assert sample(found, "proxy_upstream_ttfb_seconds", "_count", server="srv_a") == 3, name
        assert sample(found, "proxy_upstream_ttfb_seconds", "_bucket", server="srv_a", le="0.0025") == 3, name
        assert sample(found, "workers_restarted_total") == 1, name  # the parent's own count
        assert check_histograms(found) == 1
    for name in ("from_0", "from_1"):
        assert sample(shown[name], "sse_streams_open") == 6
        assert sample(shown[name], "usage_queue_depth") == 30
    # A dead worker's streams and queue are gone; its requests still happened.
    assert sample(shown["after_1_died"], "sse_streams_open") == 3
    assert sample(shown["after_1_died"], "usage_queue_depth") == 10
    assert {p.name.split("_")[0] for p in tmp_path.glob("*.db")} == {"counter", "gauge", "histogram"}


def test_workers_mode_any_worker_renders_the_sum_and_a_dead_workers_counts_stay(tmp_path):
    """MCPGW_WORKERS=2: requests pinned to each worker in turn (the other one stopped), then
    /metrics asked of each: both show every request; a worker killed with SIGKILL and
    replaced takes none of its counts away."""
    gw = GatewayProcess(tmp_path / "gw")
    a = b = None
    discovery = "/.well-known/oauth-authorization-server"

    def get(path: str) -> httpx.Response:
        return httpx.get(gw.listen_url + path, trust_env=False, timeout=20)

    def discovery_count() -> float:
        response = get("/metrics")
        assert response.headers["content-type"] == CONTENT_TYPE_LATEST
        found = families(response.text)
        check_histograms(found)
        return sample(found, "http_requests_total", route="discovery", status="200")

    try:
        a, b = start_workers(gw)
        for worker, count in ((a, 5), (b, 7)):
            with only(worker, [a, b]):
                assert all(get(discovery).status_code == 200 for _ in range(count))
                # A worker counts a request just after its answer went out: one more request
                # on the same worker (one event loop) is served only once that is done.
                assert get("/healthz").status_code == 200
        for worker in (a, b):
            with only(worker, [a, b]):
                assert discovery_count() == 12
        os.kill(a, signal.SIGKILL)
        replacements: list[int] = []

        def replaced() -> bool:
            replacements[:] = [pid for pid in workers_of(gw) if pid not in (a, b)]
            return bool(replacements)

        wait_for(replaced, 20, "a replacement worker")
        with only(replacements[0], [replacements[0], b]):
            assert wait_for_value(discovery_count, 12), gw.log_text()
            assert sample(families(get("/metrics").text), "workers_restarted_total") == 1, gw.log_text()
    finally:
        resume([pid for pid in (a, b) if pid])
        gw.stop()


def wait_for_value(read, expected: float, timeout: float = 20.0) -> bool:
    """The replacement answers once it serves; until then the request waits in the backlog."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if read() == expected:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return read() == expected
