"""`fetch_small`: one guarded GET of a small document (client metadata documents): no redirects,
a byte cap, one overall timeout."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from services.proxy.upstream.errors import (
    UpstreamRedirect,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from services.proxy.upstream.http11 import HeadersArg, ResponseHeaders, _header_items
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream.pool import UpstreamClient
from services.proxy.upstream.response import UpstreamResponse


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
