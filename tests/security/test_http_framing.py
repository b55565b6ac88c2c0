"""The gateway's HTTP/1.1 server layer attacked over raw loopback sockets: smuggling, oversized
heads and bodies, pipelining, keep-alive, 100-continue, garbage, idle timeouts, handler failures."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import select
import socket
import time
from dataclasses import dataclass

import pytest
import tornado.web
from tornado.netutil import bind_sockets

from handlers.admission import AdmissionHTTPServer
from tests.support.gateway import GatewayProcess

HOST = "127.0.0.1"
MAX_BODY = 4 * 1024 * 1024  # serving.py's max_body_size
CLOSE_DEADLINE = 5.0  # seconds: generous bound for a close owed after a 0.5 s idle timeout


# ------------------------------------------------------------------- a raw client


class Closed(Exception):
    """The server closed the connection before a whole response arrived."""


@dataclass
class Response:
    version: str
    status: int
    headers: dict[str, list[str]]  # lower-case names
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None


class RawClient:
    """One client connection on a plain socket: send bytes, read whole responses, see the close."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """False if the server had closed (a server may cut a request it refused)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _recv(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if not self._recv():
                raise Closed(self.buf)
        line, self.buf = self.buf[:end], self.buf[end + 2:]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._recv():
                raise Closed(self.buf)
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def _chunked(self) -> bytes:
        body = b""
        while size := int(self._line().split(b";")[0], 16):
            body += self._exactly(size)
            assert self._line() == b"", "chunk data not followed by CRLF"
        while self._line():  # trailer fields
            pass
        return body

    def read_response(self, method: str = "GET") -> Response:
        """One response: status line, header fields, body by Content-Length, chunked or close."""
        version, status, *_ = self._line().decode("latin-1").split(" ", 2)
        headers: dict[str, list[str]] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        code = int(status)
        response = Response(version, code, headers, b"")
        if method == "HEAD" or code < 200 or code in (204, 304):
            return response
        if "chunked" in (response.header("transfer-encoding") or "").lower():
            response.body = self._chunked()
        elif response.header("content-length") is not None:
            response.body = self._exactly(int(response.header("content-length")))
        else:
            while self._recv():
                pass
            response.body, self.buf = self.buf, b""
        return response

    def wait_closed(self) -> bytes:
        """Read until the server closes (a socket timeout if it never does); the bytes that
        came before the close and after what was read already."""
        while self._recv():
            pass
        rest, self.buf = self.buf, b""
        return rest


def request(method: str, path: str, *headers: str, body: bytes = b"", version: str = "HTTP/1.1") -> bytes:
    head = f"{method} {path} {version}\r\nHost: {HOST}\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
    return head.encode("latin-1") + body


def exchange(port: int, data: bytes, method: str = "GET") -> Response:
    with RawClient(port) as client:
        client.send(data)
        return client.read_response(method)


def assert_healthy(port: int) -> None:
    response = exchange(port, request("GET", "/healthz"))
    assert (response.status, response.body) == (200, b"ok\n")


def assert_refused_and_closed(client: RawClient, status: int) -> None:
    response = client.read_response()
    assert response.status == status, response
    assert (response.header("connection") or "").lower() == "close", response.headers
    assert client.wait_closed() == b"", "bytes after the refusal: a smuggled request was answered"


# ---------------------------------------------------------------------- the gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess(tmp_path_factory.mktemp("http-framing")).start()
    yield process
    process.stop()


@pytest.fixture
def port(gateway):
    yield gateway.port
    assert "Traceback" not in gateway.log_text()


FORM = b"grant_type=urn%3Aexample%3Aunknown&client_id=framing-test"  # 401: an unknown client
FORM_TYPE = "Content-Type: application/x-www-form-urlencoded"


@dataclass
class TokenAnswer:
    status: int
    body_json: dict


def token_answer(port: int, body: bytes = FORM) -> TokenAnswer:
    """What POST /token answers `body` sent plainly with Content-Length (the reference)."""
    response = exchange(port, request("POST", "/token", FORM_TYPE, f"Content-Length: {len(body)}", body=body))
    return TokenAnswer(response.status, json.loads(response.body))


# A request that must never be answered when it hides in the body of a refused one.
SMUGGLED = request("GET", "/mcp/smuggled")
RAW_HOST = f"Host: {HOST}"


def post_mcp(*headers: str, body: bytes) -> bytes:
    """A POST the application would answer 401 (no token): a 400 is the framing layer's."""
    return request("POST", "/mcp/framing", "Content-Type: application/json", *headers, body=body)


SMUGGLING = {
    "te-and-cl": post_mcp("Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
    "cl-and-te": post_mcp("Transfer-Encoding: chunked", "Content-Length: 5", body=b"0\r\n\r\n" + SMUGGLED),
    "te-gzip": post_mcp("Transfer-Encoding: gzip", body=b"0\r\n\r\n" + SMUGGLED),
    "te-chunked-gzip": post_mcp("Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n" + SMUGGLED),
    "te-xchunked": post_mcp("Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
    "te-chunked-twice": post_mcp("Transfer-Encoding: chunked", "Transfer-Encoding: chunked",
                                 body=b"0\r\n\r\n" + SMUGGLED),
    "cl-negative": post_mcp("Content-Length: -1", body=b"{}" + SMUGGLED),
    "cl-plus-sign": post_mcp("Content-Length: +2", body=b"{}" + SMUGGLED),
    "cl-exponent": post_mcp("Content-Length: 1e3", body=b"{}" + SMUGGLED),
    "cl-two-numbers": post_mcp("Content-Length: 2 2", body=b"{}" + SMUGGLED),
    "cl-conflicting": post_mcp("Content-Length: 2", "Content-Length: 40", body=b"{}" + SMUGGLED),
    "space-before-colon": f"GET /healthz HTTP/1.1\r\nHost : {HOST}\r\n\r\n".encode() + SMUGGLED,
    "obs-fold": f"GET /healthz HTTP/1.1\r\n{RAW_HOST}\r\nX-Test: a\r\n b\r\n\r\n".encode() + SMUGGLED,
    "nul-in-value": request("GET", "/healthz", "X-Test: a\x00b") + SMUGGLED,
    "bare-cr-in-value": request("GET", "/healthz", "X-Test: a\rb") + SMUGGLED,
    "bad-chunk-size": post_mcp("Transfer-Encoding: chunked", body=b"zz\r\n{}\r\n0\r\n\r\n" + SMUGGLED),
    "chunk-extension-control-chars": post_mcp("Transfer-Encoding: chunked",
                                              body=b"2;ext=\x01\x7f\r\n{}\r\n0\r\n\r\n" + SMUGGLED),
}


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_ambiguous_framing_is_refused_400_and_closed_with_nothing_relayed(port, raw):
    with RawClient(port) as client:
        client.send(raw)
        assert_refused_and_closed(client, 400)
    assert_healthy(port)


OVERSIZED_HEADS = {
    "many-headers": request("GET", "/healthz", *(f"X-Filler-{i:04}: {'v' * 40}" for i in range(2000))),
    "one-huge-header": request("GET", "/healthz", "X-Big: " + "a" * 70_000),
    "huge-url": request("GET", "/healthz?q=" + "a" * 70_000),
}


@pytest.mark.parametrize("raw", OVERSIZED_HEADS.values(), ids=OVERSIZED_HEADS.keys())
def test_request_head_over_64_kib_is_refused_431_and_closed(port, raw):
    with RawClient(port) as client:
        client.send(raw)
        assert_refused_and_closed(client, 431)
    assert_healthy(port)


def test_request_head_under_64_kib_arriving_in_pieces_is_served(port):
    """The head limit counts each byte once, however the head is split across reads."""
    raw = request("GET", "/healthz", "X-Big: " + "a" * 60_000)
    with RawClient(port) as client:
        for start in range(0, len(raw), 4096):
            client.send(raw[start:start + 4096])
            time.sleep(0.002)  # separate reads on the server
        response = client.read_response()
    assert (response.status, response.body) == (200, b"ok\n")


@pytest.mark.parametrize("headers", [
    ("Content-Length: 5000000",),
    ("Expect: 100-continue", "Content-Length: 5000000"),  # a 413, never a 100 that invites the body
    ("Content-Length: 5000000", "Expect: 100-continue"),
], ids=["plain", "expect-first", "expect-last"])
def test_declared_body_over_4_mib_is_refused_413_before_it_is_sent(port, headers):
    with RawClient(port) as client:
        client.send(request("POST", "/token", FORM_TYPE, *headers))
        assert_refused_and_closed(client, 413)  # read with no body byte sent
    assert_healthy(port)


def send_until_answered(client: RawClient, data: bytes, limit: int) -> None:
    """Send `data` over and over, up to `limit` bytes or until the server answers or closes."""
    sent = 0
    while sent < limit and not select.select([client.sock], [], [], 0)[0]:
        if not client.send(data):
            return
        sent += len(data)


def test_chunked_body_growing_past_4_mib_is_refused_413_and_closed(port):
    chunk = b"%x\r\n%b\r\n" % (65536, b"a" * 65536)
    with RawClient(port) as client:
        client.send(request("POST", "/token", FORM_TYPE,
                            "Transfer-Encoding: chunked"))
        send_until_answered(client, chunk, 2 * MAX_BODY)
        assert_refused_and_closed(client, 413)
    assert_healthy(port)


ENDLESS_CHUNKED_LINES = {  # the body's start, then what is repeated up to 8 MiB
    "one-trailer-field": (b"2\r\nab\r\n0\r\nX-Big: ", b"a" * 65536),
    "many-trailer-fields": (b"2\r\nab\r\n0\r\n", b"".join(b"X-T%05d: v\r\n" % i for i in range(5000))),
    "chunk-extension": (b"2;ext=", b"a" * 65536),
    "chunk-size-zeros": (b"", b"0" * 65536),
}


@pytest.mark.parametrize("start, repeated", ENDLESS_CHUNKED_LINES.values(), ids=ENDLESS_CHUNKED_LINES.keys())
def test_endless_chunked_framing_is_refused_not_buffered(port, start, repeated):
    """Trailer fields and chunk lines are bounded like a head: never read on until the idle timeout."""
    with RawClient(port, timeout=CLOSE_DEADLINE) as client:
        client.send(request("POST", "/token", FORM_TYPE, "Transfer-Encoding: chunked") + start)
        send_until_answered(client, repeated, 2 * MAX_BODY)
        response = client.read_response()
        assert response.status in (400, 413, 431), response
        assert client.wait_closed() == b""
    assert_healthy(port)


def test_pipelined_requests_are_answered_in_order_each_complete(port):
    with RawClient(port) as client:
        client.send(request("GET", "/healthz") + request("GET", "/mcp/x")
                    + request("POST", "/token", FORM_TYPE,
                              f"Content-Length: {len(FORM)}", body=FORM)
                    + request("GET", "/healthz"))
        responses = [client.read_response() for _ in range(4)]
        assert [r.status for r in responses] == [200, 401, 401, 200]
        assert responses[0].body == responses[3].body == b"ok\n"
        assert json.loads(responses[2].body) == token_answer(port).body_json
        client.send(request("GET", "/healthz"))  # still open after the pipeline
        assert client.read_response().status == 200


def test_transfer_encoding_in_http10_request_closes_the_connection_after_the_answer(port):
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; the
    connection closes after it, whatever its Connection header asks."""
    with RawClient(port) as client:
        client.send(request("POST", "/mcp/framing", "Transfer-Encoding: chunked", "Connection: keep-alive",
                            body=b"0\r\n\r\n", version="HTTP/1.0") + SMUGGLED)
        response = client.read_response()
        assert response.status >= 400
        assert (response.header("connection") or "").lower() != "keep-alive"
        assert client.wait_closed() == b"", "the request after it was answered"


def test_malformed_request_after_pipelined_ones_is_refused_after_their_answers(port):
    with RawClient(port) as client:
        client.send(request("GET", "/healthz") + request("GET", "/mcp/x")
                    + request("GET", "/healthz", "Content-Length: 1 1") + SMUGGLED)
        assert [client.read_response().status for _ in range(2)] == [200, 401]
        assert_refused_and_closed(client, 400)


def test_http11_keeps_the_connection_by_default(port):
    with RawClient(port) as client:
        client.send(request("GET", "/healthz"))
        first = client.read_response()
        assert first.status == 200 and (first.header("connection") or "").lower() != "close"
        client.send(request("GET", "/healthz"))
        assert client.read_response().status == 200


def test_connection_close_is_echoed_and_the_server_closes(port):
    with RawClient(port) as client:
        client.send(request("GET", "/healthz", "Connection: close") + SMUGGLED)
        response = client.read_response()
        assert response.status == 200 and (response.header("connection") or "").lower() == "close"
        assert client.wait_closed() == b"", "a request after Connection: close was answered"


def test_http10_without_keep_alive_is_closed_after_the_response(port):
    with RawClient(port) as client:
        client.send(request("GET", "/healthz", version="HTTP/1.0"))
        assert client.read_response().body == b"ok\n"
        assert client.wait_closed() == b""


def test_http10_with_keep_alive_keeps_the_connection(port):
    with RawClient(port) as client:
        for _ in range(2):
            client.send(request("GET", "/healthz", "Connection: keep-alive", version="HTTP/1.0"))
            response = client.read_response()
            assert response.status == 200 and response.body == b"ok\n"
            assert (response.header("connection") or "").lower() == "keep-alive"


def test_expect_100_continue_is_answered_before_the_body_is_sent(port):
    with RawClient(port) as client:
        client.send(request("POST", "/token", FORM_TYPE,
                            f"Content-Length: {len(FORM)}", "Expect: 100-continue"))
        interim = client.read_response()
        assert (interim.version, interim.status) == ("HTTP/1.1", 100)
        client.send(FORM)
        final = client.read_response()
    assert TokenAnswer(final.status, json.loads(final.body)) == token_answer(port)


def test_head_response_has_no_body_bytes(port):
    with RawClient(port) as client:
        client.send(request("HEAD", "/healthz") + request("GET", "/healthz"))
        head = client.read_response("HEAD")
        after = client.read_response()  # begins right after the head, or fails to parse
    assert head.status < 500
    assert (after.status, after.body) == (200, b"ok\n")


GARBAGE = {
    "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "unknown-method": request("BREW", "/"),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("raw", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_refused_or_closed_without_a_hang(port, raw):
    with RawClient(port, timeout=CLOSE_DEADLINE) as client:
        client.send(raw)
        try:
            response = client.read_response()
        except Closed as exc:
            assert exc.args[0] == b""  # closed without a partial answer
        else:
            assert 400 <= response.status < 600, response
    assert_healthy(port)


OTHER_VERSIONS = {
    "http-0.9": b"GET /healthz\r\n\r\n",
    "http-0.9-with-host": b"GET /healthz HTTP/0.9\r\nHost: 127.0.0.1\r\n\r\n",
    "http-2.0": request("GET", "/healthz", version="HTTP/2.0"),
}


@pytest.mark.parametrize("raw", OTHER_VERSIONS.values(), ids=OTHER_VERSIONS.keys())
def test_request_lines_of_other_http_versions_are_refused_505(port, raw):
    """llhttp reads HTTP/0.9 and 2.0 request lines; only 1.0 and 1.1 are answered."""
    with RawClient(port) as client:
        client.send(raw + request("GET", "/healthz"))
        assert_refused_and_closed(client, 505)
    assert_healthy(port)


def test_blank_lines_before_a_request_are_ignored_or_refused(port):
    """RFC 9112 §2.2: empty lines before a request line may be skipped."""
    with RawClient(port, timeout=CLOSE_DEADLINE) as client:
        client.send(b"\r\n\r\n" + request("GET", "/healthz"))
        response = client.read_response()
        assert response.status == 200 or (400 <= response.status < 500 and client.wait_closed() == b"")


def test_h2c_upgrade_is_answered_as_plain_http11(port):
    response = exchange(port, request("GET", "/healthz", "Connection: Upgrade, HTTP2-Settings",
                                      "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"))
    assert (response.version, response.status, response.body) == ("HTTP/1.1", 200, b"ok\n")


def test_chunked_body_with_trailer_is_read_as_the_same_body_with_content_length(port):
    chunked = exchange(port, request("POST", "/token", FORM_TYPE, "Transfer-Encoding: chunked",
                                     body=b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\nX-Checksum: 1\r\n\r\n"
                                     % (10, FORM[:10], len(FORM) - 10, FORM[10:])))
    reference = token_answer(port)
    assert TokenAnswer(chunked.status, json.loads(chunked.body)) == reference
    assert token_answer(port, b"") != reference, "the body makes no difference to this endpoint"


# ------------------------------------------------------------ in-process: timeouts


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish("hello")


class Boom(tornado.web.RequestHandler):
    def get(self) -> None:
        raise RuntimeError("boom")


class Echo(tornado.web.RequestHandler):
    def post(self) -> None:
        self.finish({"headers": sorted(name.lower() for name in self.request.headers),
                     "body": self.request.body.decode()})


class Slow(tornado.web.RequestHandler):
    closed: list[str] = []
    finished: asyncio.Event

    async def get(self) -> None:
        await asyncio.sleep(0.5)
        self.write("late")
        Slow.finished.set()

    def on_connection_close(self) -> None:
        Slow.closed.append(self.request.path)


def serve() -> tuple[AdmissionHTTPServer, int]:
    app = tornado.web.Application([("/", Hello), ("/boom", Boom), ("/echo", Echo), ("/slow", Slow)])
    server = AdmissionHTTPServer(app, max_connections=10, idle_connection_timeout=0.5)
    [sock] = bind_sockets(0, HOST, family=socket.AF_INET)
    server.add_sockets([sock])
    return server, sock.getsockname()[1]


def silent_until_closed(port: int, data: bytes = b"") -> bytes:
    with RawClient(port, timeout=CLOSE_DEADLINE) as client:
        client.send(data)
        return client.wait_closed()


def trickle(port: int, head: bytes) -> bool:
    """Send `head`, then one more byte every 0.1 s; True once the server has closed."""
    deadline = time.monotonic() + CLOSE_DEADLINE
    with RawClient(port) as client:
        client.send(head)
        while time.monotonic() < deadline:
            if select.select([client.sock], [], [], 0.1)[0] and not client._recv():
                return True
            if not client.send(b"a"):
                return True
    return False


@pytest.mark.gen_test(timeout=20)
async def test_connection_that_sends_nothing_is_closed_after_the_idle_timeout():
    server, port = serve()
    try:
        assert await asyncio.to_thread(silent_until_closed, port) == b""
    finally:
        await server.drain(0.2)


@pytest.mark.gen_test(timeout=20)
async def test_blank_lines_only_are_closed_after_the_idle_timeout():
    server, port = serve()
    try:
        rest = await asyncio.to_thread(silent_until_closed, port, b"\r\n\r\n")
        assert rest == b"" or rest.startswith(b"HTTP/1.1 400 ")
    finally:
        await server.drain(0.2)


@pytest.mark.gen_test(timeout=20)
async def test_slowloris_head_is_closed_after_the_idle_timeout():
    server, port = serve()
    try:
        # A never-ending head, one byte per 0.1 s.
        head = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()
        assert await asyncio.to_thread(trickle, port, head), f"still open after {CLOSE_DEADLINE} s"
    finally:
        await server.drain(0.2)


@pytest.mark.gen_test(timeout=20)
async def test_slow_body_is_closed_after_the_idle_timeout():
    server, port = serve()
    try:
        # A head declaring 1,000 body bytes, then one byte per 0.1 s.
        head = request("POST", "/echo", "Content-Length: 1000")
        assert await asyncio.to_thread(trickle, port, head), f"still open after {CLOSE_DEADLINE} s"
    finally:
        await server.drain(0.2)


def request_then_idle(port: int) -> tuple[Response, bytes]:
    with RawClient(port, timeout=CLOSE_DEADLINE) as client:
        client.send(request("GET", "/"))
        return client.read_response(), client.wait_closed()


@pytest.mark.gen_test(timeout=20)
async def test_connection_idle_between_requests_is_closed_after_the_timeout():
    server, port = serve()
    try:
        response, rest = await asyncio.to_thread(request_then_idle, port)
        assert (response.status, response.body, rest) == (200, b"hello", b"")
    finally:
        await server.drain(0.2)


def boom_then_hello(port: int) -> list[Response]:
    with RawClient(port) as client:
        client.send(request("GET", "/boom"))
        first = client.read_response()
        client.send(request("GET", "/"))
        return [first, client.read_response()]


@pytest.mark.gen_test(timeout=20)
async def test_handler_exception_is_a_500_and_the_connection_stays_usable():
    server, port = serve()
    try:
        boom, hello = await asyncio.to_thread(boom_then_hello, port)
        assert boom.status == 500
        assert (hello.status, hello.body) == (200, b"hello")
    finally:
        await server.drain(0.2)


@pytest.mark.gen_test(timeout=20)
async def test_client_gone_mid_request_calls_on_connection_close_and_logs_nothing(caplog):
    caplog.set_level(logging.WARNING)
    Slow.closed, Slow.finished = [], asyncio.Event()
    server, port = serve()
    try:
        client = RawClient(port)
        client.send(request("GET", "/slow"))
        await asyncio.sleep(0.1)  # the handler is sleeping
        client.sock.close()
        await asyncio.wait_for(Slow.finished.wait(), CLOSE_DEADLINE)
        for _ in range(10):  # the write after the close and its future settle
            await asyncio.sleep(0.02)
        gc.collect()  # an exception never retrieved is logged when its future is collected
        assert Slow.closed == ["/slow"]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    finally:
        await server.drain(0.2)


@pytest.mark.gen_test(timeout=20)
async def test_chunked_trailer_fields_do_not_become_request_headers():
    """RFC 9110 §6.5.1: a trailer (here one spelled like a credential) is not a header field."""
    server, port = serve()
    try:
        raw = request("POST", "/echo", "Transfer-Encoding: chunked",
                      body=b"5\r\nhello\r\n0\r\nAuthorization: Bearer smuggled\r\nX-Checksum: 1\r\n\r\n")
        response = await asyncio.to_thread(exchange, port, raw)
        assert response.status == 200
        echoed = json.loads(response.body)
        assert echoed["body"] == "hello"
        assert "authorization" not in echoed["headers"] and "x-checksum" not in echoed["headers"]
    finally:
        await server.drain(0.2)
