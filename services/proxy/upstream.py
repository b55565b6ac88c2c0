"""HTTP client to upstream MCP servers: SSRF guard, small-document fetches, pooled streaming client.

Three things live here, all async on Tornado's (asyncio) loop, none blocking it:

``AddressPolicy`` (the SSRF guard)
    Built from ``MCPGW_UPSTREAM_ALLOW`` (``AddressPolicy.from_setting("127.0.0.0/8,10.1.2.3,mcp.internal")``).
    ``check_ip(ip)`` raises `UpstreamRefused` for anything that is not a public unicast
    address (private, loopback, link-local, multicast, reserved, unspecified, CGNAT,
    benchmarking, documentation, site-local, the IPv4 inside IPv4-mapped / NAT64 / 6to4
    IPv6 addresses …) unless an allow-list entry covers it. Cloud metadata addresses
    (169.254.169.254, fd00:ec2::254, …) are only allowed by an entry naming exactly that
    address: a broad range or a host name never unlocks them. A host name entry
    (``mcp.internal``, ``*.corp.example``) lets that name reach whatever it resolves to.
    ``await policy.resolve(host, port)`` resolves once and returns the permitted addresses;
    the client connects to exactly those addresses and never resolves the name again
    (no DNS-rebinding window). URLs must be http(s), with a host and no userinfo.

``fetch_small(url, *, policy, max_bytes=5120, timeout=5.0, headers=None) -> SmallResponse``
    One guarded GET for small documents (client ID metadata documents): no redirects (a
    3xx raises `UpstreamRedirect`), the read is aborted past ``max_bytes``, one overall
    timeout. Every failure is an `UpstreamError` subclass with a message fit for a log.

``UpstreamClient`` (the proxy hot path)::

    client = UpstreamClient(policy, max_per_origin=64, connect_timeout=10, header_timeout=60)
    resp = await client.request(method, url, headers, body)  # returns once headers arrived
    resp = await client.request(..., public_only=True)       # public addresses only, allow-list or not
    resp.status, resp.reason, resp.headers                  # ResponseHeaders (case-insensitive)
    async for chunk in resp.iter_chunks(): ...               # body bytes as they arrive
    chunk = await resp.read_chunk()                          # same, b"" at the end
    body = await resp.read_all(limit)                        # whole body, UpstreamTooLarge past limit
    resp.close()                                             # abort: the connection is closed, not pooled
    async with await client.request(...) as resp: ...        # close() on exit
    client.stats.connections_opened / .requests / .reuses    # keep-alive is observable
    client.close()                                           # closes idle (and by default active) connections

  HTTP/1.1 on asyncio streams (the transports Tornado's own loop runs on), each
  response, head and body, framed by llhttp through ``httptools`` (bench/head_parse.py:
  about a tenth of the hand-written head parser it replaced, which also hung on bare-LF
  heads and let status 099 and 600 through). Chosen by measurement against the same
  pooling on Tornado's ``IOStream`` and ``HTTP1Connection``, aiohttp, curl_httpclient and
  simple_httpclient (bench/README.md, "Upstream HTTP client choice").

  - Pool: idle keep-alive connections per (scheme, host, port, resolved ip), at most
    ``max_per_origin`` idle ones per origin (like nginx ``keepalive N``). Active
    connections are not capped: an SSE stream holds its connection for its whole life and
    one process must hold thousands of them; a cap would starve every other call to that
    upstream. Idle connections are dropped after ``idle_timeout`` (4 s, below the 5 s
    keep-alive of uvicorn and Node, the usual MCP server stacks).
  - Reuse: a pooled connection carries one user's request after another's, so a byte
    left over from one response must never be read as the answer to the next. A
    connection goes back to the pool only after a response whose end was certain (a
    length or chunked framing read to its end, keep-alive, nothing after it), never after
    ``Connection: close``, HTTP/1.0 without keep-alive, a body delimited by the close, a
    HEAD response, a 204/304 announcing a length or a coding, a body the caller did not
    read to its end, or bytes past the end. At checkout it must have nothing unread:
    empty buffer, not at EOF, socket not readable.
  - Body: handed over as it arrives (whatever one read of the socket completed) when
    the consumer asks, so an SSE event is relayed the moment it arrives; past 128 KiB
    unread, reading the socket pauses, so a slow downstream slows the upstream through
    TCP flow control instead of piling up in memory. Transfer coding (chunked) is
    removed, content coding is not.
  - Timeouts: ``connect_timeout`` covers DNS, TCP and TLS; ``header_timeout`` runs from
    sending the request to the response headers. There is no read timeout once headers
    arrived: an idle SSE stream lives until either side closes it (TCP keep-alive probes
    find a vanished upstream host).
  - Cancellation: ``resp.close()`` (or cancelling the task awaiting ``request``) closes
    the upstream connection at once, so the upstream sees its client go away.
  - Retries: a request that fails on a reused connection before any response header is
    replayed once on a new connection only if nothing was sent or the method is
    idempotent (RFC 9110 §9.2.2); a POST that reached the upstream is never replayed.
  - TLS: certificates verified against the system store (or ``ssl_context``); SNI and
    certificate name are the URL's host although the socket connects to the checked IP.

Errors: `UpstreamUnreachable` (DNS failure, refused connection, TLS failure, connection
closed before headers → the proxy answers 502), `UpstreamRefused(UpstreamUnreachable)`
(SSRF guard, bad URL → 502), `UpstreamTimeout` (connect or header timeout → 504),
`UpstreamStreamError` (connection lost after the headers, while the body streams),
`UpstreamProtocolError(UpstreamUnreachable)` (a head llhttp or the rules above refuse →
502 at once), `UpstreamTooLarge`,
`UpstreamRedirect` (fetch_small only).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import select
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn
from urllib.parse import urlsplit

import httptools
from tornado import httputil

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HeadersArg = Mapping[str, str] | Iterable[tuple[str, str]] | httputil.HTTPHeaders | None

__all__ = [
    "AddressPolicy",
    "ResponseHeaders",
    "SmallResponse",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRedirect",
    "UpstreamRefused",
    "UpstreamResponse",
    "UpstreamStats",
    "UpstreamStreamError",
    "UpstreamTimeout",
    "UpstreamTooLarge",
    "UpstreamUnreachable",
    "fetch_small",
    "hop_by_hop_names",
    "parse_upstream_url",
]


# --------------------------------------------------------------------------- errors


class UpstreamError(Exception):
    """Base class of every failure talking to an upstream; the message is safe to log."""


class UpstreamUnreachable(UpstreamError):
    """No usable response: DNS failure, refused connection, TLS failure, early close (→ 502)."""


class UpstreamRefused(UpstreamUnreachable):
    """Refused before any traffic: the SSRF guard or an unusable URL (→ 502)."""


class UpstreamProtocolError(UpstreamUnreachable):
    """The upstream answered something that is not HTTP/1.x (→ 502)."""


class UpstreamTimeout(UpstreamError):
    """No connection or no response headers within the configured time (→ 504)."""


class UpstreamStreamError(UpstreamError):
    """The connection was lost after the headers, while the body was streaming."""


class UpstreamTooLarge(UpstreamError):
    """A body exceeded the caller's size limit; the read was aborted."""


