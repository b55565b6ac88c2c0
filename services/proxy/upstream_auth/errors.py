"""What can go wrong with an upstream account, as classes: each message is safe to show the user
or the owner (never a token or secret)."""

from __future__ import annotations


class UpstreamAuthError(Exception):
    """Base class; `str(exc)` is the clear message."""


class DiscoveryError(UpstreamAuthError):
    """The upstream's or its authorization server's metadata is missing, malformed, too large,
    or names a place the gateway may not go: the owner must look at the server's settings."""


class ConnectRequired(UpstreamAuthError):
    """The user has no usable upstream token (never connected, disconnected, revoked, refresh
    refused): they must connect again at `url`."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class UpstreamAuthTemporarilyUnavailable(UpstreamAuthError):
    """The upstream authorization server is down or failing (5xx, network, timeout): the token is
    kept and the call may be retried later."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthorizationFailed(UpstreamAuthError):
    """The browser came back from the upstream without a usable result: unknown, reused,
    expired or foreign `state`, an error from the upstream, a refused code."""
