"""The HTTP exchanges of upstream authorization (metadata GETs, token and registration POSTs):
each through the proxy's SSRF-guarded `UpstreamClient`, size-bounded, with one overall timeout."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from services.proxy.upstream.errors import UpstreamError, UpstreamTimeout, UpstreamTooLarge
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream.pool import UpstreamClient

MAX_DOCUMENT = 64 * 1024  # metadata and token answers; real ones are a few KiB
TIMEOUT = 10.0


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None


class AuthHttp:
    """One private client (no pooling shared with the proxy, no redirects followed: a 3xx is
    an answer like any other). Raises `UpstreamError` subclasses: refused by the guard
    (`UpstreamRefused`), unreachable, timeout, `UpstreamTooLarge`."""

    def __init__(self, policy: AddressPolicy, *, timeout: float = TIMEOUT, max_bytes: int = MAX_DOCUMENT) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._client = UpstreamClient(policy, max_per_origin=0, connect_timeout=timeout, header_timeout=timeout)

    async def get(self, url: str, *, public_only: bool) -> Answer:
        return await self.send("GET", url, [("Accept", "application/json")], None, public_only=public_only)

    async def post(self, url: str, headers: list[tuple[str, str]], body: bytes, *, public_only: bool) -> Answer:
        return await self.send("POST", url, [("Accept", "application/json"), *headers], body, public_only=public_only)

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None, *,
                   public_only: bool) -> Answer:
        headers = [*headers, ("User-Agent", "mcp-auth-gateway")]
        response = None
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.request(method, url, headers, body, public_only=public_only)
                try:
                    data = await response.read_all(self.max_bytes)
                except UpstreamTooLarge:
                    raise UpstreamTooLarge(f"{url} answered more than {self.max_bytes} bytes") from None
                return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, data)
        except TimeoutError:
            raise UpstreamTimeout(f"{url} did not answer within {self.timeout:g}s") from None
        finally:
            if response is not None:
                response.close()

    def close(self) -> None:
        self._client.close()


__all__ = ["Answer", "AuthHttp", "UpstreamError"]
