"""MCPGW_WORKERS=N (issue 9), with real processes: N forked workers of one gateway share its
port and its SQLite file, so any worker serves any request (an authorization code, an MCP
session, refresh rotation and a grant removal each span the two workers); a worker killed
with SIGKILL is replaced while every request to the other worker succeeds; SIGTERM drains
every worker with calls in flight and the parent exits 0; a stuck worker is replaced.

Requests are put on a chosen worker by stopping the other one (SIGSTOP): the workers
accept from one shared listening socket, so a stopped worker takes no connection and a
fresh connection goes to the one left running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlencode

import httpx
import pytest
import tornado.web

from tests.support.browser import ScriptedBrowser
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import ROOT, GatewayProcess
from tests.support.tokens import REDIRECT, pkce, register_public_client

ALICE = {"sub": "alice-workers", "email": "alice.workers@example.com"}
BOB = {"sub": "bob-workers", "email": "bob.workers@example.com"}
LEGACY = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
SLOW_S = 1.5
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


# ---------------------------------------------------------------------------- helpers


def start_workers(gw: GatewayProcess, count: int = 2) -> list[int]:
    """Start `gw` with MCPGW_WORKERS=count; return the worker pids once all serve."""
    gw.env["MCPGW_WORKERS"] = str(count)
    gw.start()
    wait_for(lambda: f"{count} workers serving" in gw.log_text(), 30, "every worker to serve")
    pids = workers_of(gw)
    assert len(pids) == count, (pids, gw.log_text())
    return pids


def workers_of(gw: GatewayProcess) -> list[int]:
    """The gateway's live child processes (its workers; not a dead one not yet reaped), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == gw.pid and state != "Z":
                children.append(int(entry))
    return sorted(children)


def replaced(gw: GatewayProcess, gone: int) -> bool:
    """Two workers again, `gone` not among them (one look at /proc)."""
    pids = workers_of(gw)
    return len(pids) == 2 and gone not in pids


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def only(worker: int, workers: list[int]):
    """Every fresh connection goes to `worker`: the others are stopped meanwhile."""
    others = [pid for pid in workers if pid != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def resume(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def mcp(gw: GatewayProcess, server_id: str, token: str, message: dict, session: str | None = None):
    """One MCP POST on a fresh connection."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Accept": ACCEPT, "MCP-Protocol-Version": LEGACY}
    if session:
        headers["Mcp-Session-Id"] = session
    return httpx.post(f"{gw.listen_url}/mcp/{server_id}", content=json.dumps(message), headers=headers,
                      timeout=20, trust_env=False)


def answer(response: httpx.Response) -> dict:
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])
    return response.json()


def token_request(gw: GatewayProcess, form: dict) -> httpx.Response:
    return httpx.post(f"{gw.listen_url}/token", data=form, timeout=20, trust_env=False)


async def authorization_code(gw: GatewayProcess, client_id: str, who: dict, resource: str) -> tuple[str, str]:
    """Dev sign-in and consent through /authorize: (code, PKCE verifier)."""
    verifier, challenge = pkce()
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s",
             "code_challenge": challenge, "code_challenge_method": "S256", "resource": resource}
    async with ScriptedBrowser() as browser:
        result = await browser.authorize(f"{gw.url}/authorize?{urlencode(query)}", stop_at=REDIRECT,
                                         idp_login=who)
    return result["code"], verifier


def register(gw: GatewayProcess) -> str:
    async def run() -> str:
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
            return await register_public_client(http, "Workers")
    return asyncio.run(run())


def usage_count(gw: GatewayProcess) -> int:
    with sqlite3.connect(gw.state_dir / "gateway.db") as db:
        return db.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0]


# ------------------------------------------------------------------------------ tests


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
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers), 5,
                 "the workers to be gone")
        assert "SIGINT during the drain: killing 2 worker(s)" in gw.log_text()
        for sock in partial:
            sock.close()
    finally:
        gw.stop()


def sockets_of(pid: int) -> int:
    """Sockets the process holds open (an accepted connection adds one)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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


def test_workers_drain_when_the_supervisor_dies(tmp_path):
    """The supervisor killed with SIGKILL (no chance to stop anyone): its workers see their
    lifeline pipe close, drain and exit, instead of serving on unsupervised."""
    gw = GatewayProcess(tmp_path / "gw", extra_env={"TMPDIR": str(tmp_path)})  # the metrics directory stays
    try:
        workers = start_workers(gw)
        os.kill(gw.pid, signal.SIGKILL)
        gw._process.wait(10)
        wait_for(lambda: not any(_alive(pid) for pid in workers), 20, "the orphaned workers to exit")
        log = gw.log_text()
        assert log.count("the supervisor is gone: draining") == 2, log
        assert "Traceback" not in log, log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
    finally:
        gw.stop()