class UpstreamRedirect(UpstreamError):
    """A small-document fetch got a 3xx; redirects are never followed."""

    def __init__(self, message: str, status: int, location: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.location = location


# --------------------------------------------------------------------------- SSRF guard

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Cloud instance-metadata endpoints: the prize of most SSRF attacks. Refused unless an
# allow-list entry names exactly this address.
_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean …
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server (a public address!)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS DNS over IPv6
    )
)

# Ranges that ipaddress's is_global/is_private/is_reserved (3.11) let through although
# they are not ordinary public unicast destinations.
_EXTRA_BLOCKED: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    _V4("100.64.0.0/10"),  # CGNAT shared address space (RFC 6598)
    _V4("192.0.0.0/24"),  # IETF protocol assignments
    _V4("192.0.2.0/24"),  # TEST-NET-1
    _V4("198.18.0.0/15"),  # benchmarking
    _V4("198.51.100.0/24"),  # TEST-NET-2
    _V4("203.0.113.0/24"),  # TEST-NET-3
    _V4("192.88.99.0/24"),  # deprecated 6to4 relay anycast
    _V6("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
    _V6("100::/64"),  # discard-only
    _V6("2001::/23"),  # IETF protocol assignments incl. Teredo
    _V6("2001:db8::/32"),  # documentation
    _V6("fec0::/10"),  # deprecated site-local
)
_NAT64 = _V6("64:ff9b::/96")
_SIX_TO_FOUR = _V6("2002::/16")
_HOSTNAME_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really reaches (mapped, NAT64, 6to4), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def _refusal_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast destination, or None when it is one."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        reason = _refusal_reason(inner)
        return None if reason is None else f"{reason} (IPv4 {inner} inside IPv6)"
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    for net in _EXTRA_BLOCKED:
        if ip.version == net.version and ip in net:
            return f"in the non-public range {net}"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


