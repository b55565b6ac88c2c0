"""`UpstreamClient`: the proxy's pooled, SSRF-guarded, streaming HTTP/1.1 client (DNS cache,
keep-alive pool, connect, retry rules); framing is in http11, the response in response."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import select
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.common.cache import TtlCache
from services.proxy.upstream.errors import (
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from services.proxy.upstream.http11 import _READ_SIZE, _TOKEN, HeadersArg, _EarlyClose, _serialize_request
from services.proxy.upstream.policy import AddressPolicy, _refusal_reason
from services.proxy.upstream.response import UpstreamResponse
from services.proxy.upstream.urls import UpstreamTarget, parse_upstream_url

DNS_CACHE_SIZE = 1024  # upstream host names whose checked addresses are kept
NO_EXPIRY = float("inf")  # the TTL of an IP literal's entry
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(slots=True)
class UpstreamStats:
    """Counters of an `UpstreamClient`, so tests and benchmarks can observe pooling."""

    connections_opened: int = 0
    requests: int = 0
    reuses: int = 0
    retries: int = 0
    aborted: int = 0


FRESH_IDLE = 1.0  # seconds: a pooled connection idle for less is reused without a poll() (7 % of a call's CPU)


def _connection_is_dead(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float) -> bool:
    """True when an idle pooled connection must not be reused.

    An idle HTTP/1.1 connection has nothing to read: buffered bytes, an EOF, or a socket
    that polls readable (a FIN the loop has not processed yet) all disqualify it.
    poll() rather than select(): descriptors go far past FD_SETSIZE.
    """
    if writer.is_closing() or reader.at_eof() or len(getattr(reader, "_buffer", b"")):
        return True
    if idle < FRESH_IDLE:
        # Back in the pool this recently, it was not closed for idling (no server's
        # keep-alive timeout is this short); a FIN of a crash meanwhile is the retry's case.
        return False
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _set_keepalive(writer: asyncio.StreamWriter) -> None:
    # An SSE stream may stay idle for hours: TCP keep-alive probes find an upstream host
    # that vanished without a FIN (about 2 minutes here instead of the kernel's 2 hours).
    # (asyncio already sets TCP_NODELAY: requests leave in one write.)
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        pass


class UpstreamClient:
    """Pooled, SSRF-guarded, streaming HTTP/1.1 client for upstream MCP servers (see module doc)."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        max_per_origin: int = 64,
        connect_timeout: float = 10.0,
        header_timeout: float = 60.0,
        idle_timeout: float = 4.0,
        dns_ttl: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        max_header_size: int = 65536,
        dns_cache_size: int = DNS_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` times the DNS cache (tests advance it instead of waiting out the TTL)."""
        self.policy = policy
        self.max_per_origin = max_per_origin
        self.connect_timeout = connect_timeout
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.dns_ttl = dns_ttl
        self.max_header_size = max_header_size
        self.stats = UpstreamStats()
        self._ssl_context = ssl_context
        self._idle: dict[
            tuple[str, str, int, str], deque[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]
        ] = {}
        # The StreamReader's limit caps a header block and a chunk-size line, and sets
        # its flow control: past twice this many unread bytes it stops reading the socket.
        self._stream_limit = max(max_header_size, _READ_SIZE)
        # host -> (permitted addresses, the public ones among them); IP literals never expire.
        # Bounded: a process serving many upstream hosts keeps the recently used ones.
        self._dns = TtlCache(dns_cache_size, dns_ttl, clock=clock)
        self._dns_inflight: dict[tuple[str, int], asyncio.Task[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
        # Weak: a response its consumer dropped must stay collectable (its __del__ closes it).
        self._active: weakref.WeakSet[UpstreamResponse] = weakref.WeakSet()
        self._closed = False

    # ----------------------------------------------------------------- public API

    async def request(
        self,
        method: str,
        url: str,
        headers: HeadersArg = None,
        body: bytes | None = None,
        *,
        header_timeout: float | None = None,
        public_only: bool = False,
    ) -> UpstreamResponse:
        """Send one request and return once the response headers arrived.

        The caller must read the body to its end (b"" from `read_chunk`) or `close()` the
        response; ``async with`` does the latter. Hop-by-hop headers, ``Host`` and
        ``Content-Length`` in `headers` are replaced by the client's own.

        `public_only`: connect to public unicast addresses only, whatever the allow-list
        says (a server no administrator approved for internal upstreams): a name that now
        resolves only inward raises `UpstreamRefused`; of a name resolving both ways only
        the public addresses are used, pooled connections included.
        """
        if self._closed:
            raise UpstreamUnreachable("upstream client is closed")
        target = parse_upstream_url(url)
        method = method.upper()
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"invalid HTTP method {method!r}")
        payload = _serialize_request(method, target, headers, body)
        self.stats.requests += 1
        addresses, public = await self._resolve(target.host, target.port)
        if public_only and public is not addresses:
            if not public:
                raise UpstreamRefused(_public_only_refusal(target.host, addresses))
            addresses = public
        timeout = self.header_timeout if header_timeout is None else header_timeout
        retried = False
        while True:
            reader, writer, ip, reused = await self._checkout(target, addresses)
            response = UpstreamResponse(
                self, reader, writer, (target.scheme, target.host, target.port, ip), method
            )
            try:
                await response._exchange(payload, timeout)
            except _EarlyClose as exc:
                # A pooled connection the upstream closed meanwhile. Replaying is safe when
                # nothing was sent, or for idempotent methods (RFC 9110 §9.2.2).
                if reused and not retried and (not exc.sent or method in _IDEMPOTENT):
                    retried = True
                    self.stats.retries += 1
                    continue
                raise UpstreamUnreachable(
                    f"upstream {target.host_header} ({ip}) closed the connection before answering"
                ) from exc.__cause__
            return response

    def idle_connections(self) -> int:
        """How many keep-alive connections sit in the pool now."""
        return sum(len(q) for q in self._idle.values())

    def close(self, *, abort_active: bool = True) -> None:
        """Close pooled connections (and, by default, abort every response in flight)."""
        self._closed = True
        for queue in self._idle.values():
            for entry in queue:
                entry[1].transport.abort()
        self._idle.clear()
        if abort_active:
            for response in list(self._active):
                response.close()

    # ----------------------------------------------------------------- DNS

    async def _resolve(self, host: str, port: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(addresses the policy permits, the public ones among them: the same tuple
        object when all are public, so the public-only check costs nothing then)."""
        cached = self._dns.get(host)
        if cached is not None:
            return cached
        key = (host, port)
        lookup = self._dns_inflight.get(key)
        if lookup is None:
            # Single flight in a task of its own: a burst of calls to a cold host costs one
            # lookup, and a caller that gives up (cancelled) does not fail the others.
            lookup = asyncio.get_running_loop().create_task(self._lookup(host, port))
            self._dns_inflight[key] = lookup
            lookup.add_done_callback(functools.partial(self._lookup_done, key))
        return await asyncio.shield(lookup)

    def _lookup_done(
        self, key: tuple[str, int], lookup: asyncio.Task[tuple[tuple[str, ...], tuple[str, ...]]]
    ) -> None:
        self._dns_inflight.pop(key, None)
        if not lookup.cancelled():
            lookup.exception()  # retrieved: the callers that still wait get it re-raised

    async def _lookup(self, host: str, port: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses = await self.policy.resolve(host, port)
        except TimeoutError:
            raise UpstreamTimeout(
                f"DNS lookup of upstream host {host!r} timed out after {self.connect_timeout:g}s"
            ) from None
        is_literal = addresses == (host,)  # never changes: no expiry
        public = tuple(a for a in addresses if _refusal_reason(ipaddress.ip_address(a)) is None)
        if len(public) == len(addresses):
            public = addresses
        self._dns.set(host, (addresses, public), NO_EXPIRY if is_literal else None)
        return addresses, public

    # ----------------------------------------------------------------- pool

    async def _checkout(
        self, target: UpstreamTarget, addresses: tuple[str, ...]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, bool]:
        now = time.monotonic()
        for ip in addresses:
            queue = self._idle.get((target.scheme, target.host, target.port, ip))
            while queue:
                # Most recently used first: the fewest connections stay warm, the rest expire.
                reader, writer, since = queue.pop()
                idle = now - since
                if idle > self.idle_timeout or _connection_is_dead(reader, writer, idle):
                    writer.transport.abort()
                    continue
                self.stats.reuses += 1
                return reader, writer, ip, True
        reader, writer, ip = await self._connect(target, addresses)
        return reader, writer, ip, False

    async def _connect(
        self, target: UpstreamTarget, addresses: tuple[str, ...]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        errors: list[str] = []
        tls = self._tls_context() if target.scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                for ip in addresses:
                    try:
                        # An IP literal: asyncio connects to exactly this address, no lookup.
                        # SNI and certificate check use the URL's host name.
                        reader, writer = await asyncio.open_connection(
                            ip,
                            target.port,
                            ssl=tls,
                            server_hostname=target.host if tls is not None else None,
                            limit=self._stream_limit,
                        )
                    except ssl.SSLError as exc:  # before OSError: SSLError is one
                        raise UpstreamUnreachable(
                            f"TLS handshake with upstream {target.host_header} ({ip}) failed: {exc}"
                        ) from None
                    except OSError as exc:
                        errors.append(f"{ip}: {exc.strerror or exc}")
                        continue
                    _set_keepalive(writer)
                    self.stats.connections_opened += 1
                    return reader, writer, ip
        except TimeoutError:
            raise UpstreamTimeout(
                f"connecting to upstream {target.host_header} timed out after {self.connect_timeout:g}s"
            ) from None
        raise UpstreamUnreachable(f"cannot connect to upstream {target.host_header}: {'; '.join(errors)}")

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    def _release(
        self, key: tuple[str, str, int, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closed or self.max_per_origin <= 0 or writer.is_closing() or len(reader._buffer):
            # (Bytes already buffered past the end of the response: never pooled. The
            # checkout check catches what arrives later.)
            writer.transport.abort()
            return
        queue = self._idle.get(key)
        if queue is None:
            queue = self._idle[key] = deque()
        now = time.monotonic()
        while queue and now - queue[0][2] > self.idle_timeout:
            queue.popleft()[1].transport.abort()
        if len(queue) >= self.max_per_origin:
            writer.transport.abort()
            return
        # asyncio keeps reading idle sockets, so an upstream's FIN shows up as at_eof()
        # by the time the connection is checked out again.
        queue.append((reader, writer, now))


def _public_only_refusal(host: str, addresses: tuple[str, ...]) -> str:
    reasons = "; ".join(f"{a} is {_refusal_reason(ipaddress.ip_address(a))}" for a in addresses)
    via = "" if addresses == (host,) else f" ({host} resolves there)"
    return (
        f"upstream address {reasons}{via}: refused by the address policy for this server, which may reach "
        "public addresses only (internal upstreams allowed by MCPGW_UPSTREAM_ALLOW are for servers an "
        "administrator or the CLI registered or last pointed there)"
    )
