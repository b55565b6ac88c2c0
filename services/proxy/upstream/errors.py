"""Every failure talking to an upstream, one family under `UpstreamError`; the message is
safe to log. The proxy maps them to 502/504."""

from __future__ import annotations


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