class AddressPolicy:
    """Which addresses upstream connections may reach: the public internet plus an allow-list.

    Immutable once built; `UpstreamClient` caches its decisions per host.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        exact: set[IPAddress] = set()
        hosts: set[str] = set()
        suffixes: list[str] = []
        for raw in allow:
            entry = raw.strip()
            if not entry:
                continue
            network = self._parse_network(entry)
            if network is not None:
                networks.append(network)
                if network.num_addresses == 1:
                    exact.add(network.network_address)
                continue
            name = _normalize_host(entry)
            wildcard = name.startswith("*.")
            bare = name[2:] if wildcard else name
            labels = bare.split(".")
            if not bare or any(not label or not set(label) <= _HOSTNAME_LABEL_CHARS for label in labels):
                raise ValueError(
                    f"upstream allow-list entry {raw!r} is neither a CIDR, an IP address nor a host name"
                )
            if wildcard:
                suffixes.append("." + bare)
            else:
                hosts.add(bare)
        self._networks = tuple(networks)
        self._exact = frozenset(exact)
        self._hosts = frozenset(hosts)
        self._suffixes = tuple(suffixes)

    @classmethod
    def from_setting(cls, value: str | None) -> AddressPolicy:
        """Build from the comma/space separated ``MCPGW_UPSTREAM_ALLOW`` value (empty = public only)."""
        return cls((value or "").replace(",", " ").split())

    @staticmethod
    def _parse_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        text = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
        try:
            # Host bits are tolerated ("10.1.2.3/24" means 10.1.2.0/24), as config.py does.
            return ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            if "/" in text or ":" in text or text.replace(".", "").isdigit():
                # Looks like an address or CIDR but is not one: a typo here would silently
                # widen or narrow the guard, so refuse to start.
                raise ValueError(f"upstream allow-list entry {entry!r} is not a valid CIDR: {exc}") from None
            return None

    def __repr__(self) -> str:
        entries = [str(n) for n in self._networks] + sorted(self._hosts) + ["*" + s for s in self._suffixes]
        return f"AddressPolicy(allow={entries!r})"

    def allows_host(self, host: str) -> bool:
        """True when `host` is allow-listed by name (then any address it resolves to is fine)."""
        name = _normalize_host(host)
        return name in self._hosts or any(name.endswith(s) for s in self._suffixes)

    def _allowed_by_network(self, ip: IPAddress) -> bool:
        candidates = [ip]
        inner = _embedded_ipv4(ip)
        if inner is not None:
            candidates.append(inner)
        for candidate in candidates:
            if candidate in _METADATA_ADDRESSES:
                # Only an entry naming exactly this address unlocks a metadata endpoint.
                if candidate in self._exact:
                    return True
                continue
            for net in self._networks:
                if candidate.version == net.version and candidate in net:
                    return True
        return False

    def refusal(self, ip: str | IPAddress, host: str | None = None) -> str | None:
        """The reason `ip` (reached via `host`) is refused, or None when it is permitted."""
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        if self._allowed_by_network(addr):
            return None
        reason = _refusal_reason(addr)
        if reason is None:
            return None
        if host is not None and self.allows_host(host):
            inner = _embedded_ipv4(addr) or addr
            if inner not in _METADATA_ADDRESSES:
                return None
        return reason

    def check_ip(self, ip: str | IPAddress, host: str | None = None) -> None:
        """Raise `UpstreamRefused` unless `ip` may be connected to (`host`: the name it came from)."""
        reason = self.refusal(ip, host)
        if reason is not None:
            via = f" ({host} resolves there)" if host is not None and host != str(ip) else ""
            raise UpstreamRefused(
                f"upstream address {ip}{via} is refused: it is {reason}; "
                f"allow it with MCPGW_UPSTREAM_ALLOW if it is meant to be reachable"
            )

    async def resolve(self, host: str, port: int) -> tuple[str, ...]:
        """Resolve `host` once and return the permitted addresses, in resolver order.

        Addresses the policy refuses are dropped (a name may resolve to a public and a
        private address; only the permitted ones are ever connected to). Raises
        `UpstreamRefused` when none is permitted, `UpstreamUnreachable` when DNS fails.
        """
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            self.check_ip(literal)
            return (str(literal),)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise UpstreamUnreachable(f"DNS lookup of upstream host {host!r} failed: {exc}") from None
        permitted: list[str] = []
        reasons: list[str] = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            reason = self.refusal(ip, host)
            text = str(ip)
            if reason is None:
                if text not in permitted:
                    permitted.append(text)
            else:
                reasons.append(f"{text} is {reason}")
        if permitted:
            return tuple(permitted)
        if not reasons:
            raise UpstreamUnreachable(f"DNS lookup of upstream host {host!r} returned no usable address")
        raise UpstreamRefused(
            f"upstream host {host!r} is refused: {'; '.join(reasons)}; "
            f"allow it with MCPGW_UPSTREAM_ALLOW if it is meant to be reachable"
        )


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """A checked upstream URL split into what a connection and a request line need."""

    scheme: str
    host: str  # lower-case, IDNA-encoded, IPv6 without brackets: for DNS, SNI and the pool key
    port: int
    host_header: str
    path: str  # path + query, never empty


_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=1024)
def parse_upstream_url(url: str) -> UpstreamTarget:
    """Validate and split an upstream URL; raise `UpstreamRefused` for anything unusable.

    Only http/https, a host is required, userinfo is refused (``http://a@b/`` has fooled
    URL parsers into connecting elsewhere), whitespace and control characters are refused.
    Cached: the proxy sends the same few URLs over and over.
    """
    if not isinstance(url, str) or not url:
        raise UpstreamRefused("upstream URL is empty")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise UpstreamRefused("upstream URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UpstreamRefused(f"upstream URL {url!r} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UpstreamRefused(f"upstream URL scheme {parts.scheme!r} is refused: only http and https")
    if "@" in parts.netloc:
        raise UpstreamRefused("upstream URL must not carry userinfo (user:password@)")
    host = parts.hostname or ""
    if not host:
        raise UpstreamRefused(f"upstream URL {url!r} has no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UpstreamRefused(f"upstream URL host {parts.hostname!r} is not a valid host name") from None
    host = host.rstrip(".") or host
    is_v6 = ":" in host
    host_header = f"[{host}]" if is_v6 else host
    if port is not None:
        host_header += f":{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return UpstreamTarget(
        scheme, host, port if port is not None else _DEFAULT_PORTS[scheme], host_header, path
    )


# --------------------------------------------------------------------------- client

# Headers the client owns (framing, connection management) or that describe one hop only.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def hop_by_hop_names(connection_values: Iterable[str]) -> frozenset[str]:
    """Lower-case names of the fields that describe one hop only, given the values of a
    message's Connection field(s): the fixed set plus every name the Connection field
    lists (RFC 9110 §7.6.1). A proxy forwards none of them, in either direction."""
    named = {token.strip().lower() for value in connection_values for token in value.split(",")}
    named.discard("")
    return _HOP_BY_HOP | named if named else _HOP_BY_HOP


_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_READ_SIZE = 65536
_MAX_1XX = 10


@dataclass(slots=True)
class UpstreamStats:
    """Counters of an `UpstreamClient`, so tests and benchmarks can observe pooling."""

    connections_opened: int = 0
    requests: int = 0
    reuses: int = 0
    retries: int = 0
    aborted: int = 0


def _connection_is_dead(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True when an idle pooled connection must not be reused.

    An idle HTTP/1.1 connection has nothing to read: buffered bytes, an EOF, or a socket
    that polls readable (a FIN the loop has not processed yet) all disqualify it.
    poll() rather than select(): descriptors go far past FD_SETSIZE.
    """
    if writer.is_closing() or reader.at_eof() or len(getattr(reader, "_buffer", b"")):
        return True
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


