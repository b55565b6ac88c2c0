"""Graceful drain on SIGTERM (issue 9), against real gateway processes sharing one SQLite
file, a real access token (dev sign-in, consent, /token) and a slow in-test upstream:
calls in flight complete with their real result while /readyz says 503, new connections
are refused, idle keep-alive connections close, a standalone GET stream ends with a clean
end of stream, queued usage reaches storage, the process exits 0; a call longer than
MCPGW_DRAIN_TIMEOUT is cut at it; a second signal exits at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import tornado.web

from tests.support.browser import ScriptedBrowser
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import access_token, register_public_client

SLOW_S = 1.5  # how long the slow upstream takes to answer
LONG_S = 8.0  # longer than the short drain timeout of the cut test
QUICK_S = 0.3  # the upstream of the rolling-restart test
OWNER = {"sub": "drain-owner", "email": "drain.owner@example.com"}
ACCEPT = "application/json, text/event-stream"
LEGACY = "2025-11-25"
KINDS = ("slowjson", "slowsse", "long", "stream", "json")
SRV = {kind: f"srv_drain_{kind}" for kind in KINDS}
EVENT = b'id: s-1\nevent: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"n":1}}\n\n'


class _Upstream(tornado.web.RequestHandler):
    """slowjson / slowsse: the tool's result after SLOW_S (JSON, or SSE with a progress
    event first); long: after LONG_S; json: after QUICK_S; GET stream: one event, then
    open until closed."""

    SUPPORTED_METHODS = ("GET", "POST", "DELETE")

    def initialize(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self._gone = asyncio.get_running_loop().create_future()

    def on_connection_close(self) -> None:
        if not self._gone.done():
            self._gone.set_result(None)

    async def post(self, kind: str) -> None:
        self.upstream.record(kind, self.request)
        message = json.loads(self.request.body)
        result = json.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": {
            "content": [{"type": "text", "text": f"done {message['params']['name']}"}]}})
        if kind == "slowsse":
            self.set_header("Content-Type", "text/event-stream")
            self.write(b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}\n\n')
            await self.flush()
            await asyncio.sleep(SLOW_S)
            self.write(f"event: message\ndata: {result}\n\n".encode())
            self.finish()
            return
        await asyncio.sleep({"long": LONG_S, "json": QUICK_S}.get(kind, SLOW_S))
        if not self._gone.done():
            self.set_header("Content-Type", "application/json")
            self.finish(result)

    async def get(self, kind: str) -> None:
        self.upstream.record(kind, self.request)
        self.set_header("Content-Type", "text/event-stream")
        self.write(EVENT)
        await self.flush()
        try:
            await asyncio.wait_for(asyncio.shield(self._gone), 60)
        except TimeoutError:
            pass
        self.upstream.mark("stream:closed")
        self._finished = True


@dataclass
class Rig:
    base: GatewayProcess  # stopped: its storage (servers, keys, grants) is shared
    fake: FakeUpstream
    token: str

    def gateway(self, drain_timeout: int) -> GatewayProcess:
        return GatewayProcess(self.base.state_dir, share_storage_with=self.base,
                              extra_env={"MCPGW_DRAIN_TIMEOUT": str(drain_timeout)}).start()


async def _token(gw: GatewayProcess) -> str:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Drain")
        async with ScriptedBrowser() as browser:
            return await access_token(gw.url, http, browser, client_id, OWNER)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    fake = FakeUpstream(_Upstream, "fake-upstream-drain").start()
    base = GatewayProcess(tmp_path_factory.mktemp("drain")).start()
    try:
        for kind, server_id in SRV.items():
            base.add_server(f"{fake.url}/{kind}", OWNER["email"], f"Drain {kind}", "--id", server_id)
        token = asyncio.run(_token(base))
    finally:
        base.stop()
    yield Rig(base, fake, token)
    fake.stop()


# ---------------------------------------------------------------------------- helpers


def headers(token: str, accept: str = ACCEPT) -> dict[str, str]:
    return {"Accept": accept, "Content-Type": "application/json", "MCP-Protocol-Version": LEGACY,
            "Authorization": f"Bearer {token}"}


def call(gw: GatewayProcess | int, token: str, kind: str, name: str, rid: int) -> httpx.Response:
    """One tools/call on its own connection (to a gateway or a port); the whole answer read."""
    base = f"http://127.0.0.1:{gw}" if isinstance(gw, int) else gw.listen_url
    with httpx.Client(trust_env=False, timeout=30) as http:
        return http.post(f"{base}/mcp/{SRV[kind]}", headers=headers(token),
                         content=json.dumps(rpc("tools/call", rid, name=name, arguments={})))


def result_text(response: httpx.Response, rid: int) -> str:
    """The text of the tool's result, from a JSON or an SSE answer."""
    if response.headers["content-type"].startswith("text/event-stream"):
        messages = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    else:
        messages = [response.json()]
    answers = [m for m in messages if m.get("id") == rid and "result" in m]
    assert len(answers) == 1, response.text
    return answers[0]["result"]["content"][0]["text"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_exit(gw: GatewayProcess, timeout: float) -> int:
    return gw._process.wait(timeout)


def raw_request(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(data)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (a Connection: close answer)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def usage_rows(gw: GatewayProcess, prefix: str) -> list[tuple[str, str]]:
    with sqlite3.connect(gw.state_dir / "gateway.db") as db:
        return db.execute("SELECT target, outcome FROM usage_events WHERE target LIKE ? ORDER BY target",
                          (prefix + "%",)).fetchall()


def requests_seen(fake: FakeUpstream, *kinds: str) -> int:
    return sum(len(fake.of(kind)) for kind in kinds)


# ------------------------------------------------------------------------------ tests


def test_sigterm_lets_calls_in_flight_complete(rig):
    """N slow calls (JSON and SSE answers) in flight at SIGTERM all complete with their real
    result; meanwhile /readyz says 503, a new connection is refused (or answered 503), an
    idle keep-alive connection is closed; exit 0, no traceback, usage in storage."""
    gw = rig.gateway(drain_timeout=20)
    try:
        seen_before = requests_seen(rig.fake, "slowjson", "slowsse")
        n = 8
        calls = [("slowjson" if i % 2 else "slowsse", f"drain-inflight-{i}", 100 + i) for i in range(n)]
        idle = raw_request(gw.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200"), "keep-alive /healthz"
        partial = raw_request(gw.port, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(call, gw, rig.token, kind, name, rid) for kind, name, rid in calls]
            wait_for(lambda: requests_seen(rig.fake, "slowjson", "slowsse") - seen_before == n, 10,
                     "the calls to reach the upstream")
            signalled = time.monotonic()
            os.kill(gw.pid, signal.SIGTERM)
            wait_for(lambda: "draining:" in gw.log_text(), 5, "the drain to begin")

            # /readyz on a connection that was mid-request: 503 at once, connection closed after.
            partial.sendall(b"\r\n")
            answer = read_response(partial)
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"not ready: draining" in answer and b"Connection: close" in answer, answer
            # A new connection: refused (or, at worst, answered 503).
            try:
                late = raw_request(gw.port, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            except ConnectionRefusedError:
                pass
            else:
                reply = read_response(late)
                assert reply == b"" or reply.startswith(b"HTTP/1.1 503"), reply
            # The idle keep-alive connection was closed (end of stream, nothing sent).
            idle.settimeout(3)
            assert idle.recv(65536) == b""
            responses = [future.result(timeout=30) for future in futures]
        finished = time.monotonic()
        for (_, name, rid), response in zip(calls, responses, strict=True):
            assert response.status_code == 200, response.text
            assert result_text(response, rid) == f"done {name}"
        assert finished - signalled < 10
        assert wait_exit(gw, 15) == 0
        log = gw.log_text()
        assert "Traceback" not in log, log
        assert f"draining: {n} request(s) in flight, 1 idle connection(s) closed" in log, log
        assert ", 0 cut at the 20 s limit" in log, log
        rows = usage_rows(gw, "drain-inflight-")
        assert sorted(rows) == sorted((name, "ok") for _, name, _ in calls), rows
    finally:
        gw.stop()


def test_standalone_get_stream_ends_cleanly(rig):
    """A standalone GET stream open at SIGTERM ends at once with a normal end of stream
    (chunked terminator: no reset, no incomplete read) while a slow call still completes."""
    gw = rig.gateway(drain_timeout=20)
    try:
        url = f"{gw.listen_url}/mcp/{SRV['stream']}"
        with ThreadPoolExecutor(1) as pool, httpx.Client(trust_env=False, timeout=30) as http:
            with http.stream("GET", url, headers=headers(rig.token, "text/event-stream")) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                body = b""
                chunks = response.iter_raw()
                while EVENT not in body:
                    body += next(chunks)
                seen = requests_seen(rig.fake, "slowjson")
                slow = pool.submit(call, gw, rig.token, "slowjson", "drain-beside-stream", 7)
                wait_for(lambda: requests_seen(rig.fake, "slowjson") > seen, 10, "the slow call")
                signalled = time.monotonic()
                os.kill(gw.pid, signal.SIGTERM)
                for chunk in chunks:  # raises RemoteProtocolError if the stream does not end cleanly
                    body += chunk
                ended = time.monotonic()
            assert ended - signalled < SLOW_S, "the stream ended at once, not with the drain"
            assert body.startswith(EVENT)
            wait_for(lambda: "stream:closed" in rig.fake.marks, 5, "the upstream stream to be closed")
            reply = slow.result(timeout=30)
            assert reply.status_code == 200 and result_text(reply, 7) == "done drain-beside-stream"
        assert wait_exit(gw, 15) == 0
        assert "Traceback" not in gw.log_text()
    finally:
        gw.stop()


def test_call_longer_than_drain_timeout_is_cut(rig):
    """MCPGW_DRAIN_TIMEOUT=1: a call still running a second after SIGTERM is cut (the
    client sees the connection close, no answer) and the process still exits 0."""
    gw = rig.gateway(drain_timeout=1)
    try:
        seen = requests_seen(rig.fake, "long")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call, gw, rig.token, "long", "drain-cut", 9)
            wait_for(lambda: requests_seen(rig.fake, "long") > seen, 10, "the long call")
            signalled = time.monotonic()
            os.kill(gw.pid, signal.SIGTERM)
            with pytest.raises(httpx.TransportError):
                future.result(timeout=30)
            cut_after = time.monotonic() - signalled
        assert 0.8 < cut_after < LONG_S - 2, cut_after
        assert wait_exit(gw, 10) == 0
        log = gw.log_text()
        assert "Traceback" not in log, log
        assert "draining: 1 request(s) in flight" in log and ", 1 cut at the 1 s limit" in log, log
    finally:
        gw.stop()


def test_second_signal_exits_at_once(rig):
    """SIGTERM starts a 30 s drain; SIGINT during it ends the process at once (128 + 2)."""
    gw = rig.gateway(drain_timeout=30)
    try:
        seen = requests_seen(rig.fake, "long")
        done = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call, gw, rig.token, "long", "drain-second-signal", 11)
            wait_for(lambda: requests_seen(rig.fake, "long") > seen, 10, "the long call")
            os.kill(gw.pid, signal.SIGTERM)
            wait_for(lambda: "draining:" in gw.log_text(), 5, "the drain to begin")
            assert gw._process.poll() is None, "still draining"
            signalled = time.monotonic()
            os.kill(gw.pid, signal.SIGINT)
            assert wait_exit(gw, 3) == 128 + signal.SIGINT
            assert time.monotonic() - signalled < 2
            done.set()
            with pytest.raises(httpx.TransportError):
                future.result(timeout=30)
        assert "SIGINT during the drain: exiting at once" in gw.log_text()
    finally:
        gw.stop()


def test_rolling_restart_of_two_instances_loses_no_call(rig):
    """Two gateways on one SQLite file, clients calling both without pause and retrying a
    refused connection on the other; each gateway in turn gets SIGTERM and is started
    again on its port: not one call fails, and every call's usage is in storage."""
    instances = [rig.gateway(drain_timeout=20), rig.gateway(drain_timeout=20)]
    ports = [gw.port for gw in instances]
    stop = threading.Event()
    lock = threading.Lock()
    completed: list[str] = []
    failures: list[tuple[str, str]] = []
    refused = [0]

    def client(worker: int) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            name, rid = f"drain-roll-{worker}-{number}", worker * 100000 + number
            order = ports if (worker + number) % 2 else ports[::-1]
            for attempt in range(100):
                try:
                    response = call(order[attempt % 2], rig.token, "json", name, rid)
                except httpx.ConnectError:  # refused: that instance is draining or starting
                    with lock:
                        refused[0] += 1
                    time.sleep(0.05 * (attempt % 2))
                    continue
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append((name, repr(exc)))
                    break
                ok = response.status_code == 200 and result_text(response, rid) == f"done {name}"
                with lock:
                    (completed.append(name) if ok else failures.append((name, response.text)))
                break
            else:
                with lock:
                    failures.append((name, "no instance answered"))

    try:
        with ThreadPoolExecutor(6) as pool:
            workers = [pool.submit(client, worker) for worker in range(6)]
            try:
                time.sleep(1.5)
                for index in (0, 1):
                    old = instances[index]
                    os.kill(old.pid, signal.SIGTERM)
                    assert wait_exit(old, 25) == 0
                    assert "Traceback" not in old.log_text()
                    old.stop()
                    instances[index] = GatewayProcess(
                        rig.base.state_dir, share_storage_with=rig.base, port=old.port,
                        extra_env={"MCPGW_DRAIN_TIMEOUT": "20"}).start()
                    time.sleep(1.5)
            finally:
                stop.set()  # or the clients would keep the pool from shutting down
            for worker in workers:
                worker.result(timeout=60)
        print(f"rolling restart: {len(completed)} calls completed, {len(failures)} failed, "
              f"{refused[0]} refused connections retried on the other instance")
        assert failures == [], failures[:5]
        assert len(completed) >= 40, len(completed)
        assert refused[0] > 0, "the restarts were not noticed: the test proves nothing"
    finally:
        stop.set()
        for gw in instances:
            if gw._process is not None:
                os.kill(gw.pid, signal.SIGTERM)
                assert wait_exit(gw, 25) == 0
            gw.stop()
    rows = usage_rows(instances[0], "drain-roll-")
    assert sorted(name for name, _ in rows) == sorted(completed)


def test_drain_waits_for_handler_work_after_the_response():
    """A handler that goes on after its response is out (as the proxy does to record the
    call's usage) finishes before drain() returns, so the services do not stop under it."""
    from tornado.netutil import bind_sockets

    from handlers.admission import AdmissionHTTPServer

    done: list[str] = []

    class AfterResponse(tornado.web.RequestHandler):
        async def get(self) -> None:
            await self.finish("answered")
            await asyncio.sleep(0.3)  # work after the response: the client has its answer
            done.append("recorded")

    async def scenario() -> None:
        server = AdmissionHTTPServer(tornado.web.Application([(r"/", AfterResponse)]), max_connections=10)
        sockets = bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            response = await http.get(f"http://127.0.0.1:{port}/")
        assert response.text == "answered" and done == []
        await server.drain(5)
        assert done == ["recorded"]

    asyncio.run(scenario())
