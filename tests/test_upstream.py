"""services.proxy.upstream against real peers on loopback: the SSRF guard, fetch_small, and the
pooled streaming client (keep-alive seen from the server side, SSE relayed as it arrives,
cancellation seen by the upstream, timeouts, TLS with SNI).

Nothing here sends traffic beyond loopback: refusals of private and metadata addresses
are asserted at the policy, or with connecting made impossible."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.netutil import bind_sockets

from services.proxy.protocol.sse import SseParser
from services.proxy.upstream.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRedirect,
    UpstreamRefused,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from services.proxy.upstream.fetch import fetch_small
from services.proxy.upstream.http11 import hop_by_hop_names
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream.pool import UpstreamClient
from services.proxy.upstream.urls import parse_upstream_url
from tests.support.fake_upstream import RawExchange, RawUpstream
from tests.support.ports import HeldPort

LOOPBACK = AddressPolicy.from_setting("127.0.0.0/8,::1")

# --------------------------------------------------------------------------- a real upstream


class State:
    def __init__(self) -> None:
        self.accepted = 0
        self.redirect_target_hits = 0
        self.gone = asyncio.Event()
        self.release = asyncio.Event()
        self.seen_headers: list[dict[str, str]] = []


class CountingServer(HTTPServer):
    """Counts accepted TCP connections: keep-alive reuse seen from the server side."""

    state: State

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        self.state.accepted += 1
        super().handle_stream(stream, address)


class Base(web.RequestHandler):
    def initialize(self, state: State) -> None:
        self.state = state

    def on_connection_close(self) -> None:
        self.state.gone.set()


class JsonHandler(Base):
    def post(self) -> None:
        self.state.seen_headers.append(dict(self.request.headers.get_all()))
        self.write({"ok": True, "length": len(self.request.body), "body": self.request.body.decode()})

    def get(self) -> None:
        self.write({"ok": True})

    def head(self) -> None:
        self.set_header("Content-Length", "11")


class CloseHandler(Base):
    def get(self) -> None:
        self.set_header("Connection", "close")
        self.write("bye")


class NoContentHandler(Base):
    def post(self) -> None:
        self.set_status(202)


class SlowSseHandler(Base):
    """Three events, 0.2 s apart: each must reach the client before the next is sent."""

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        for number in range(3):
            self.write(f"id: {number}\ndata: event {number}\n\n")
            await self.flush()
            await asyncio.sleep(0.2)


class IdleSseHandler(Base):
    """One event, silence until told, then one more: no read timeout may cut it."""

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.write("data: first\n\n")
        await self.flush()
        await self.state.release.wait()
        self.write("data: second\n\n")


class ForeverSseHandler(Base):
    """Streams until the client goes away, which on_connection_close records."""

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.write(": hello\n\ndata: tick\n\n")
        await self.flush()
        while not self.state.gone.is_set():
            await asyncio.sleep(0.05)


class DyingSseHandler(Base):
    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.write("data: last words\n\n")
        await self.flush()
        await asyncio.sleep(0.1)
        self.request.connection.stream.close()  # type: ignore[attr-defined]


class HangHandler(Base):
    """Never sends response headers."""

    async def get(self) -> None:
        while not self.state.gone.is_set():
            await asyncio.sleep(0.05)


class BigHandler(Base):
    def get(self) -> None:
        self.write(b"x" * 10_000)


class BigChunkedHandler(Base):
    async def get(self) -> None:
        for _ in range(10):
            self.write(b"y" * 1000)
            await self.flush()


class RedirectHandler(Base):
    def get(self) -> None:
        self.redirect("/redirect-target")


class RedirectTargetHandler(Base):
    def get(self) -> None:
        self.state.redirect_target_hits += 1
        self.write({"followed": True})


@asynccontextmanager
async def upstream(
    *, ssl_options: ssl.SSLContext | None = None, idle_timeout: float = 3600
) -> AsyncIterator[tuple[int, State]]:
    state = State()
    app = web.Application(
        [
            (r"/json", JsonHandler, {"state": state}),
            (r"/close", CloseHandler, {"state": state}),
            (r"/accepted", NoContentHandler, {"state": state}),
            (r"/sse/slow", SlowSseHandler, {"state": state}),
            (r"/sse/idle", IdleSseHandler, {"state": state}),
            (r"/sse/forever", ForeverSseHandler, {"state": state}),
            (r"/sse/dying", DyingSseHandler, {"state": state}),
            (r"/hang", HangHandler, {"state": state}),
            (r"/big", BigHandler, {"state": state}),
            (r"/big-chunked", BigChunkedHandler, {"state": state}),
            (r"/redirect", RedirectHandler, {"state": state}),
            (r"/redirect-target", RedirectTargetHandler, {"state": state}),
        ]
    )
    server = CountingServer(app, ssl_options=ssl_options, idle_connection_timeout=idle_timeout)
    server.state = state
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    try:
        yield sockets[0].getsockname()[1], state
    finally:
        server.stop()
        await server.close_all_connections()


@asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[int]:
    """A server that answers every connection with fixed bytes and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def wait_for(predicate, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def no_connect(client: UpstreamClient) -> None:
    """Make any connection attempt a test failure (refusals must come before connecting)."""

    async def refuse(*args: object) -> None:
        raise AssertionError("the client tried to connect")

    client._connect = refuse  # type: ignore[method-assign]


# --------------------------------------------------------------------------- SSRF guard


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "240.0.0.1",
        "198.18.0.1",
        "192.0.2.1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "fec0::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
    ],
)
def test_policy_refuses_non_public_addresses(address: str) -> None:
    policy = AddressPolicy.from_setting("")
    with pytest.raises(UpstreamRefused, match="refused"):
        policy.check_ip(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_policy_allows_public_addresses(address: str) -> None:
    AddressPolicy.from_setting("").check_ip(address)


def test_allow_list_opens_ranges_but_never_metadata() -> None:
    policy = AddressPolicy.from_setting("127.0.0.0/8, 10.1.2.3 169.254.0.0/16")
    policy.check_ip("127.0.0.1")
    policy.check_ip("127.200.0.1")
    policy.check_ip("::ffff:127.0.0.1")  # the same address, IPv6-mapped
    policy.check_ip("10.1.2.3")
    policy.check_ip("169.254.1.1")
    with pytest.raises(UpstreamRefused):
        policy.check_ip("10.1.2.4")
    with pytest.raises(UpstreamRefused, match="metadata"):
        policy.check_ip("169.254.169.254")  # a broad range does not unlock the metadata endpoint
    AddressPolicy.from_setting("169.254.169.254").check_ip("169.254.169.254")  # naming it does


def test_host_name_entries() -> None:
    policy = AddressPolicy.from_setting("mcp.internal,*.corp.example")
    assert policy.allows_host("mcp.internal")
    assert policy.allows_host("MCP.Internal.")
    assert policy.allows_host("a.b.corp.example")
    assert not policy.allows_host("corp.example.evil")
    assert not policy.allows_host("other.internal")
    policy.check_ip("10.0.0.5", host="mcp.internal")
    with pytest.raises(UpstreamRefused):
        policy.check_ip("10.0.0.5", host="other.internal")
    with pytest.raises(UpstreamRefused, match="metadata"):
        policy.check_ip("169.254.169.254", host="mcp.internal")


def test_bad_allow_list_entries_fail_loudly() -> None:
    with pytest.raises(ValueError, match="not a valid CIDR"):
        AddressPolicy.from_setting("10.0.0.0/33")
    with pytest.raises(ValueError, match="neither"):
        AddressPolicy.from_setting("bad host!")
    # Host bits set are tolerated (config.py accepts them too) and mean the network.
    AddressPolicy.from_setting("10.1.2.3/24").check_ip("10.1.2.200")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://127.0.0.1/",
        "http://user:secret@example.com/",
        "http://@example.com/",
        "http:///no-host",
        "http://exa mple.com/",
        "http://example.com:99999/",
        "",
    ],
)
def test_unusable_urls_are_refused(url: str) -> None:
    with pytest.raises(UpstreamRefused):
        parse_upstream_url(url)