def _header_items(headers: HeadersArg) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, httputil.HTTPHeaders):
        return list(headers.get_all())
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _serialize_request(method: str, target: UpstreamTarget, headers: HeadersArg, body: bytes | None) -> bytes:
    """The request head (and body) as bytes, ready for one write.

    Framing headers are the client's own; hop-by-hop headers of the caller are dropped;
    names must be tokens and values must not contain CR, LF or NUL (no header injection).
    """
    items = _header_items(headers)
    dropped = hop_by_hop_names(value for name, value in items if name.lower() == "connection")
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host_header}"]
    for name, value in items:
        if name.lower() in dropped:
            continue
        if not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"invalid upstream request header {name!r}")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    elif method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    try:
        head = "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("upstream request headers must be latin-1") from None
    return head + body if body else head


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
    ) -> None:
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
        # host -> (expiry, permitted addresses, the public ones among them)
        self._dns: dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]] = {}
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
        if cached is not None and cached[0] > time.monotonic():
            return cached[1], cached[2]
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
        self._dns[host] = (float("inf") if is_literal else time.monotonic() + self.dns_ttl, addresses, public)
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
                if now - since > self.idle_timeout or _connection_is_dead(reader, writer):
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


class _EarlyClose(Exception):
    """Internal: the connection closed before response headers (maybe a stale pooled one)."""

    def __init__(self, sent: bool) -> None:
        super().__init__("connection closed before response headers")
        self.sent = sent


