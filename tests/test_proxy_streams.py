"""Streaming behaviour of the MCP proxy at /mcp/{serverId}, against one real gateway process
started with short stream timers (keep-alive 1 s, slow reader 2 s, upstream header
timeout 2 s), a real access token (real /authorize at the real OIDC provider process,
consent, /token) and small Tornado upstreams run in this module on their own thread:
keep-alive comments only between events, idle streams outliving every timeout, slow
readers cut off with bounded memory, upstream header timeout, upstream 401/403, an
upstream dying mid-stream, upstream session loss, and resume / session header hygiene."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import time
from dataclasses import dataclass, field

import httpx
import pytest
import tornado.iostream
import tornado.web

from tests.support.browser import ScriptedBrowser
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import access_token, register_public_client

KEEPALIVE_S, SLOW_READER_S, UPSTREAM_TIMEOUT_S = 1, 2, 2
GATEWAY_ENV = {
    "MCPGW_SSE_KEEPALIVE": str(KEEPALIVE_S),
    "MCPGW_SLOW_READER_TIMEOUT": str(SLOW_READER_S),
    "MCPGW_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT_S),
}
KEEPALIVE = b": keepalive\n\n"
ALICE = {"sub": "alice-streams", "email": "alice.streams@example.com", "email_verified": True, "name": "Alice"}
ACCEPT = "application/json, text/event-stream"
LEGACY = "2025-11-25"

# Upstream behaviours (the path of the in-test upstream), one gateway server each.
KINDS = ("idle", "quiet", "flood", "bigjson", "json2m", "hang-head", "s401", "s403", "die", "die-mid", "json", "sess",
         "resume", "json-cut", "json-cut-big")
SRV = {kind: "srv_streams_" + kind.replace("-", "_") for kind in KINDS}

EV_A = b'id: a-1\nevent: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"n":1}}\n\n'
EV_B = (b'id: b-2\nevent: message\ndata: {"jsonrpc":"2.0","method":"notifications/message",'
        b'"params":{"n":2,"pad":"' + b"x" * 300 + b'"}}\n\n')
EV_C = b'id: c-3\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"n":3}}\n\n'
B_SPLIT = len(EV_B) // 2  # EV_B is sent in two chunks, split in the middle of its data line

IDLE_BEFORE_B = 3.5  # idle after EV_A: about 3 keep-alives
PAUSE_INSIDE_B = 2.5  # between the two halves of EV_B: longer than the keep-alive interval
IDLE_AFTER_B = 1.6
QUIET_S = 8.0  # far longer than the upstream header timeout and the slow-reader timeout

FLOOD_EVENT = b"data: " + b"f" * (64 * 1024 - 8) + b"\n\n"  # 64 KiB per event
FLOOD_TOTAL = 200 * 1024 * 1024  # what the flooding upstreams try to push
BIG_RESULT = "y" * (2 * 1024 * 1024)  # a JSON (not SSE) answer well past the gateway's flush size

UPSTREAM_SID = "upstream-sid-" + secrets.token_hex(8)  # the upstream's own session ids
RESUME_SID = "upstream-resume-" + secrets.token_hex(8)
STRAY_SID = "upstream-stray-" + secrets.token_hex(8)


# --------------------------------------------------------------------- in-test upstream


class _UpstreamHandler(tornado.web.RequestHandler):
    """One behaviour per path (see KINDS); every request is recorded, closes are noted."""

    SUPPORTED_METHODS = ("GET", "POST", "DELETE")

    def initialize(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.kind = ""
        self._gone: asyncio.Future | None = None

    async def prepare(self) -> None:
        self._gone = asyncio.get_running_loop().create_future()

    async def pause(self, seconds: float) -> bool:
        """Sleep, waking early if the gateway closes the connection; True if still connected."""
        try:
            await asyncio.wait_for(asyncio.shield(self._gone), seconds)
            return False
        except TimeoutError:
            return True

    def body_json(self) -> dict:
        try:
            parsed = json.loads(self.request.body or b"null")
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def sse_headers(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")

    def json_result(self, result: dict | None = None) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"jsonrpc": "2.0", "id": self.body_json().get("id"), "result": result or {}}))

    async def send(self, data: bytes, mark: str | None = None) -> None:
        self.write(data)
        await self.flush()
        if mark:
            self.upstream.mark(mark)

    def drop_connection(self) -> None:
        """Die: close the TCP connection in the middle of the (chunked) body."""
        self.upstream.mark(f"died:{self.kind}")
        self.request.connection.stream.close()
        self._finished = True  # nothing more can be sent; keep Tornado from trying

    async def post(self, kind: str) -> None:
        self.kind = kind
        self.upstream.record(kind, self.request)
        up = self.upstream
        try:
            if kind == "idle":
                self.sse_headers()
                await self.send(EV_A, "idle:a")
                if await self.pause(IDLE_BEFORE_B):
                    await self.send(EV_B[:B_SPLIT], "idle:b1")
                    if await self.pause(PAUSE_INSIDE_B):
                        await self.send(EV_B[B_SPLIT:], "idle:b2")
                        await self.pause(IDLE_AFTER_B)
                self.finish()
            elif kind == "quiet":
                self.sse_headers()
                await self.send(EV_A, "quiet:a")
                if await self.pause(QUIET_S):
                    await self.send(EV_C, "quiet:c")
                self.finish()
                up.mark("quiet:done")
            elif kind == "flood":
                self.sse_headers()
                await self.send(b"")
                up.mark("flood:start")
                while up.pushed < FLOOD_TOTAL:
                    self.write(FLOOD_EVENT)
                    await self.flush()  # resolves once the gateway's socket took the bytes
                    up.pushed += len(FLOOD_EVENT)
                self.finish()
                up.mark("flood:all-pushed")
            elif kind == "bigjson":  # the same flood as one huge JSON body
                self.set_header("Content-Type", "application/json")
                self.set_header("Content-Length", str(FLOOD_TOTAL))
                up.mark("bigjson:start")
                while up.pushed < FLOOD_TOTAL:
                    self.write(b" " * len(FLOOD_EVENT))
                    await self.flush()
                    up.pushed += len(FLOOD_EVENT)
                self.finish()
                up.mark("bigjson:all-pushed")
            elif kind == "json2m":
                self.json_result({"big": BIG_RESULT})
            elif kind == "hang-head":
                up.event("arrived", kind).set()
                await self.pause(30)  # accept, never answer
            elif kind in ("s401", "s403"):
                self.set_status(401 if kind == "s401" else 403)
                self.set_header("WWW-Authenticate", 'Bearer realm="upstream", error="invalid_token", '
                                'resource_metadata="http://upstream.example/prm"')
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps({"error": "invalid_token", "error_description": "upstream-secret-detail"}))
            elif kind in ("die", "die-mid"):
                self.sse_headers()
                await self.send(EV_A if kind == "die" else EV_A + EV_B[:B_SPLIT])
                await asyncio.sleep(0.3)
                self.drop_connection()
            elif kind == "json":
                self.json_result({"ok": True})
            elif kind == "json-cut":  # promises 1000 bytes of JSON, sends 10, dies
                self.set_header("Content-Type", "application/json")
                self.set_header("Content-Length", "1000")
                await self.send(b'{"jsonrpc"')
                await asyncio.sleep(0.2)
                self.drop_connection()
            elif kind == "json-cut-big":  # promises 2 MiB, dies past the gateway's flush size
                self.set_header("Content-Type", "application/json")
                self.set_header("Content-Length", str(len(BIG_RESULT)))
                await self.send(BIG_RESULT[: len(BIG_RESULT) // 2].encode())
                await asyncio.sleep(0.2)
                self.drop_connection()
            elif kind == "sess":
                message = self.body_json()
                if message.get("method") == "initialize":
                    self.set_header("Mcp-Session-Id", UPSTREAM_SID)
                    self.json_result({"protocolVersion": LEGACY, "capabilities": {}, "serverInfo": {"name": "s"}})
                else:  # the upstream forgot every session (restart, expiry)
                    self.set_status(404)
                    self.set_header("Content-Type", "application/json")
                    self.finish(json.dumps({"jsonrpc": "2.0", "id": message.get("id"),
                                            "error": {"code": -32001, "message": "Session not found"}}))
            elif kind == "resume":
                message = self.body_json()
                if self.request.method == "POST" and message.get("method") == "initialize":
                    self.set_header("Mcp-Session-Id", RESUME_SID)
                    self.json_result({"protocolVersion": LEGACY, "capabilities": {}, "serverInfo": {"name": "r"}})
                elif self.request.method == "POST":
                    self.set_header("Mcp-Session-Id", STRAY_SID)  # a confused upstream
                    self.json_result({"ok": True})
                else:  # GET: the resumed stream, replaying after Last-Event-ID
                    self.sse_headers()
                    self.set_header("Mcp-Session-Id", RESUME_SID)
                    await self.send(EV_C)
                    self.finish()
            else:
                self.send_error(404)
        except tornado.iostream.StreamClosedError:
            up.mark(f"write-failed:{kind}")

    get = post
    delete = post

    def on_connection_close(self) -> None:
        self.upstream.mark(f"closed:{self.kind}")
        self.upstream.event("closed", self.kind).set()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)


async def _access_token(gw: GatewayProcess) -> str:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Proxy streams")
        async with ScriptedBrowser() as browser:
            return await access_token(gw.url, http, browser, client_id, ALICE)


# -------------------------------------------------------------------------- fixtures


@dataclass
class Rig:
    gw: GatewayProcess
    fake: FakeUpstream
    token: str
    http: httpx.Client = field(repr=False)

    @property
    def pid(self) -> int:
        return self.gw._process.pid

    def metric(self, name: str, **labels: str) -> float:
        text = self.http.get("/metrics").text
        label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        labelled = rf"\{{{re.escape(label_text)}\}}" if labels else ""
        match = re.search(rf"^mcpgw_{name}{labelled} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def rig(idp, tmp_path_factory):
    fake = FakeUpstream(_UpstreamHandler, "fake-upstream-streams").start()
    gw = GatewayProcess(tmp_path_factory.mktemp("proxy-streams"), idp=idp, extra_env=GATEWAY_ENV)
    gw.use_idp_client(idp)
    gw.start()
    try:
        for kind, server_id in SRV.items():
            gw.add_server(f"{fake.url}/{kind}", ALICE["email"], f"Streams {kind}", "--id", server_id)
        token = asyncio.run(_access_token(gw))
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as http:
            yield Rig(gw, fake, token, http)
    finally:
        gw.stop()
        fake.stop()


# ---------------------------------------------------------------------- helpers




INITIALIZE = rpc("initialize", 1, protocolVersion=LEGACY, capabilities={},
                 clientInfo={"name": "proxy-streams", "version": "1"})


def headers_for(token: str, **extra: str) -> dict[str, str]:
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", "MCP-Protocol-Version": LEGACY,
               "Authorization": f"Bearer {token}"}
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


def post(rig: Rig, kind: str, message: dict, **extra: str) -> httpx.Response:
    return rig.http.post(f"/mcp/{SRV[kind]}", content=json.dumps(message), headers=headers_for(rig.token, **extra))


def jsonrpc_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["jsonrpc"] == "2.0" and isinstance(body["error"]["message"], str), body
    return body


def timed_stream(rig: Rig, kind: str, message: dict) -> tuple[httpx.Response, list[tuple[float, bytes]]]:
    """POST and read an SSE response as it arrives: [(arrival time, bytes)], in order."""
    pieces: list[tuple[float, bytes]] = []
    with rig.http.stream("POST", f"/mcp/{SRV[kind]}", content=json.dumps(message),
                         headers=headers_for(rig.token)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():  # raises if the response does not end cleanly
            pieces.append((time.monotonic(), chunk))
    return response, pieces


def keepalive_times(pieces: list[tuple[float, bytes]]) -> list[float]:
    return [at for at, chunk in pieces for _ in range(chunk.count(KEEPALIVE))]


def arrival_of(pieces: list[tuple[float, bytes]], needle: bytes) -> float:
    """When the last byte of `needle` (first occurrence in the whole body) arrived."""
    body = b""
    for at, chunk in pieces:
        body += chunk
        if needle in body:
            return at
    raise AssertionError(f"{needle[:40]!r}… never arrived")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------ 1. keep-alive between events


def test_idle_stream_gets_keepalives_at_the_interval_but_never_inside_an_event(rig):
    _, pieces = timed_stream(rig, "idle", rpc("tools/call", 1, name="slow"))
    body = b"".join(chunk for _, chunk in pieces)
    marks = rig.fake.marks

    # The events arrive whole and byte for byte; only keep-alive comments are added.
    assert body.startswith(EV_A), body[:200]
    assert EV_B in body, "the event sent in two chunks did not arrive contiguous"
    assert body.replace(KEEPALIVE, b"") == EV_A + EV_B, body.replace(KEEPALIVE, b"")[:500]
    a_at, b_at = arrival_of(pieces, EV_A), arrival_of(pieces, EV_B)

    # While idle after EV_A (3.5 s): a keep-alive about every second.
    idle = [t for t in keepalive_times(pieces) if a_at < t < marks["idle:b1"]]
    assert 2 <= len(idle) <= 4, [round(t - a_at, 2) for t in idle]
    assert 0.5 <= idle[0] - a_at <= 3.0, idle[0] - a_at
    gaps = [later - earlier for earlier, later in zip(idle, idle[1:], strict=False)]
    assert all(0.5 <= gap <= 3.0 for gap in gaps), gaps

    # While EV_B is half sent (2.5 s, more than two intervals): nothing at all.
    assert b_at - marks["idle:b1"] >= PAUSE_INSIDE_B - 0.3
    inside = [t for t in keepalive_times(pieces) if marks["idle:b1"] + 0.2 < t < b_at]
    assert inside == [], [round(t - marks["idle:b1"], 2) for t in inside]
    # ...and keep-alives resume once the event is complete.
    after = [t for t in keepalive_times(pieces) if t > b_at]
    assert 1 <= len(after) <= 2, after


# ------------------------------------------------------------------- 2. long idle stream


def test_a_stream_idle_longer_than_every_timeout_is_not_killed(rig):
    started = time.monotonic()
    _, pieces = timed_stream(rig, "quiet", rpc("tools/call", 2, name="quiet"))
    body = b"".join(chunk for _, chunk in pieces)
    assert time.monotonic() - started >= QUIET_S
    assert body.replace(KEEPALIVE, b"") == EV_A + EV_C  # the late event came through, then a clean end
    assert arrival_of(pieces, EV_C) - arrival_of(pieces, EV_A) >= QUIET_S - 0.3
    assert len(keepalive_times(pieces)) >= QUIET_S / KEEPALIVE_S - 2
    assert "quiet:done" in rig.fake.marks and "closed:quiet" not in rig.fake.marks


# -------------------------------------------------------------------- 3. slow reader


@pytest.mark.parametrize("kind", ["flood", "bigjson"])
def test_a_client_that_stops_reading_is_cut_off_with_bounded_memory(rig, kind):
    """flood: an SSE stream of 64 KiB events; bigjson: one 200 MB JSON body."""
    rig.fake.pushed = 0
    before_metric = rig.metric("streams_closed_total", reason="slow_reader")
    baseline = rss_bytes(rig.pid)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a small window, never drained
    client.settimeout(10)
    client.connect(("127.0.0.1", rig.gw.port))
    try:
        if kind == "flood":
            request = (f"GET /mcp/{SRV[kind]} HTTP/1.1\r\nHost: 127.0.0.1:{rig.gw.port}\r\n"
                       f"Authorization: Bearer {rig.token}\r\nAccept: text/event-stream\r\n"
                       f"MCP-Protocol-Version: {LEGACY}\r\n\r\n").encode()
        else:
            body = json.dumps(rpc("resources/list", 31)).encode()
            request = (f"POST /mcp/{SRV[kind]} HTTP/1.1\r\nHost: 127.0.0.1:{rig.gw.port}\r\n"
                       f"Authorization: Bearer {rig.token}\r\nAccept: {ACCEPT}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                       f"MCP-Protocol-Version: {LEGACY}\r\n\r\n").encode() + body
        client.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = client.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:300]
        stopped_reading = time.monotonic()
        # From here on the client reads nothing while the upstream pushes as fast as it can.
        closed = rig.fake.event("closed", kind)
        peak = baseline
        while not closed.is_set() and time.monotonic() - stopped_reading < 20:
            peak = max(peak, rss_bytes(rig.pid))
            time.sleep(0.05)
        cut_after = time.monotonic() - stopped_reading
        peak = max(peak, rss_bytes(rig.pid))
    finally:
        client.close()

    assert closed.is_set(), f"the upstream stayed connected 20 s (pushed {rig.fake.pushed} bytes)"
    assert cut_after < SLOW_READER_S + 6, cut_after
    assert f"{kind}:all-pushed" not in rig.fake.marks
    # Back-pressure: the upstream got only socket buffers' worth through, not 200 MB...
    assert 0 < rig.fake.pushed < 64 * 1024 * 1024, rig.fake.pushed
    # ...and the gateway's memory did not follow what the upstream offered.
    assert peak - baseline < 64 * 1024 * 1024, (baseline, peak)
    assert rig.metric("streams_closed_total", reason="slow_reader") == before_metric + 1
    # The gateway goes on serving; a small JSON answer keeps its Content-Length, a large
    # one arrives whole through the streamed path.
    small = post(rig, "json", rpc("resources/list", 3))
    assert small.status_code == 200 and small.headers["content-length"] == str(len(small.content))
    large = post(rig, "json2m", rpc("resources/list", 4))
    assert large.status_code == 200 and large.json() == {"jsonrpc": "2.0", "id": 4, "result": {"big": BIG_RESULT}}


# --------------------------------------------------------------- 4. upstream header timeout


def test_upstream_silent_before_headers_is_a_504_after_the_timeout(rig):
    started = time.monotonic()
    response = post(rig, "hang-head", rpc("resources/list", 44))
    elapsed = time.monotonic() - started
    body = jsonrpc_error(response, 504)
    assert body["id"] == 44 and body["error"]["code"] == -32603
    assert UPSTREAM_TIMEOUT_S - 0.2 <= elapsed <= UPSTREAM_TIMEOUT_S + 2.5, elapsed
    assert rig.fake.event("arrived", "hang-head").is_set()
    assert rig.fake.event("closed", "hang-head").wait(5), "the gateway left the silent upstream connection open"


# ----------------------------------------------------------------- 5. upstream 401/403


@pytest.mark.parametrize("kind", ["s401", "s403"])
@pytest.mark.parametrize("verb", ["POST", "GET"])
def test_upstream_refusing_the_gateway_is_a_502_without_its_challenge(rig, kind, verb):
    content = json.dumps(rpc("resources/list", 55)) if verb == "POST" else None
    response = rig.http.request(verb, f"/mcp/{SRV[kind]}", content=content, headers=headers_for(rig.token))
    body = jsonrpc_error(response, 502)
    assert body["error"]["code"] == -32603
    if verb == "POST":
        assert body["id"] == 55
    assert "www-authenticate" not in response.headers
    assert "upstream-secret-detail" not in response.text and "upstream.example" not in response.text
    assert rig.fake.of(kind), "the request never reached the upstream"


# ------------------------------------------------------------- 6. upstream dies mid-stream


@pytest.mark.parametrize("kind", ["die", "die-mid"])
def test_upstream_dying_mid_stream_ends_the_client_stream_cleanly(rig, kind):
    before = rig.metric("streams_closed_total", reason="upstream_broke")
    started = time.monotonic()
    _, pieces = timed_stream(rig, kind, rpc("tools/call", 6, name="die"))  # iter_raw: a clean end
    assert time.monotonic() - started < 5
    body = b"".join(chunk for _, chunk in pieces)
    # Only the complete event: no half event (die-mid) is ever relayed.
    assert body.replace(KEEPALIVE, b"") == EV_A, body
    assert rig.metric("streams_closed_total", reason="upstream_broke") == before + 1
    # The gateway keeps serving the next request.
    listed = post(rig, "json", rpc("resources/list", 7))
    assert listed.status_code == 200 and listed.json()["result"] == {"ok": True}
    assert rig.gw._process.poll() is None


def test_upstream_dying_inside_a_held_back_json_answer_is_a_502(rig):
    """Issue 7, finding 14: nothing of a small JSON body had gone out, so the client gets a
    whole answer, a JSON-RPC error, never a closed connection."""
    body = jsonrpc_error(post(rig, "json-cut", rpc("resources/list", 8)), 502)
    assert body == {"jsonrpc": "2.0", "id": 8,
                    "error": {"code": -32603, "message": "the upstream MCP server broke off its answer"}}
    assert post(rig, "json", rpc("resources/list", 9)).status_code == 200


def test_upstream_dying_inside_a_streamed_json_answer_never_looks_complete(rig):
    """Past the flush size bytes went out: a cut-off body must not arrive as a complete
    response of the shorter length, so the connection is closed."""
    with pytest.raises(httpx.HTTPError):
        response = post(rig, "json-cut-big", rpc("resources/list", 10))
        # Reaching here would mean a complete-looking (and so wrong) answer.
        raise AssertionError(f"got a complete response: {response.status_code} {response.content[:200]!r}")
    assert post(rig, "json", rpc("resources/list", 11)).status_code == 200


# --------------------------------------------------------- 7. upstream forgets a session


def test_upstream_404_drops_the_gateway_session(rig):
    initialized = post(rig, "sess", INITIALIZE)
    assert initialized.status_code == 200, initialized.text
    session = initialized.headers["mcp-session-id"]
    assert session.startswith("mcpgw-") and UPSTREAM_SID not in session

    arrived = len(rig.fake.of("sess"))
    lost = post(rig, "sess", rpc("resources/list", 71), Mcp_Session_Id=session)
    assert lost.status_code == 404, (lost.status_code, lost.text)
    assert len(rig.fake.of("sess")) == arrived + 1
    assert rig.fake.of("sess")[-1]["headers"]["mcp-session-id"] == [UPSTREAM_SID]

    # The mapping is gone: the same gateway session id is refused at the gateway.
    again = post(rig, "sess", rpc("resources/list", 72), Mcp_Session_Id=session)
    assert jsonrpc_error(again, 404)["id"] == 72
    assert "session" in again.json()["error"]["message"]
    stream = rig.http.get(f"/mcp/{SRV['sess']}", headers=headers_for(rig.token, Mcp_Session_Id=session))
    assert stream.status_code == 404
    assert len(rig.fake.of("sess")) == arrived + 1, "a dropped session still reached the upstream"


# ------------------------------------------------------------- 8. resume and session ids


def test_resume_headers_reach_the_upstream_and_its_session_id_never_reaches_the_client(rig):
    initialized = post(rig, "resume", INITIALIZE)
    assert initialized.status_code == 200, initialized.text
    session = initialized.headers["mcp-session-id"]
    assert session.startswith("mcpgw-")
    assert RESUME_SID not in json.dumps(list(initialized.headers.multi_items()))

    with rig.http.stream("GET", f"/mcp/{SRV['resume']}", headers={
        "Authorization": f"Bearer {rig.token}", "Accept": "text/event-stream",
        "Mcp-Session-Id": session, "Last-Event-ID": "b-2", "MCP-Protocol-Version": LEGACY,
    }) as resumed:
        assert resumed.status_code == 200
        body = resumed.read()
    assert body.replace(KEEPALIVE, b"") == EV_C
    assert resumed.headers.get_list("mcp-session-id") == [session]
    assert RESUME_SID not in json.dumps(list(resumed.headers.multi_items()))

    arrived = rig.fake.of("resume")[-1]
    assert arrived["method"] == "GET"
    assert arrived["headers"]["last-event-id"] == ["b-2"]
    assert arrived["headers"]["mcp-protocol-version"] == [LEGACY]
    assert arrived["headers"]["mcp-session-id"] == [RESUME_SID]
    assert "authorization" not in arrived["headers"]

    # An upstream that hands out a session id on an ordinary call: the client never sees it.
    stray = post(rig, "resume", rpc("resources/list", 81))
    assert stray.status_code == 200, stray.text
    assert "mcp-session-id" not in stray.headers
    assert STRAY_SID not in json.dumps(list(stray.headers.multi_items()))


# ------------------------------------------------------------------------- metrics
# Last in the file: it cuts a "quiet" stream short, which earlier tests assert never happens.


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_metrics_count_requests_and_open_streams(rig):
    before = rig.metric("http_requests_total", route="mcp", status="200")
    assert rig.metric("sse_streams_open") == 0
    seen_open = []
    with rig.http.stream("POST", f"/mcp/{SRV['quiet']}", content=json.dumps(rpc("tools/call", 12, name="quiet")),
                         headers=headers_for(rig.token)) as response:
        for _ in response.iter_raw():
            seen_open.append(rig.metric("sse_streams_open"))
            break  # the stream is up: one open stream while we hold it
    assert seen_open == [1]
    assert wait_until(lambda: rig.metric("sse_streams_open") == 0, 10)
    assert rig.metric("http_requests_total", route="mcp", status="200") == before + 1