def test_url_parts() -> None:
    target = parse_upstream_url("HTTPS://Example.COM./mcp?x=1#frag")
    assert (target.scheme, target.host, target.port, target.path) == ("https", "example.com", 443, "/mcp?x=1")
    v6 = parse_upstream_url("http://[::1]:8080")
    assert (v6.host, v6.port, v6.host_header, v6.path) == ("::1", 8080, "[::1]:8080", "/")


@pytest.mark.gen_test
async def test_resolution_keeps_only_permitted_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name resolving to a private and a public address: only the public one is used."""
    loop = asyncio.get_running_loop()

    async def fake_getaddrinfo(host: str, port: int, **kwargs: object) -> list:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:169.254.169.254", port, 0, 0)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    policy = AddressPolicy.from_setting("")
    assert await policy.resolve("mixed.example", 443) == ("93.184.216.34",)

    async def only_private(host: str, port: int, **kwargs: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.0.9", port))]

    monkeypatch.setattr(loop, "getaddrinfo", only_private)
    with pytest.raises(UpstreamRefused, match="192.168.0.9 is a private address"):
        await policy.resolve("private.example", 443)

    async def failing(host: str, port: int, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", failing)
    with pytest.raises(UpstreamUnreachable, match="DNS lookup") as info:
        await policy.resolve("nowhere.example", 443)
    assert not isinstance(info.value, UpstreamRefused)


@pytest.mark.gen_test
async def test_dns_single_flight_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo
    lookups: list[str] = []

    async def counting(host: str, *args: object, **kwargs: object) -> list:
        lookups.append(host)
        await asyncio.sleep(0.05)
        return await real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    async with upstream() as (port, state):
        client = UpstreamClient(AddressPolicy.from_setting("localhost"))
        url = f"http://localhost:{port}/json"
        first = asyncio.ensure_future(client.request("GET", url))
        others = [asyncio.ensure_future(client.request("GET", url)) for _ in range(4)]
        await asyncio.sleep(0.01)
        first.cancel()  # one caller giving up does not fail the lookup the others wait for
        for response in await asyncio.gather(*others):
            assert await response.read_all(100) == b'{"ok": true}'
        response = await client.request("GET", url)  # cached now
        await response.read_all(100)
        assert lookups == ["localhost"]
        client.close()


@pytest.mark.gen_test
async def test_dns_cache_expires_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo
    lookups: list[str] = []

    async def counting(host: str, *args: object, **kwargs: object) -> list:
        lookups.append(host)
        return await real_getaddrinfo("localhost", *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    now = [1000.0]
    async with upstream() as (port, state):
        client = UpstreamClient(AddressPolicy.from_setting("127.0.0.0/8 localhost a.test b.test"), dns_ttl=30,
                                dns_cache_size=2, clock=lambda: now[0])

        async def get(host: str) -> None:
            response = await client.request("GET", f"http://{host}:{port}/json")
            await response.read_all(100)

        await get("localhost")
        now[0] += 29
        await get("localhost")
        assert lookups == ["localhost"]  # within the TTL: cached
        now[0] += 2
        await get("localhost")
        assert lookups == ["localhost", "localhost"]  # past it: resolved again
        await get("a.test")
        await get("b.test")  # the third host evicts the least recently used (localhost)
        await get("b.test")
        await get("localhost")
        assert lookups == ["localhost", "localhost", "a.test", "b.test", "localhost"]
        now[0] += 10_000
        await get("127.0.0.1")  # an IP literal: no lookup, never expires
        assert lookups[-1] == "localhost"
        client.close()


@pytest.mark.gen_test
async def test_client_refuses_before_connecting() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(AddressPolicy.from_setting(""))
        for url in (
            f"http://127.0.0.1:{port}/json",
            f"http://localhost:{port}/json",  # a name that resolves to loopback
            f"http://[::ffff:127.0.0.1]:{port}/json",
        ):
            with pytest.raises(UpstreamRefused):
                await client.request("GET", url)
        assert state.accepted == 0
        assert client.stats.connections_opened == 0
        no_connect(client)
        for url in (
            "http://10.1.2.3/mcp",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
        ):
            with pytest.raises(UpstreamRefused):
                await client.request("GET", url)
        client.close()


@pytest.mark.gen_test
async def test_allow_list_lets_loopback_through() -> None:
    async with upstream() as (port, state):
        for allow in ("127.0.0.0/8", "localhost"):
            client = UpstreamClient(AddressPolicy.from_setting(allow))
            host = "localhost" if allow == "localhost" else "127.0.0.1"
            response = await client.request("GET", f"http://{host}:{port}/json")
            assert response.status == 200
            assert await response.read_all(1000) == b'{"ok": true}'
            client.close()


# --------------------------------------------------------------------------- pooled client


@pytest.mark.gen_test
async def test_sequential_requests_reuse_one_connection() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        for number in range(20):
            response = await client.request(
                "POST",
                f"http://127.0.0.1:{port}/json",
                [("Content-Type", "application/json")],
                b'{"n": %d}' % number,
            )
            assert response.status == 200
            body = await response.read_all(10_000)
            assert b'"length": ' in body
        assert state.accepted == 1
        assert (client.stats.connections_opened, client.stats.requests, client.stats.reuses) == (1, 20, 19)
        assert client.idle_connections() == 1
        client.close()


@pytest.mark.gen_test
async def test_concurrent_requests_and_idle_bound() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK, max_per_origin=3)

        async def call() -> bytes:
            response = await client.request("GET", f"http://127.0.0.1:{port}/json")
            return await response.read_all(1000)

        assert set(await asyncio.gather(*(call() for _ in range(8)))) == {b'{"ok": true}'}
        opened = client.stats.connections_opened
        assert 1 <= opened <= 8
        assert client.idle_connections() == min(opened, 3)  # the rest were closed, not pooled
        await asyncio.gather(*(call() for _ in range(3)))
        assert client.stats.connections_opened == opened  # served from the pool
        assert state.accepted == opened
        client.close()


@pytest.mark.gen_test
async def test_request_and_response_framing() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        headers = {
            "Content-Type": "application/json",
            "Mcp-Session-Id": "abc",
            "Connection": "X-Private",
            "X-Private": "hop-by-hop",
            "Host": "evil.example",
            "Content-Length": "999",
            "Transfer-Encoding": "chunked",
        }
        response = await client.request("POST", f"http://127.0.0.1:{port}/json", headers, b"12345")
        assert await response.read_all(1000) == b'{"ok": true, "length": 5, "body": "12345"}'
        seen = state.seen_headers[-1]
        assert seen["Host"] == f"127.0.0.1:{port}"
        assert seen["Content-Length"] == "5"
        assert seen["Mcp-Session-Id"] == "abc"
        assert "X-Private" not in seen and "Transfer-Encoding" not in seen
        assert response.headers["Content-Type"].startswith("application/json")
        # An empty POST still says Content-Length: 0 (never chunked).
        response = await client.request("POST", f"http://127.0.0.1:{port}/json")
        assert b'"length": 0' in await response.read_all(1000)
        # A body-less status keeps the connection reusable.
        response = await client.request("POST", f"http://127.0.0.1:{port}/accepted", body=b"{}")
        assert response.status == 202 and response.finished
        # A chunked body is reassembled.
        response = await client.request("GET", f"http://127.0.0.1:{port}/big-chunked")
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert await response.read_all(100_000) == b"y" * 10_000
        assert state.accepted == 1
        # A HEAD response ends at its head although it announces a length; its connection
        # is not reused (the length describes a body that is not there).
        response = await client.request("HEAD", f"http://127.0.0.1:{port}/json")
        assert response.headers["Content-Length"] == "11" and response.finished
        assert await response.read_chunk() == b""
        assert client.idle_connections() == 0
        # Header injection is refused before anything is sent.
        with pytest.raises(ValueError):
            await client.request("GET", f"http://127.0.0.1:{port}/json", {"X-Evil": "a\r\nInjected: yes"})
        client.close()


@pytest.mark.gen_test
async def test_connection_close_is_honoured() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        for _ in range(3):
            response = await client.request("GET", f"http://127.0.0.1:{port}/close")
            assert await response.read_all(100) == b"bye"
        assert state.accepted == 3
        assert client.idle_connections() == 0
        client.close()


@pytest.mark.gen_test
async def test_upstream_closing_idle_connections_is_harmless() -> None:
    async with upstream(idle_timeout=0.2) as (port, state):
        client = UpstreamClient(LOOPBACK)
        for _ in range(2):
            response = await client.request("POST", f"http://127.0.0.1:{port}/json", body=b"{}")
            await response.read_all(1000)
            await asyncio.sleep(0.5)  # the server drops the idle connection meanwhile
        assert state.accepted == 2
        assert client.stats.reuses == 0
        client.close()


@pytest.mark.gen_test
async def test_idle_timeout_drops_pooled_connections() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK, idle_timeout=0.1)
        for _ in range(2):
            response = await client.request("GET", f"http://127.0.0.1:{port}/json")
            await response.read_all(1000)
            await asyncio.sleep(0.3)
        assert state.accepted == 2
        client.close()


@pytest.mark.gen_test
async def test_body_delimited_by_close_and_malformed_responses() -> None:
    async with raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end") as port:
        client = UpstreamClient(LOOPBACK)
        response = await client.request("GET", f"http://127.0.0.1:{port}/")
        assert await response.read_all(100) == b"until the end"
        assert client.idle_connections() == 0
    async with raw_upstream(b"SSH-2.0-OpenSSH\r\n\r\n") as port:
        with pytest.raises(UpstreamProtocolError):
            await client.request("GET", f"http://127.0.0.1:{port}/")
    async with raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n"
    ) as port:
        response = await client.request("GET", f"http://127.0.0.1:{port}/")
        with pytest.raises(UpstreamStreamError, match="malformed body: Invalid character in chunk size"):
            await response.read_all(100)
    async with raw_upstream(b"") as port:  # closes without a word
        with pytest.raises(UpstreamUnreachable, match="closed the connection before answering"):
            await client.request("GET", f"http://127.0.0.1:{port}/")
    client.close()


@pytest.mark.gen_test
async def test_connection_refused_is_unreachable() -> None:
    client = UpstreamClient(LOOPBACK, connect_timeout=2)
    with HeldPort() as closed, pytest.raises(UpstreamUnreachable, match="cannot connect") as info:
        await client.request("GET", f"http://127.0.0.1:{closed.port}/")
    assert not isinstance(info.value, UpstreamRefused)


@pytest.mark.gen_test
async def test_read_all_limit() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        for path in ("/big", "/big-chunked"):
            response = await client.request("GET", f"http://127.0.0.1:{port}{path}")
            with pytest.raises(UpstreamTooLarge):
                await response.read_all(5000)
        assert client.idle_connections() == 0  # aborted reads never go back to the pool
        client.close()


# --------------------------------------------------------------------------- streaming


@pytest.mark.gen_test
async def test_sse_events_arrive_one_by_one() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        response = await client.request(
            "GET", f"http://127.0.0.1:{port}/sse/slow", {"Accept": "text/event-stream"}
        )
        assert response.headers["Content-Type"] == "text/event-stream"
        parser = SseParser()
        arrivals: list[tuple[float, str]] = []
        started = time.monotonic()
        async for chunk in response.iter_chunks():
            for event in parser.feed(chunk):
                arrivals.append((time.monotonic() - started, event.data))
        assert [data for _, data in arrivals] == ["event 0", "event 1", "event 2"]
        # Relayed as sent, never held until the end: event 0 long before event 2.
        assert arrivals[0][0] < 0.3
        assert arrivals[2][0] - arrivals[0][0] > 0.3
        assert response.finished and client.idle_connections() == 1
        client.close()


@pytest.mark.gen_test(timeout=10)
async def test_idle_stream_has_no_read_timeout() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK, header_timeout=0.2)
        response = await client.request("GET", f"http://127.0.0.1:{port}/sse/idle")
        assert b"first" in await response.read_chunk()
        asyncio.get_running_loop().call_later(0.8, state.release.set)  # 4 header timeouts of silence
        assert b"second" in await response.read_chunk()
        client.close()


@pytest.mark.gen_test
async def test_close_closes_the_upstream_connection() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        response = await client.request("GET", f"http://127.0.0.1:{port}/sse/forever")
        assert b"tick" in await response.read_chunk()
        response.close()
        await asyncio.wait_for(state.gone.wait(), 2)  # the upstream noticed at once
        assert client.idle_connections() == 0
        assert client.stats.aborted == 1
        assert await response.read_chunk() == b""
        response.close()  # idempotent
        # The pool is unaffected: the next request opens a fresh connection and works.
        response = await client.request("GET", f"http://127.0.0.1:{port}/json")
        assert await response.read_all(100) == b'{"ok": true}'
        assert state.accepted == 2
        client.close()


@pytest.mark.gen_test
async def test_close_from_another_task_ends_a_waiting_reader() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        async with await client.request("GET", f"http://127.0.0.1:{port}/sse/forever") as response:
            await response.read_chunk()
            reader = asyncio.ensure_future(response.read_chunk())
            await asyncio.sleep(0.1)
            assert not reader.done()  # an idle stream just waits
            response.close()  # e.g. from on_connection_close of the downstream request
            assert await asyncio.wait_for(reader, 1) == b""
        await asyncio.wait_for(state.gone.wait(), 2)
        client.close()


@pytest.mark.gen_test
async def test_cancelling_while_waiting_for_headers_closes_the_connection() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        pending = asyncio.ensure_future(client.request("GET", f"http://127.0.0.1:{port}/hang"))
        await wait_for(lambda: state.accepted == 1)
        await asyncio.sleep(0.1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await asyncio.wait_for(state.gone.wait(), 2)
        assert client.idle_connections() == 0
        client.close()


@pytest.mark.gen_test
async def test_upstream_dying_mid_stream() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        response = await client.request("GET", f"http://127.0.0.1:{port}/sse/dying")
        assert b"last words" in await response.read_chunk()
        with pytest.raises(UpstreamStreamError, match="broke off"):
            while await response.read_chunk():
                pass
        assert client.idle_connections() == 0
        client.close()


@pytest.mark.gen_test
async def test_header_timeout() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK, header_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="no response headers"):
            await client.request("GET", f"http://127.0.0.1:{port}/hang")
        assert 0.25 < time.monotonic() - started < 2
        await asyncio.wait_for(state.gone.wait(), 2)
        assert isinstance(UpstreamTimeout("x"), UpstreamError)
        client.close()


@pytest.mark.gen_test
async def test_client_close_aborts_active_streams() -> None:
    async with upstream() as (port, state):
        client = UpstreamClient(LOOPBACK)
        response = await client.request("GET", f"http://127.0.0.1:{port}/sse/forever")
        await response.read_chunk()
        client.close()
        await asyncio.wait_for(state.gone.wait(), 2)
        with pytest.raises(UpstreamUnreachable, match="closed"):
            await client.request("GET", f"http://127.0.0.1:{port}/json")


# --------------------------------------------------------------------------- TLS


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.gen_test
async def test_https_verifies_the_certificate_with_sni_of_the_host(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    sni_seen: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: sni_seen.append(name)  # type: ignore[assignment,return-value]
    trusting = ssl.create_default_context(cafile=str(cert))
    async with upstream(ssl_options=server_context) as (port, state):
        client = UpstreamClient(LOOPBACK, ssl_context=trusting)
        for _ in range(2):
            response = await client.request("GET", f"https://localhost:{port}/json")
            assert await response.read_all(100) == b'{"ok": true}'
        assert sni_seen == ["localhost"]  # the name, although the socket went to 127.0.0.1
        assert state.accepted == 1  # TLS connections are pooled too
        client.close()
        # The system trust store does not know this certificate.
        strict = UpstreamClient(LOOPBACK)
        with pytest.raises(UpstreamUnreachable, match="TLS handshake"):
            await strict.request("GET", f"https://localhost:{port}/json")
        strict.close()
    other_cert, other_key = make_cert(tmp_path, "other.test")
    wrong_name = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    wrong_name.load_cert_chain(other_cert, other_key)
    async with upstream(ssl_options=wrong_name) as (port, state):
        client = UpstreamClient(LOOPBACK, ssl_context=ssl.create_default_context(cafile=str(other_cert)))
        with pytest.raises(UpstreamUnreachable, match="TLS handshake"):
            await client.request("GET", f"https://localhost:{port}/json")
        client.close()


# --------------------------------------------------------------------------- fetch_small


@pytest.mark.gen_test
async def test_fetch_small() -> None:
    async with upstream() as (port, state):
        result = await fetch_small(f"http://127.0.0.1:{port}/json", policy=LOOPBACK)
        assert (result.status, result.body) == (200, b'{"ok": true}')
        assert result.headers["Content-Type"].startswith("application/json")
        for path in ("/big", "/big-chunked"):
            with pytest.raises(UpstreamTooLarge, match="larger than 5120 bytes"):
                await fetch_small(f"http://127.0.0.1:{port}{path}", policy=LOOPBACK)
        assert (
            await fetch_small(f"http://127.0.0.1:{port}/big", policy=LOOPBACK, max_bytes=20_000)
        ).body == b"x" * 10_000
        with pytest.raises(UpstreamRedirect, match="not followed") as info:
            await fetch_small(f"http://127.0.0.1:{port}/redirect", policy=LOOPBACK)
        assert info.value.status == 302 and info.value.location == "/redirect-target"
        assert state.redirect_target_hits == 0
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await fetch_small(f"http://127.0.0.1:{port}/hang", policy=LOOPBACK, timeout=0.3)
        assert time.monotonic() - started < 2
        accepted = state.accepted
        with pytest.raises(UpstreamRefused):
            await fetch_small(f"http://127.0.0.1:{port}/json", policy=AddressPolicy.from_setting(""))
        with pytest.raises(UpstreamRefused, match="scheme"):
            await fetch_small("file:///etc/passwd", policy=LOOPBACK)
        assert state.accepted == accepted


def test_ipaddress_sanity() -> None:
    # The guard leans on the stdlib's tables; pin the facts it relies on.
    assert not ipaddress.ip_address("100.64.0.1").is_global
    assert ipaddress.ip_address("::ffff:10.0.0.1").ipv4_mapped == ipaddress.ip_address("10.0.0.1")


# --------------------------------------------------------------------------- response framing (issue 7)

HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OVERSIZE_FIELD = b"X-Big: " + b"v" * 70_000 + b"\r\n"

# (id, the upstream's exact bytes, expected): ("answer", status, reason, body) when it is
# a usable response; ("head", match) when the request fails with UpstreamProtocolError (the
# proxy's 502, at once); ("body", match) when the head is good and reading the body raises
# UpstreamStreamError.
FRAMING_TABLE = [
    ("well-formed", HEAD_OK, ("answer", 200, "OK", b"ok")),
    ("bare LF line endings", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", ("head", "Missing expected CR")),
    ("bare LF inside the fields", b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok", ("head", "malformed")),
    ("CR without LF", b"HTTP/1.1 200 OK\rContent-Length: 2\r\n\r\nok", ("head", "Expected LF after CR")),
    ("no reason phrase", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", ("answer", 200, "", b"ok")),
    ("empty reason phrase", b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", ("answer", 200, "", b"ok")),
    ("leading CRLFs", b"\r\n\r\n" + HEAD_OK, ("answer", 200, "OK", b"ok")),
    ("status 099", b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok", ("head", "status code 099 is outside 100-599")),
    ("status 600", b"HTTP/1.1 600 High\r\nContent-Length: 2\r\n\r\nok", ("head", "status code 600 is outside 100-599")),
    ("status of four digits", b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", ("head", "Invalid")),
    ("100 Continue, then the answer", b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD_OK, ("answer", 200, "OK", b"ok")),
    ("103 Early Hints, then the answer",
     b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
     ("answer", 201, "Created", b"ok")),
    ("eleven interim responses", b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + HEAD_OK,
     ("head", "more than 10 interim 1xx responses")),
    ("101 protocol switch", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
     ("head", "unexpected protocol switch")),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok", ("head", "malformed")),
    ("duplicate Content-Length, same value", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
     ("head", "Duplicate Content-Length")),
    ("duplicate Content-Length, two values", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nok",
     ("head", "Duplicate Content-Length")),
    ("Content-Length list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", ("head", "Content-Length")),
    ("negative Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok", ("head", "Content-Length")),
    ("Content-Length overflow", b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
     ("head", "Content-Length overflow")),
    ("Content-Length and Transfer-Encoding",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     ("head", "Transfer-Encoding can't be present with Content-Length")),
    ("Transfer-Encoding gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
     ("head", "unsupported Transfer-Encoding 'gzip'")),
    ("chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=1\r\nok\r\n1\r\n!\r\n0\r\n\r\n",
     ("answer", 200, "OK", b"ok!")),
    ("trailer fields are dropped",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: t\r\n\r\n",
     ("answer", 200, "OK", b"ok")),
    ("invalid chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
     ("body", "malformed body: Invalid character in chunk size")),
    ("negative chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n",
     ("body", "malformed body: Invalid character in chunk size")),
    ("chunk size overflow",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nok\r\n0\r\n\r\n",
     ("body", "malformed body: Chunk size overflow")),
    ("chunk without its CRLF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX0\r\n\r\n",
     ("body", "malformed body")),
    ("chunked body cut short", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nok",
     ("body", "broke off the body: connection closed")),
    ("Content-Length body cut short", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok",
     ("body", "broke off the body: connection closed")),
    ("oversize head", b"HTTP/1.1 200 OK\r\n" + OVERSIZE_FIELD + b"Content-Length: 2\r\n\r\nok",
     ("head", "response headers larger than 65536 bytes")),
    ("oversize head that never ends", b"HTTP/1.1 200 OK\r\n" + OVERSIZE_FIELD,
     ("head", "response headers larger than 65536 bytes")),
    ("NUL in a field value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
     ("head", "Invalid header value char")),
    ("NUL in a field name", b"HTTP/1.1 200 OK\r\nX\x00A: b\r\nContent-Length: 2\r\n\r\nok",
     ("head", "Invalid header token")),
    ("control character in a value", b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
     ("head", "Invalid header value char")),
    ("space before the colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", ("head", "Invalid header")),
    ("field without a colon", b"HTTP/1.1 200 OK\r\nGarbage\r\nContent-Length: 2\r\n\r\nok", ("head", "Invalid header")),
    ("HTTP/2.0 status line", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", ("head", "HTTP/2.0 is not HTTP/1.x")),
    ("HTTP/1.2 status line", b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok", ("head", "Invalid HTTP version")),
    ("RTSP status line", b"RTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", ("head", "not an HTTP/1.x response")),
    ("not HTTP at all", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", ("head", "not an HTTP/1.x response")),
    ("closed inside the head", b"HTTP/1.1 200 OK\r\nContent-Le", ("head", "in the middle of the response headers")),
    ("HTTP/1.0, body until the close", b"HTTP/1.0 200 OK\r\n\r\nuntil the end", ("answer", 200, "OK", b"until the end")),
]


@pytest.mark.parametrize("answer, expected", [row[1:] for row in FRAMING_TABLE], ids=[row[0] for row in FRAMING_TABLE])
@pytest.mark.gen_test
async def test_response_framing_table(answer: bytes, expected: tuple) -> None:
    """Issue 7, finding 13: every head is decided from its bytes, at once (never by the
    header timeout: 30 s here, past the test's own 5 s limit)."""
    async with raw_upstream(answer) as port:
        client = UpstreamClient(LOOPBACK, header_timeout=30)
        url = f"http://127.0.0.1:{port}/"
        if expected[0] == "head":
            with pytest.raises(UpstreamProtocolError, match=expected[1]) as info:
                await client.request("GET", url)
            assert not isinstance(info.value, UpstreamTimeout)
        else:
            response = await client.request("GET", url)
            if expected[0] == "body":
                with pytest.raises(UpstreamStreamError, match=expected[1]):
                    await response.read_all(1000)
            else:
                assert (response.status, response.reason) == expected[1:3]
                assert await response.read_all(1000) == expected[3]
                assert "X-Trailer" not in response.headers and "Link" not in response.headers
        client.close()


# --------------------------------------------------------------------------- pool safety (issue 7)

LEAK = b'{"jsonrpc":"2.0","id":1,"result":{"leak":"LEAK-MEANT-FOR-A"}}'
EXTRA_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(LEAK), LEAK)