class _Malformed(Exception):
    """Internal: llhttp or a rule of ours refused the response; the message says why."""


class _Stop(Exception):
    """Internal: raised inside a parser callback to stop llhttp; the reason is on `_Parse`."""


class ResponseHeaders(Mapping[str, str]):
    """The header fields of an upstream response, read-only, names case-insensitive.

    A field sent on several lines reads as its values joined with ", " (RFC 9110 §5.3);
    `get_list` gives them apart and `get_all` the lines as received. llhttp has already
    refused names that are not tokens and values with control characters, so nothing is
    validated again here (that was most of the cost of a head in tornado.httputil).
    """

    __slots__ = ("_fields", "_index")

    def __init__(self, fields: list[tuple[str, str]], index: dict[str, list[str]] | None = None) -> None:
        """`fields` as received; `index` (lower-case name → values), when the caller built it already."""
        self._fields = fields
        if index is None:
            index = {}
            for name, value in fields:
                index.setdefault(name.lower(), []).append(value)
        self._index = index

    def __getitem__(self, name: str) -> str:
        values = self._index[name.lower()]
        return values[0] if len(values) == 1 else ", ".join(values)

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        # Not Mapping.get: a missing field is the common case, and KeyError is costly.
        values = self._index.get(name.lower())
        if values is None:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def get_list(self, name: str) -> list[str]:
        """Every value of field `name`, one per line it was sent on."""
        return list(self._index.get(name.lower(), ()))

    def get_all(self) -> Iterator[tuple[str, str]]:
        """(name, value) per header line, in the order received."""
        return iter(self._fields)

    def __repr__(self) -> str:
        return f"ResponseHeaders({self._fields!r})"


