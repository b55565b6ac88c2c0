"""Resource exhaustion from the outside (issue 7, findings 7 and 8), against a real gateway
process on loopback: memory stays flat under a stream of bad unauthenticated requests, and
running out of file descriptors answers 503 instead of spinning the accept loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import logging
import os
import selectors
import socket
import time
from pathlib import Path

import httpx
import pytest
import tornado.web
from tornado.netutil import bind_sockets

from handlers.admission import AdmissionHTTPServer
from tests.support.browser import ScriptedBrowser
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayProcess
from tests.support.tokens import access_token, register_public_client

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


# -------------------------------------------------- finding 8: out of file descriptors

NOFILE = 128  # the gateway's descriptor limit (soft and hard) in this test
HELD = 200  # client connections opened and held: well past what 128 descriptors allow


def answers(socks: list[socket.socket], within: float) -> dict[socket.socket, bytes]:
    """What each socket received up to its first line break, if it answered (or closed:
    then possibly b"") within `within` seconds."""
    found: dict[socket.socket, bytes] = {}
    buffers = {sock: b"" for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within
        while buffers.keys() - found.keys() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                buffers[sock] += chunk
                if chunk and b"\r\n\r\n" not in buffers[sock]:
                    continue
                found[sock] = buffers[sock]
                selector.unregister(sock)
    return found


def status(head: bytes) -> int | None:
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None


def exhaust(gateway: GatewayProcess, request: bytes) -> None:
    """Hold HELD connections sending `request`, then check the gateway under exhaustion:
    each one answered (served, or refused with a 503 it can act on), the process idle, a
    line or two of log, and service back once they are closed."""
    held: list[socket.socket] = []
    try:
        for _ in range(HELD):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            sock.sendall(request)
            held.append(sock)
        heads = answers(held, within=10)
        codes = [status(head) for head in heads.values()]
        served, refused = codes.count(200), codes.count(503)
        # Every connection got an answer: served (and held open) or refused.
        assert served + refused == HELD, (
            f"{served} served, {refused} refused, {HELD - len(heads)} unanswered, "
            f"{codes.count(None)} closed without an answer, other: {set(codes) - {200, 503, None}}"
        )
        assert 0 < served < NOFILE // 2 and refused > 0
        refusal = next(head for head in heads.values() if status(head) == 503).lower()
        assert b"retry-after: " in refusal and b"connection: close" in refusal, refusal

        # Exhausted, the gateway idles: no accept loop spinning on the listening socket.
        window = 3.0
        cpu = cpu_seconds(gateway.pid)
        time.sleep(window)
        cpu = cpu_seconds(gateway.pid) - cpu
        assert cpu < 0.3 * window, f"the gateway used {cpu / window:.0%} of a core while at capacity"

        log = gateway.log_text()
        assert "Traceback" not in log and "Too many open files" not in log
        reports = [line for line in log.splitlines() if "capacity" in line or "descriptors" in line]
        assert 1 <= len(reports) <= 3, reports

        for sock in held:
            sock.close()
        held.clear()
        # The freed slots serve again.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert httpx.get(gateway.url + "/healthz", timeout=2).status_code == 200
                break
            except (httpx.HTTPError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()


def test_descriptor_exhaustion_answers_503_and_does_not_spin(tmp_path):
    """Past the descriptor limit the gateway once answered nothing, spun its accept loop at
    a full core and logged a traceback per attempt. Now: a connection cap below the limit,
    503 + Retry-After beyond it, one log line per interval, and service resumes."""
    gateway = GatewayProcess(tmp_path / "gw", nofile=NOFILE).start()
    try:
        exhaust(gateway, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n\r\n".encode())
    finally:
        gateway.stop()


def test_max_connections_setting_lowers_the_cap(tmp_path):
    """MCPGW_MAX_CONNECTIONS below the derived cap is the cap; the connections beyond are
    answered 503 at once, and the start-up banner says what applies."""
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"MCPGW_MAX_CONNECTIONS": "5"}).start()
    held: list[socket.socket] = []
    try:
        request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n\r\n".encode()
        time.sleep(0.5)  # start()'s own /healthz connection counts until the gateway sees it closed
        for _ in range(8):
            held.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
            held[-1].sendall(request)
        codes = sorted(status(head) for head in answers(held, within=10).values())
        assert codes == [200] * 5 + [503] * 3, codes
        assert "at most 5 at once" in gateway.log_text()
    finally:
        for sock in held:
            sock.close()
        gateway.stop()


class HoldingUpstream(tornado.web.RequestHandler):
    """An upstream MCP server whose GET stream sends one comment and stays open."""

    def initialize(self, upstream: FakeUpstream) -> None:
        self.gone: asyncio.Future | None = None

    async def get(self, kind: str) -> None:
        self.gone = asyncio.get_running_loop().create_future()
        self.set_header("Content-Type", "text/event-stream")
        self.write(b": open\n\n")
        await self.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gone, 60)

    def on_connection_close(self) -> None:
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)


def test_proxied_streams_stay_within_the_descriptor_limit(idp, tmp_path):
    """The finding as seen: SSE streams past the limit. Each one holds an upstream
    connection too, and the cap leaves room for both: the admitted streams all reach
    their upstream (no 502 for want of a descriptor), the rest are answered 503."""
    fake = FakeUpstream(HoldingUpstream, "fake-upstream-holding").start()
    gateway = GatewayProcess(tmp_path / "gw", idp=idp, nofile=NOFILE)
    gateway.use_idp_client(idp)
    gateway.start()
    try:
        server_id = gateway.add_server(f"{fake.url}/hold", STREAMER["email"], "Holding")
        token = asyncio.run(_access_token(gateway))
        exhaust(gateway, (
            f"GET /mcp/{server_id} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n"
            "MCP-Protocol-Version: 2025-11-25\r\n\r\n"
        ).encode())
    finally:
        gateway.stop()
        fake.stop()


STREAMER = {"sub": "streamer-resources", "email": "streamer@example.com", "email_verified": True, "name": "S"}


async def _access_token(gateway: GatewayProcess) -> str:
    async with httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Resources")
        async with ScriptedBrowser() as browser:
            return await access_token(gateway.url, http, browser, client_id, STREAMER)


class OutOfDescriptors:
    """A listening socket whose accept() fails with EMFILE until `failing` is cleared: the
    process out of descriptors for a reason other than client connections (the cap keeps
    those below the limit), which the accept loop must wait out without spinning."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.failing = True
        self.calls = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self):
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish("hello")


@pytest.mark.gen_test(timeout=20)
async def test_accept_backs_off_while_out_of_descriptors(caplog):
    """EMFILE on accept pauses accepting with a growing back-off (a handful of attempts in
    two seconds, not one per loop iteration), is logged once, and accepting resumes."""
    caplog.set_level(logging.INFO, logger="gateway.admission")
    server = AdmissionHTTPServer(tornado.web.Application([("/", Hello)]), max_connections=10)
    [sock] = bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    listening = OutOfDescriptors(sock)
    server.add_sockets([listening])
    client = socket.create_connection(sock.getsockname(), timeout=5)  # waits in the backlog
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(2)
        assert 2 <= listening.calls <= 8, f"{listening.calls} accept attempts in 2 s"
        messages = [r.getMessage() for r in caplog.records if r.name == "gateway.admission"]
        assert len(messages) == 1 and "out of file descriptors" in messages[0], messages

        listening.failing = False  # descriptors freed: the waiting connection is served
        client.setblocking(False)
        data = b""
        for _ in range(100):
            await asyncio.sleep(0.05)
            try:
                data += client.recv(4096)
            except BlockingIOError:
                continue
            if data.endswith(b"hello"):
                break
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello"), data
    finally:
        client.close()
        server.stop()