def answer(body: bytes, *extra_fields: bytes) -> bytes:
    fields = b"".join(field + b"\r\n" for field in extra_fields)
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        fields, len(body), body)


# (id, the first answer on a connection, bytes the upstream writes when the next request
# arrives on it, before that request's own answer): after each, the next request must get
# its own answer on a new connection.
UNSAFE_TO_REUSE = [
    ("extra response right after the real one", answer(b'{"a":1}') + EXTRA_RESPONSE, b""),
    ("extra response sent with the next request", b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n"
     % len(EXTRA_RESPONSE), EXTRA_RESPONSE),
    ("204 with a body", b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(EXTRA_RESPONSE)
     + EXTRA_RESPONSE, b""),
    ("304 announcing chunked", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", EXTRA_RESPONSE),
    ("garbage after the body", answer(b'{"a":1}') + b"\x00garbage", b""),
    ("Connection: close", answer(b'{"a":1}', b"Connection: close"), EXTRA_RESPONSE),
    ("HTTP/1.0 without keep-alive", b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}", EXTRA_RESPONSE),
]


@pytest.mark.parametrize("first, before_next", [row[1:] for row in UNSAFE_TO_REUSE],
                         ids=[row[0] for row in UNSAFE_TO_REUSE])
@pytest.mark.gen_test
async def test_a_connection_is_reused_only_when_nothing_is_left_on_it(first: bytes, before_next: bytes) -> None:
    """Issue 7, finding 12: a pooled connection carries the next user's request; bytes left
    over from (or announced by) the previous response must never become its answer."""
    extra_written = asyncio.Event()

    async def script(exchange: RawExchange) -> None:
        if exchange.connection.number == 1 and exchange.number == 1:
            exchange.write(first)
            exchange.connection.before_next = before_next
            await exchange.drain()
            extra_written.set()
        else:
            exchange.write(answer(b'{"jsonrpc":"2.0","id":2,"result":{"for":"B"}}'))

    async with RawUpstream(script) as raw:
        client = UpstreamClient(LOOPBACK)
        response = await client.request("POST", f"{raw.url}/mcp", body=b"{}")
        await response.read_all(10_000)
        await extra_written.wait()
        response = await client.request("POST", f"{raw.url}/mcp", body=b"{}")
        body = await response.read_all(10_000)
        assert body == b'{"jsonrpc":"2.0","id":2,"result":{"for":"B"}}'
        assert b"LEAK" not in body
        assert client.stats.connections_opened == 2 and client.stats.reuses == 0
        assert raw.connections == 2
        assert [(e.connection.number, e.number) for e in raw.exchanges] == [(1, 1), (2, 1)]
        client.close()


@pytest.mark.gen_test
async def test_a_body_not_read_to_its_end_is_not_reused() -> None:
    async def script(exchange: RawExchange) -> None:
        exchange.write(answer(b"x" * 200_000 if exchange.number == 1 and exchange.connection.number == 1
                              else b'{"for":"B"}'))

    async with RawUpstream(script) as raw:
        client = UpstreamClient(LOOPBACK)
        response = await client.request("GET", f"{raw.url}/mcp")
        assert await response.read_chunk()
        response.close()  # the consumer gave up half way
        response = await client.request("GET", f"{raw.url}/mcp")
        assert await response.read_all(1000) == b'{"for":"B"}'
        assert client.stats.connections_opened == 2 and raw.connections == 2
        client.close()


@pytest.mark.gen_test
async def test_a_clean_keep_alive_connection_is_still_reused() -> None:
    async def script(exchange: RawExchange) -> None:
        exchange.write(answer(b'{"n":%d}' % exchange.number))

    async with RawUpstream(script) as raw:
        client = UpstreamClient(LOOPBACK)
        for number in (1, 2, 3):
            response = await client.request("POST", f"{raw.url}/mcp", body=b"{}")
            assert await response.read_all(100) == b'{"n":%d}' % number
        assert raw.connections == 1 and client.stats.reuses == 2
        client.close()


def test_hop_by_hop_names_include_what_connection_lists() -> None:
    names = hop_by_hop_names(["keep-alive, X-Secret", " Mcp-Private ,", ""])
    assert {"x-secret", "mcp-private", "keep-alive", "connection", "te", "upgrade"} <= names
    assert "" not in names and "content-type" not in names