class _Parse:
    """What llhttp (via httptools) reports about one response, and what may follow it.

    llhttp does the framing: line endings (CRLF only: a bare LF is refused at once rather
    than waited on), the status line, field syntax (no obs-fold, no NUL or other control
    characters, no space before the colon), Content-Length (digits only, one value, not
    together with Transfer-Encoding), chunk sizes, and the end of the body. On top of it:
    only HTTP/1.0 and 1.1, status 100-599, interim 1xx heads skipped (at most _MAX_1XX),
    trailer fields dropped, and whether the connection may carry another request.
    """

    # Defaults on the class: one is made per upstream response, and most stay as they are.
    head_size = 0
    reason = b""
    status = 0
    version = ""
    headers: ResponseHeaders | None = None
    content_length: int | None = None
    interim = 0
    began = False  # a response (or garbage) started: an early close is not a clean one
    head_done = False
    complete = False
    until_close = False  # no length and not chunked: the body ends when the connection does
    reusable = False
    extra = False  # bytes followed the end of the response
    failure: str | None = None  # why the head is refused
    broken: str | None = None  # why the body is, once the head was good

    def __init__(self, method: str, max_head: int) -> None:
        # The parser refers back to this object (its callbacks): UpstreamResponse breaks
        # the cycle when the response ends, so nothing waits for the cyclic collector.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.method = method
        self.max_head = max_head
        self.fields: list[tuple[str, str]] = []
        self.index: dict[str, list[str]] = {}  # lower-case name → values, for ResponseHeaders
        self.body: list[bytes] = []  # body bytes parsed and not yet handed to the consumer

    def fail(self, reason: str) -> NoReturn:
        self.failure = reason
        raise _Stop

    # ----------------------------------------------------------------- llhttp callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # Something after the end of the response: an answer nobody asked for (the next
            # request's caller would get it) or garbage. Stop; the connection is closed.
            self.extra = True
            raise _Stop
        self.began = True

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # trailer fields after a chunked body: dropped
        self.head_size += len(name) + len(value) + 4
        text = name.decode("latin-1")
        value_text = value.decode("latin-1").rstrip(" \t")
        self.fields.append((text, value_text))
        key = text.lower()
        values = self.index.get(key)
        if values is None:
            self.index[key] = [value_text]
        else:
            values.append(value_text)

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self.fail(f"HTTP/{version} is not HTTP/1.x")
        if self.head_size > self.max_head:
            self.fail(f"response headers larger than {self.max_head} bytes")
        if not 100 <= status <= 599:
            self.fail(f"status code {status:03d} is outside 100-599")
        if status < 200:
            if status == 101:
                self.fail("unexpected protocol switch (101)")
            self.interim += 1
            if self.interim > _MAX_1XX:
                self.fail(f"more than {_MAX_1XX} interim 1xx responses")
            self.fields, self.index, self.head_size, self.reason = [], {}, 0, b""
            return  # llhttp ends this interim message and parses the next head
        headers = ResponseHeaders(self.fields, self.index)
        transfer_encoding = headers.get("Transfer-Encoding")
        if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
            # Another transfer coding (gzip, "gzip, chunked" …) would reach the client
            # undecoded under a content type that does not say so.
            self.fail(f"unsupported Transfer-Encoding {transfer_encoding!r}")
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None  # llhttp checked the digits
        self.status, self.version, self.headers, self.head_done = status, "HTTP/" + version, headers, True
        no_body = self.method == "HEAD" or status in (204, 304)
        self.until_close = not no_body and transfer_encoding is None and length is None
        # Reuse only when the framing leaves no doubt where this response ends: never a
        # body-less status or HEAD that still announces a length or a coding, never one
        # delimited by the close, never Connection: close or HTTP/1.0 without keep-alive.
        self.reusable = (
            parser.should_keep_alive()
            and not self.until_close
            and not (no_body and (length is not None or transfer_encoding is not None))
        )
        if self.method == "HEAD":
            # llhttp does not know the request method and would wait for the body the
            # head describes; the response ends here, and its connection is not reused.
            self.reusable = False
            self.complete = True
            raise _Stop

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.head_done:  # an interim 1xx ends too, with the final head still to come
            self.complete = True

    def feed(self, data: bytes) -> None:
        """Hand bytes to llhttp. A broken head raises `_Malformed`; a broken body sets
        `broken` (the body parsed before the fault is still delivered first)."""
        parser = self.parser
        if parser is None or self.broken is not None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise _Malformed("unexpected protocol switch") from None
        except httptools.HttpParserError as exc:
            if self.failure is not None:
                raise _Malformed(self.failure) from None
            if self.complete:
                self.extra = True  # garbage after the end: the response stands, the connection goes
            elif self.head_done:
                self.broken = str(exc) or type(exc).__name__
            else:
                raise _Malformed(str(exc) or type(exc).__name__) from None


