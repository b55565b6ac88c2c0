"""Upstream URL rules: `parse_upstream_url` checks an upstream URL (http/https, a host, no
userinfo) and splits it into an `UpstreamTarget`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.proxy.upstream.errors import (
    UpstreamRefused,
)


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
