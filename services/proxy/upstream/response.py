"""`UpstreamResponse`: one upstream response on its connection, status and headers first, the
body as the consumer reads it; hands the connection back to the pool only when that is safe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING

from services.proxy.upstream.errors import (
    UpstreamProtocolError,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from services.proxy.upstream.http11 import (
    _READ_SIZE,
    ResponseHeaders,
    _EarlyClose,
    _Malformed,
    _Parse,
)

if TYPE_CHECKING:
    from services.proxy.upstream.pool import UpstreamClient


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