class UpstreamResponse:
    """One upstream response: status and headers now, the body as the consumer reads it.

    The body is read when the consumer asks (`read_chunk`), and asyncio stops reading
    the socket once 128 KiB wait unread, so a slow downstream slows the upstream through
    TCP flow control and nothing piles up here. One consumer at a time; cancelling a
    `read_chunk` in the middle leaves the body unusable: `close()` the response then.
    """

    status: int
    reason: str
    version: str
    headers: ResponseHeaders  # set, with the three above, before request() returns

    def __init__(
        self,
        client: UpstreamClient,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        key: tuple[str, str, int, str],
        method: str,
    ) -> None:
        self._client = client
        self._reader = reader
        self._writer: asyncio.StreamWriter | None = writer
        self._key = key
        self._parse = _Parse(method, client.max_header_size)
        self._lead: bytes | None = b""  # the first bytes, until they show "HTTP/"
        self._done = False
        self._aborted = False
        self._timed_out = False

    # ----------------------------------------------------------------- consumer API

    @property
    def finished(self) -> bool:
        """True once the whole body was read (the connection went back to the pool or was closed)."""
        return self._done

    async def read_chunk(self) -> bytes:
        """The next body bytes as they arrive from the upstream, b"" at the end of the body.

        Raises `UpstreamStreamError` when the upstream connection breaks mid-body (or sends
        a malformed chunked body). After `close()` it returns b"".
        """
        parse = self._parse
        while True:
            if self._aborted:
                return b""
            if parse.body:
                pieces = parse.body
                parse.body = []
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if parse.broken is not None:
                return self._broken(f"sent a malformed body: {parse.broken}")
            if parse.complete:
                # Only now, with every byte handed over, may the connection serve another
                # request: a body the consumer gives up on closes it (close()).
                if not self._done:
                    self._finish()
                return b""
            if self._writer is None:
                return b""  # already failed
            try:
                data = await self._reader.read(_READ_SIZE)
            except ConnectionError as exc:
                return self._broken(f"broke off the body: {exc}")
            if not data:
                if self._aborted:
                    return b""
                if parse.until_close:
                    self._finish()  # the close is the end of this body
                    return b""
                return self._broken("broke off the body: connection closed")
            parse.feed(data)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield body bytes as they arrive; raises `UpstreamStreamError` if the upstream dies."""
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return
            yield chunk

    async def read_all(self, limit: int) -> bytes:
        """The whole body; `UpstreamTooLarge` (and the connection closed) past `limit` bytes."""
        length = self._parse.content_length
        if length is not None and length > limit and not self._done:
            self.close()
            raise UpstreamTooLarge(f"upstream body of {length} bytes exceeds the limit of {limit} bytes")
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                self.close()
                raise UpstreamTooLarge(f"upstream body exceeds the limit of {limit} bytes")
            parts.append(chunk)

    def close(self) -> None:
        """Abort: close the upstream connection now, unless the body was already complete.

        Safe at any time and more than once. The upstream sees the connection close at once,
        which is how an MCP server learns that its client went away.
        """
        if self._done or self._aborted:
            return
        self._aborted = True
        self._client.stats.aborted += 1
        self._abort_connection()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net for a response dropped without close(): never leak the socket.
        writer = getattr(self, "_writer", None)
        if writer is not None and not self._done:
            try:
                writer.transport.abort()
            except Exception:  # the loop may be gone already (interpreter shutdown)
                pass

    # ----------------------------------------------------------------- the exchange

    async def _exchange(self, payload: bytes, timeout: float) -> None:
        """Send the request and read the response head; raises _EarlyClose if the connection
        closed before a response began (the request's retry decision needs that)."""
        writer = self._writer
        assert writer is not None
        client = self._client
        client._active.add(self)
        if writer.is_closing():
            self._abort_connection()
            raise _EarlyClose(sent=False)
        writer.write(payload)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, self._on_header_timeout) if timeout > 0 else None
        reader = self._reader
        parse = self._parse
        host = self._key[1]
        received = 0
        try:
            while not parse.head_done:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise ConnectionResetError("closed")
                received += len(data)
                self._check_lead(data)
                parse.feed(data)
                if not parse.head_done and received > client.max_header_size:
                    raise _Malformed(f"response headers larger than {client.max_header_size} bytes")
        except _Malformed as exc:
            self._abort_connection()
            raise UpstreamProtocolError(f"upstream {host} sent a malformed response: {exc}") from None
        except ConnectionError as exc:
            self._abort_connection()
            if self._timed_out:
                raise UpstreamTimeout(
                    f"upstream {host} sent no response headers within {timeout:g}s"
                ) from None
            if parse.began:
                raise UpstreamProtocolError(
                    f"upstream {host} closed the connection in the middle of the response headers"
                ) from None
            raise _EarlyClose(sent=True) from exc
        except BaseException:
            # Cancellation included: the downstream went away while we waited.
            self._abort_connection()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self.status = parse.status
        self.reason = parse.reason.decode("latin-1")
        self.version = parse.version
        assert parse.headers is not None
        self.headers = parse.headers
        if parse.complete and not parse.body:
            self._finish()  # no body at all (204, 304, HEAD, Content-Length: 0)

    def _check_lead(self, data: bytes) -> None:
        # llhttp also takes RTSP/ and ICE/ status lines; an upstream must speak HTTP.
        if self._lead is None:
            return
        lead = (self._lead + data).lstrip(b"\r\n")
        if len(lead) < 5:
            self._lead = lead
        elif lead.startswith(b"HTTP/"):
            self._lead = None
        else:
            raise _Malformed("not an HTTP/1.x response")

    def _broken(self, detail: str) -> bytes:
        """The body broke off: close the connection and raise, unless the caller closed it."""
        if self._aborted:
            return b""
        self._abort_connection()
        raise UpstreamStreamError(f"upstream {self._key[1]} {detail}")

    def _finish(self) -> None:
        """The body is complete: pool the connection if it may be reused, else close it."""
        self._done = True
        parse = self._parse
        parse.parser = None
        writer = self._writer
        self._writer = None
        self._client._active.discard(self)
        if writer is None:
            return
        if parse.reusable and not parse.extra:
            self._client._release(self._key, self._reader, writer)
        else:
            writer.transport.abort()

    def _abort_connection(self) -> None:
        self._parse.parser = None
        writer = self._writer
        self._writer = None
        self._client._active.discard(self)
        if writer is not None:
            writer.transport.abort()

    def _on_header_timeout(self) -> None:
        self._timed_out = True
        if self._writer is not None:
            self._writer.transport.abort()



