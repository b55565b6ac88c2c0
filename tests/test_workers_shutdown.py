"""MCPGW_WORKERS=N stopping (issue 9), with real processes: SIGTERM drains every worker
with calls in flight and the parent exits 0; a second signal kills them at once; workers
whose supervisor died drain and exit. Requests are pinned to a worker as in test_workers.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import tornado.web

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayProcess
from tests.support.tokens import REDIRECT, register_public_client
from tests.support.workers import (
    ALICE,
    alive,
    answer,
    authorization_code,
    mcp,
    only,
    resume,
    sockets_of,
    start_workers,
    wait_for,
)

SLOW_S = 1.5


class _Slow(tornado.web.RequestHandler):
    """A tool that answers after SLOW_S seconds."""

    def initialize(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    async def post(self, kind: str) -> None:
        self.upstream.record(kind, self.request)
        message = json.loads(self.request.body)
        await asyncio.sleep(SLOW_S)
        self.set_header("Content-Type", "application/json")
        self.finish({"jsonrpc": "2.0", "id": message.get("id"), "result": {
            "content": [{"type": "text", "text": f"done {message['params']['name']}"}]}})


def test_sigterm_drains_every_worker_with_calls_in_flight(tmp_path):
    """A slow call in flight on each worker at SIGTERM: both complete with their result,
    both workers log their drain, the usage is stored, the parent exits 0 and the port is
    closed afterwards; READY=1 reached the notify socket once, after both workers served,
    and STOPPING=1 at the signal."""
    fake = FakeUpstream(_Slow, "fake-upstream-workers").start()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"\0mcpgw-workers-{os.getpid()}")
    gw = GatewayProcess(tmp_path / "gw", extra_env={"NOTIFY_SOCKET": f"@mcpgw-workers-{os.getpid()}",
                                                    "MCPGW_DRAIN_TIMEOUT": "20"})
    a = b = None
    try:
        server_id = gw.add_server(f"{fake.url}/slow", ALICE["email"], "Slow", "--id", "srv_workers_slow")
        a, b = start_workers(gw)
        token = asyncio.run(_token(gw, f"{gw.url}/mcp/{server_id}"))
        calls = {}
        with ThreadPoolExecutor(2) as pool:
            for number, worker in enumerate((a, b)):
                seen = len(fake.of("slow"))
                with only(worker, [a, b]):
                    calls[worker] = pool.submit(
                        mcp, gw, server_id, token,
                        {"jsonrpc": "2.0", "id": 10 + number, "method": "tools/call",
                         "params": {"name": f"workers-drain-{number}", "arguments": {}}})
                    wait_for(lambda seen=seen: len(fake.of("slow")) > seen, 10, "the call to reach the upstream")
            os.kill(gw.pid, signal.SIGTERM)
            for number, worker in enumerate((a, b)):
                response = calls[worker].result(timeout=30)
                assert response.status_code == 200, response.text
                assert answer(response)["result"]["content"][0]["text"] == f"done workers-drain-{number}"
        assert gw._process.wait(30) == 0
        log = gw.log_text()
        assert log.count("draining: 1 request(s) in flight") == 2, log
        assert log.count("1 request(s) completed, 0 cut") == 2, log
        assert "all 2 workers stopped" in log and "Traceback" not in log, log
        with sqlite3.connect(gw.state_dir / "gateway.db") as db:
            targets = {row[0] for row in db.execute("SELECT target FROM usage_events")}
        assert {"workers-drain-0", "workers-drain-1"} <= targets, targets
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
        notify.settimeout(0)
        messages = []
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except BlockingIOError:
                break
        ready = [m for m in messages if "READY=1" in m.split("\n")]
        assert len(ready) == 1 and f"listening on 127.0.0.1:{gw.port} (2 workers)" in ready[0], messages
        assert any("STOPPING=1" in m.split("\n") for m in messages), messages
    finally:
        resume([pid for pid in (a, b) if pid])
        gw.stop()
        notify.close()
        fake.stop()


async def _token(gw: GatewayProcess, resource: str) -> str:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Workers drain")
        code, verifier = await authorization_code(gw, client_id, ALICE, resource)
        response = await http.post("/token", data={
            "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
            "redirect_uri": REDIRECT, "client_id": client_id})
        assert response.status_code == 200, response.text
        return response.json()["access_token"]


def test_second_signal_kills_workers_at_once(tmp_path):
    """SIGTERM starts the drain; SIGINT during it ends the parent at once (128 + 2) and
    leaves no worker behind."""
    gw = GatewayProcess(tmp_path / "gw", extra_env={"MCPGW_DRAIN_TIMEOUT": "30"})
    try:
        workers = start_workers(gw)
        # A request whose head never ends keeps each worker's drain waiting (30 s).
        partial = []
        for worker in workers:
            with only(worker, workers):
                before = sockets_of(worker)
                partial.append(socket.create_connection(("127.0.0.1", gw.port)))
                partial[-1].sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                wait_for(lambda worker=worker, before=before: sockets_of(worker) > before, 10,
                         "the pinned worker to accept")
        os.kill(gw.pid, signal.SIGTERM)
        wait_for(lambda: "SIGTERM: draining 2 worker(s)" in gw.log_text(), 5, "the drain")
        os.kill(gw.pid, signal.SIGINT)
        assert gw._process.wait(5) == 128 + signal.SIGINT
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and alive(pid) for pid in workers), 5,
                 "the workers to be gone")
        assert "SIGINT during the drain: killing 2 worker(s)" in gw.log_text()
        for sock in partial:
            sock.close()
    finally:
        gw.stop()


def test_workers_drain_when_the_supervisor_dies(tmp_path):
    """The supervisor killed with SIGKILL (no chance to stop anyone): its workers see their
    lifeline pipe close, drain and exit, instead of serving on unsupervised."""
    gw = GatewayProcess(tmp_path / "gw", extra_env={"TMPDIR": str(tmp_path)})  # the metrics directory stays
    try:
        workers = start_workers(gw)
        os.kill(gw.pid, signal.SIGKILL)
        gw._process.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in workers), 20, "the orphaned workers to exit")
        log = gw.log_text()
        assert log.count("the supervisor is gone: draining") == 2, log
        assert "Traceback" not in log, log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
    finally:
        gw.stop()
