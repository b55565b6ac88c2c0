"""The SSRF guard: `AddressPolicy`, which addresses upstream connections may reach (public
unicast plus the MCPGW_UPSTREAM_ALLOW list; metadata addresses only by exact entry)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from services.proxy.upstream.errors import (
    UpstreamRefused,
    UpstreamUnreachable,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