# --------------------------------------------------------------------------- small documents


@dataclass(frozen=True, slots=True)
class SmallResponse:
    """A fully read small upstream document."""

    status: int
    headers: ResponseHeaders
    body: bytes


async def fetch_small(
    url: str,
    *,
    policy: AddressPolicy,
    max_bytes: int = 5120,
    timeout: float = 5.0,
    headers: HeadersArg = None,
    ssl_context: ssl.SSLContext | None = None,
) -> SmallResponse:
    """GET a small document (e.g. a client ID metadata document) through the SSRF guard.

    One overall `timeout` (DNS, connect, TLS, headers and body), no redirects (3xx raises
    `UpstreamRedirect`), bodies over `max_bytes` abort the read with `UpstreamTooLarge`.
    Non-3xx statuses are returned as they are; the caller decides what a 404 means.
    """
    request_headers: list[tuple[str, str]] = [
        ("Accept", "application/json"),
        ("User-Agent", "mcp-auth-gateway"),
    ]
    given = _header_items(headers)
    names = {name.lower() for name, _ in given}
    request_headers = [h for h in request_headers if h[0].lower() not in names] + given
    # A private client: no pooling (max_per_origin=0) and no DNS answers shared with the proxy.
    client = UpstreamClient(
        policy, max_per_origin=0, connect_timeout=timeout, header_timeout=timeout, ssl_context=ssl_context
    )
    response: UpstreamResponse | None = None
    try:
        async with asyncio.timeout(timeout):
            response = await client.request("GET", url, request_headers)
            if 300 <= response.status < 400:
                location = response.headers.get("Location")
                raise UpstreamRedirect(
                    f"{url} answered {response.status} redirecting to {location!r}; redirects are not followed",
                    response.status,
                    location,
                )
            try:
                body = await response.read_all(max_bytes)
            except UpstreamTooLarge:
                raise UpstreamTooLarge(f"{url} is larger than {max_bytes} bytes") from None
            except UpstreamStreamError as exc:
                raise UpstreamUnreachable(f"{url}: {exc}") from None
            return SmallResponse(response.status, response.headers, body)
    except TimeoutError:
        raise UpstreamTimeout(f"fetching {url} took longer than {timeout:g}s") from None
    finally:
        if response is not None:
            response.close()
        client.close()
