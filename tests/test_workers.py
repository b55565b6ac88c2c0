"""MCPGW_WORKERS=N (issue 9), with real processes: N forked workers of one gateway share its
port and its SQLite file, so any worker serves any request (an authorization code, an MCP
session, refresh rotation and a grant removal each span the two workers); a worker killed
with SIGKILL is replaced while every request to the other worker succeeds; a stuck worker
is replaced; the setting. Stopping them: tests/test_workers_shutdown.py.

Requests are put on a chosen worker by stopping the other one (SIGSTOP): the workers
accept from one shared listening socket, so a stopped worker takes no connection and a
fresh connection goes to the one left running."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.gateway import ROOT, GatewayProcess
from tests.support.tokens import REDIRECT
from tests.support.workers import (
    ALICE,
    BOB,
    INITIALIZE,
    answer,
    authorization_code,
    mcp,
    only,
    register,
    replaced,
    resume,
    start_workers,
    token_request,
    usage_count,
    wait_for,
    workers_of,
)


def test_state_spans_workers(tmp_path, upstream):
    """Two workers on one SQLite file, each request pinned to one of them: a code issued by
    one is redeemed at the other; an MCP session started on one continues on the other; a
    refresh token rotated on one rotates again on the other, and replaying a spent one
    revokes the family for both; a grant removed through the CLI is refused by both."""
    gw = GatewayProcess(tmp_path / "gw")
    a = b = None
    try:
        a, b = start_workers(gw)
        server_id = gw.add_server(upstream.url, ALICE["email"])
        gw.cli("grants", "add", server_id, "--email", BOB["email"])
        resource = f"{gw.url}/mcp/{server_id}"
        client_id = register(gw)

        # Authorization codes are issued by B and redeemed at A.
        with only(b, [a, b]):
            codes = {who["sub"]: asyncio.run(authorization_code(gw, client_id, who, resource)) for who in (ALICE, BOB)}
        with only(a, [a, b]):
            issued = {}
            for sub, (code, verifier) in codes.items():
                response = token_request(gw, {"grant_type": "authorization_code", "code": code,
                                              "code_verifier": verifier, "redirect_uri": REDIRECT,
                                              "client_id": client_id})
                assert response.status_code == 200, response.text
                issued[sub] = response.json()
        alice, bob = issued[ALICE["sub"]], issued[BOB["sub"]]

        # An MCP session started on A continues on B.
        with only(a, [a, b]):
            started = mcp(gw, server_id, alice["access_token"], INITIALIZE)
            assert started.status_code == 200, started.text
            session = started.headers["mcp-session-id"]
            assert mcp(gw, server_id, alice["access_token"],
                       {"jsonrpc": "2.0", "method": "notifications/initialized"}, session).status_code == 202
            wait_for(lambda: usage_count(gw) >= 1, 10, "A's usage to be written")  # A holds no write
        with only(b, [a, b]):
            listed = mcp(gw, server_id, alice["access_token"], {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                         session)
            assert listed.status_code == 200, listed.text
            assert "echo" in {tool["name"] for tool in answer(listed)["result"]["tools"]}
            wait_for(lambda: usage_count(gw) >= 2, 10, "B's usage to be written")

        # Refresh rotation across workers; the replay of a spent token is caught by the other.
        refresh = {"grant_type": "refresh_token", "client_id": client_id}
        with only(b, [a, b]):
            first = token_request(gw, {**refresh, "refresh_token": alice["refresh_token"]})
            assert first.status_code == 200, first.text
        with only(a, [a, b]):
            second = token_request(gw, {**refresh, "refresh_token": first.json()["refresh_token"]})
            assert second.status_code == 200, second.text
            replay = token_request(gw, {**refresh, "refresh_token": alice["refresh_token"]})
            assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant", replay.text
        with only(b, [a, b]):
            revoked = token_request(gw, {**refresh, "refresh_token": second.json()["refresh_token"]})
            assert revoked.status_code == 400 and revoked.json()["error"] == "invalid_grant", revoked.text

        # Bob's grant: used on both (each caches it), removed, then refused by both.
        for expected, worker in ((3, a), (4, b)):
            with only(worker, [a, b]):
                assert mcp(gw, server_id, bob["access_token"], INITIALIZE).status_code == 200
                wait_for(lambda expected=expected: usage_count(gw) >= expected, 10, "the usage to be written")
        gw.cli("grants", "remove", server_id, "--email", BOB["email"])
        for worker in (b, a):
            with only(worker, [a, b]):
                wait_for(lambda: mcp(gw, server_id, bob["access_token"], INITIALIZE).status_code == 403, 15,
                         f"worker {worker} to refuse the removed grant")
        assert "Traceback" not in gw.log_text()
    finally:
        resume([pid for pid in (a, b) if pid])
        gw.stop()


def test_killed_worker_is_replaced_and_no_request_to_the_other_fails(tmp_path):
    """Clients call /readyz on fresh connections without pause. Worker A is stopped (so no
    new connection reaches it), then killed with SIGKILL: a replacement starts, the restart
    is counted and logged once, and every request made after A stopped succeeded (served
    by B, or the replacement)."""
    gw = GatewayProcess(tmp_path / "gw")
    a = b = None
    stop = False
    results: list[tuple[float, object]] = []

    def client() -> None:
        with httpx.Client(trust_env=False, timeout=20, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while not stop:
                started = time.monotonic()
                try:
                    outcome: object = http.get(f"{gw.listen_url}/readyz").status_code
                except httpx.HTTPError as exc:
                    outcome = repr(exc)
                results.append((started, outcome))

    try:
        a, b = start_workers(gw)
        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client) for _ in range(4)]
            try:
                time.sleep(0.5)
                os.kill(a, signal.SIGSTOP)
                stopped_at = time.monotonic()
                time.sleep(0.5)
                os.kill(a, signal.SIGKILL)
                wait_for(lambda: replaced(gw, a), 20, "a replacement worker")
                replacement = next(pid for pid in workers_of(gw) if pid != b)
                wait_for(lambda: "restarting it in" in gw.log_text(), 5, "the restart line")
                time.sleep(1.5)  # the replacement serves alongside B
            finally:
                stop = True  # or the clients would keep the pool from shutting down
            for future in clients:
                future.result(timeout=30)
        after = [outcome for started, outcome in results if started > stopped_at]
        failed = [outcome for outcome in after if outcome != 200]
        assert failed == [] and len(after) > 20, (failed[:5], len(after))
        log = gw.log_text()
        assert log.count("restarting it in") == 1, log
        assert f"(pid {a}) exited with signal SIGKILL" in log, log
        assert "Traceback" not in log, log
        # Counted, and summed over the workers by whichever answers /metrics.
        metrics = httpx.get(f"{gw.listen_url}/metrics", trust_env=False, timeout=10).text
        assert "mcpgw_workers_restarted_total 1.0" in metrics, metrics
        # The replacement serves: pinned to it, a request is answered.
        with only(replacement, [replacement, b]):
            assert httpx.get(f"{gw.listen_url}/readyz", trust_env=False, timeout=10).status_code == 200
    finally:
        stop = True
        resume([pid for pid in (a, b) if pid])
        gw.stop()


def test_stuck_worker_is_replaced(tmp_path):
    """With a watchdog (WATCHDOG_USEC=2 s) a worker whose loop stops (SIGSTOP) is killed and
    replaced by the supervisor, which keeps sending WATCHDOG=1 itself."""
    name = f"mcpgw-workers-dog-{os.getpid()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + name)
    gw = GatewayProcess(tmp_path / "gw", extra_env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
    try:
        a, b = start_workers(gw)
        os.kill(a, signal.SIGSTOP)
        wait_for(lambda: f"(pid {a}) sent no heartbeat" in gw.log_text(), 20, "the stuck worker to be noticed")
        wait_for(lambda: replaced(gw, a), 20, "a replacement")
        notify.settimeout(0)
        beats = 0
        while True:
            try:
                beats += "WATCHDOG=1" in notify.recv(4096).decode().split("\n")
            except BlockingIOError:
                break
        assert beats >= 2
        assert httpx.get(f"{gw.listen_url}/readyz", trust_env=False, timeout=10).status_code == 200
    finally:
        gw.stop()
        notify.close()


def test_one_worker_means_no_supervisor(tmp_path):
    """The default (MCPGW_WORKERS unset) serves from the one process: no child process."""
    gw = GatewayProcess(tmp_path / "gw").start()
    try:
        assert workers_of(gw) == []
    finally:
        gw.stop()


def test_worker_failing_at_start_stops_the_gateway(tmp_path):
    """Storage a worker cannot open: the worker says why, the parent stops every worker and
    exits 1 instead of restarting them in a loop."""
    (tmp_path / "a-file").write_text("not a directory")
    gw = GatewayProcess(tmp_path / "gw", extra_env={
        "MCPGW_WORKERS": "2", "MCPGW_STORAGE": f"sqlite:///{tmp_path}/a-file/gateway.db"})
    try:
        with pytest.raises(RuntimeError, match="gateway exited at start"):
            gw.start()
        assert gw._process.wait(10) == 1
        log = gw.log_text()
        assert "during start-up: stopping" in log and "is not usable" in log, log
        assert "Traceback" not in log and "restarting it" not in log, log
    finally:
        gw.stop()


@pytest.mark.parametrize("value", ["0", "many", "-1", "65"])
def test_bad_workers_value_is_one_line(tmp_path, value):
    gw = GatewayProcess(tmp_path / "gw")
    result = subprocess.run([sys.executable, str(ROOT / "gateway.py"), "serve"], cwd=ROOT,
                            env={**gw.env, "MCPGW_WORKERS": value}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"error: MCPGW_WORKERS: {value!r} is not a number of worker processes "
                             "(1 to 64) or auto\n"), result.stderr


def test_workers_setting():
    """Unset: 1 (no supervisor); a number; `auto`: the CPUs this process may run on."""
    from config import Config

    env = {"MCPGW_SECRET_KEY": "k" * 40}
    assert Config.from_env(env).workers == 1
    assert Config.from_env({**env, "MCPGW_WORKERS": "3"}).workers == 3
    assert Config.from_env({**env, "MCPGW_WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))
