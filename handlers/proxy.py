"""/mcp/{serverId}: the MCP Streamable HTTP proxy. The gate's checks come first on every
request; then the relay, hop-by-hop headers dropped both ways (errors: handlers/proxy_errors.py)."""

from __future__ import annotations

import asyncio
import logging
import time

from tornado.iostream import StreamClosedError

from handlers.base import CORS_ALLOW_HEADERS, CORS_EXPOSE_HEADERS
from handlers.lean import LeanHandler
from handlers.proxy_account import AccountRelay
from handlers.proxy_errors import ErrorAnswers
from handlers.proxy_stream import RelayState, SseRelay
from services.common import logs
from services.proxy.gate import TOOL_METHODS, Call, Refused, ToolRefused
from services.proxy.protocol import eras, jsonrpc
from services.proxy.upstream.errors import UpstreamError, UpstreamStreamError
from services.proxy.upstream.http11 import hop_by_hop_names
from storage.base import StorageError

log = logging.getLogger("gateway.proxy")

MAX_BODY = 1024 * 1024  # a JSON-RPC message bigger than this is refused with 413
OUTCOME_SCAN_LIMIT = 1024 * 1024  # JSON bodies larger than this are relayed, outcome unknown
BODY_FLUSH_AT = 256 * 1024  # a non-SSE body past this streams to the client with back-pressure
# Headers the client sends that the upstream gets as they are (besides Mcp-* and the
# upstream's own credentials); Authorization, cookies and hop-by-hop headers never pass.
FORWARDED_REQUEST_HEADERS = ("Accept", "Content-Type", "Last-Event-ID", "User-Agent", "Accept-Language")
FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Content-Encoding", "MCP-Protocol-Version", "Retry-After")
END_SESSION_TIMEOUT = 5.0  # the best-effort DELETE of an upstream session the gateway could not record


class McpProxyHandler(AccountRelay, SseRelay, ErrorAnswers, LeanHandler):
    SUPPORTED_METHODS = ("GET", "POST", "DELETE", "OPTIONS")

    def initialize(self) -> None:
        self._r = RelayState()
        self._upstream_token = ""  # upstream_auth "oauth": the user's token for this request

    def prepare(self) -> None:
        # Only the request id's ContextVar: an MCP call authenticates with its bearer token,
        # never the dashboard's sign-in cookie. Not a coroutine: nothing is awaited for it.
        logs.request_id.set(self.request_id)

    def set_default_headers(self) -> None:
        super().set_default_headers()
        origin = self.request.headers.get("Origin")
        # Only allowed browser origins get CORS headers: others cannot even read a 401.
        if origin and self.services.gate.origin_allowed(origin):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)
            self.set_header("Access-Control-Max-Age", "86400")

    async def admit(self, server_id: str) -> Call | None:
        """The admitted call when the request may proceed; otherwise the response is sent."""
        gate = self.services.gate
        headers = self.request.headers
        try:
            gate.check_origin(headers.get("Origin"), server_id)
            call = await gate.admit(headers.get("Authorization", ""), server_id)
        except Refused as refused:
            self.refuse(refused)
            return None
        # Not needed past admission: a stream held for hours does not keep the token in memory.
        del headers["Authorization"]
        claims = call.claims
        self.log_fields.update(user_sub=claims["sub"], client_id=claims.get("client_id", ""), server_id=server_id)
        return call

    # ------------------------------------------------------------------- relaying

    # A storage failure anywhere in a request is a 503 with Retry-After (storage_failed).
    # Each verb awaits its steps itself: an idle stream holds every frame on its await chain.

    async def get(self, server_id: str) -> None:
        try:
            call = await self.admit(server_id)
            if call is not None:
                await self.relay(call, None)
        except StorageError as exc:
            self.storage_failed(exc)

    delete = get

    async def post(self, server_id: str) -> None:
        try:
            call = await self.admit(server_id)
            message = None if call is None else self.parse_post(call)
            if message is not None and (message.method in TOOL_METHODS or message.kind == "batch"):
                message = await self.check_tools(call, message)
            if message is not None:
                await self.relay(call, message)
        except StorageError as exc:
            self.storage_failed(exc)

    def parse_post(self, call: Call):
        """The POST's JSON-RPC message once it passed the size, syntax, routing-header and
        step-up checks; otherwise the error is answered and None returned."""
        if len(self.request.body) > MAX_BODY:
            self.jsonrpc_error(413, -32600, f"the request body exceeds {MAX_BODY} bytes")
            return None
        try:
            message = jsonrpc.parse_message(self.request.body)
            self._r.era = "2026" if eras.check_routing_headers(message, self.request.headers).is_modern else "2025"
        except jsonrpc.ProtocolError as exc:
            self.jsonrpc_error(400, exc.code, exc.message, getattr(exc, "id", None))
            return None
        self._r.message = message
        if message.needs_invoke:
            try:
                self.services.gate.require_invoke(call)
            except Refused as refused:
                self.refuse(refused)
                return None
        return message

    async def check_tools(self, call: Call, message):
        """Tool policy (ProxyGate.check_tools): a refused tools/call is answered here and
        recorded as denied, never relayed; a tools/list's answer will be filtered."""
        started = time.monotonic()
        try:
            self._r.tools = await self.services.gate.check_tools(self.services.tools, call, message)
        except ToolRefused as refused:
            self.refuse(refused)
            for member, reason in refused.denied:
                self.record(call, member, f"denied:{reason}", started)
            return None
        return message

    def on_connection_close(self) -> None:
        # The client went away: close the upstream request (and its connection) at once,
        # whether the upstream is still to answer (cancel the request) or streaming.
        self._r.client_gone = True
        if self._r.upstream_request is not None:
            self._r.upstream_request.cancel()
        if self._r.upstream_response is not None:
            self._r.upstream_response.close()

    def _uncancel(self) -> None:
        """The task's cancellation was ours and is handled: later awaits in it are not cancelled."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()

    def upstream_headers(self, call: Call, session, token: str = "") -> list[tuple[str, str]]:
        incoming = self.request.headers
        # Fields the client's Connection header names are for the gateway alone (RFC 9110 §7.6.1).
        hop = hop_by_hop_names(incoming.get_list("Connection"))
        headers = [(n, v) for n in FORWARDED_REQUEST_HEADERS if (v := incoming.get(n)) and n.lower() not in hop]
        for name, value in incoming.get_all():
            lower = name.lower()
            if lower.startswith("mcp-") and lower != "mcp-session-id" and lower not in hop:
                headers.append((name, value))
        if session is not None:
            headers.append(("Mcp-Session-Id", session.upstream_session_id))
        # The id the client got back (LeanHandler sets it), so upstream logs can be matched.
        request_id = getattr(self, "request_id", None) or logs.request_id.get()
        if request_id != "-":
            headers.append(("X-Request-Id", request_id))
        server = call.server
        headers.extend(self.services.servers.upstream_headers(server).items())
        if server.forward_identity:
            headers.extend(self.services.identity_headers(server, call.claims))
        if token:
            # The user's own upstream token (upstream_auth "oauth"), on this hop only, and the
            # only credential on it.
            headers = [h for h in headers if h[0].lower() != "authorization"]
            headers.append(("Authorization", f"Bearer {token}"))
        return headers

    async def relay(self, call: Call, message) -> None:
        services = self.services
        server = call.server
        started = time.monotonic()
        incoming_session = self.request.headers.get("Mcp-Session-Id")
        if incoming_session:
            try:
                await services.gate.resolve_session(call, incoming_session, message)
            except Refused as refused:
                self.refuse(refused)
                return
        if self._r.client_gone:
            return
        if server.upstream_auth == "oauth":  # the user's own account (handlers/proxy_account.py)
            response = await self.send_with_account(call, message, started)
        else:
            response = await self.send(call, message, started, "")
        if response is None:
            return
        self._r.upstream_response = response
        try:
            if await self.relay_head(response, call, message, started):
                # Awaited here rather than in relay_head: an idle stream holds one frame less.
                if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                    outcome = await self.relay_stream(response, message, started, call)
                else:
                    outcome = await self.relay_body(response, message, response.status)
                    self.observe_latency(call)
                self.record(call, message, outcome, started)
        finally:
            response.close()
            self._r.upstream_response = None

    async def send(self, call: Call, message, started: float, token: str):
        """The upstream's response, or None once an error is answered (or the client left)."""
        services = self.services
        server = call.server
        method = self.request.method
        # No task of its own (one per request costs more than the rest of the relay): while
        # the headers are awaited, on_connection_close cancels this handler's task.
        self._r.upstream_request = asyncio.current_task()
        sent = time.perf_counter()
        try:
            response = await services.upstream.request(
                method,
                server.upstream_url,
                self.upstream_headers(call, call.session, token),
                self.request.body if method == "POST" else None,
                # Not approved for internal upstreams: public addresses only, at every
                # connection (a name re-pointed inward after registration is refused).
                public_only=not server.internal_upstream,
            )
        except asyncio.CancelledError:
            if not self._r.client_gone:
                raise
            self._uncancel()
            return None  # cancelled by on_connection_close: the upstream connection is closed
        except UpstreamError as exc:
            self.upstream_failed(exc, call, message, started)
            return None
        finally:
            self._r.upstream_request = None
        self._r.ttfb = time.perf_counter() - sent
        if self._r.client_gone:
            response.close()
            return None
        return response

    async def relay_head(self, response, call: Call, message, started: float) -> bool:
        """The upstream answer's status and headers, the session it starts or ends; False
        when the answer is given here instead (an upstream refusing the gateway)."""
        gate = self.services.gate
        session = call.session
        status = response.status
        if status == 404 and session is not None:
            # The upstream forgot the session: so do we, and the client re-initializes.
            await gate.drop_session(call)
        if status in (401, 403):
            self.upstream_refused_gateway(call, message, started, status)
            return False
        if self.request.method == "DELETE" and session is not None and status < 300:
            await gate.drop_session(call)
        self.set_status(status, response.reason or None)
        upstream_headers = response.headers
        # What the upstream's Connection header names is for this hop only.
        hop = hop_by_hop_names(upstream_headers.get_list("Connection"))
        for name in FORWARDED_RESPONSE_HEADERS:
            if name in upstream_headers and name.lower() not in hop:
                self.set_header(name, upstream_headers[name])
        upstream_session = upstream_headers.get("Mcp-Session-Id")
        if upstream_session and session is None and message is not None and message.method == "initialize":
            try:
                session = await gate.start_session(call, upstream_session, message)
            except StorageError:
                # Nobody could ever reach or end the session the upstream just opened.
                response.close()
                await self.end_upstream_session(call, upstream_session)
                raise
        if session is not None:
            self.set_header("Mcp-Session-Id", session.session_id)
        return True

    async def end_upstream_session(self, call: Call, upstream_session: str) -> None:
        """Best effort: DELETE a session at the upstream (MCP's way to end one)."""
        server = call.server
        headers = [*self.upstream_headers(call, None, self._upstream_token), ("Mcp-Session-Id", upstream_session)]
        try:
            response = await self.services.upstream.request(
                "DELETE", server.upstream_url, headers, None, header_timeout=END_SESSION_TIMEOUT,
                public_only=not server.internal_upstream,
            )
        except UpstreamError as exc:
            log.warning("could not end the session at upstream %s: %s", server.server_id, exc)
            return
        response.close()

    async def relay_body(self, response, message, status: int) -> str:
        if self._r.tools is not None and status < 300:  # an HTTP error lists nothing: relayed as it is
            return await self.relay_tools_body(response, message, status)
        scanned = bytearray()
        unflushed = 0
        try:
            while chunk := await response.read_chunk():
                self.write(chunk)
                self._r.bytes_out += len(chunk)
                if len(scanned) <= OUTCOME_SCAN_LIMIT:
                    scanned += chunk
                unflushed += len(chunk)
                if unflushed >= BODY_FLUSH_AT:
                    # Small bodies keep their Content-Length; a large one is never held whole
                    # here, and a client that does not drain it is cut off like an SSE reader.
                    unflushed = 0
                    self._r.flushed = True
                    await asyncio.wait_for(self.flush(), self.config.slow_reader_timeout)
        except UpstreamStreamError as exc:
            return self.body_broke_off(exc, message)
        except StreamClosedError:
            self.services.metrics.inc("streams_closed_total", reason="client_gone")
        except TimeoutError:
            self.services.metrics.inc("streams_closed_total", reason="slow_reader")
            self.request.connection.close()
        if not self._finished:
            try:
                await self.finish()
            except StreamClosedError:
                pass
        if status >= 400:
            return str(status)
        if message is None or message.id is None:
            return "ok"
        return jsonrpc.body_outcome(bytes(scanned), message.id)

    def observe_latency(self, call: Call) -> None:
        """proxy_upstream_ttfb_seconds: from sending the upstream request (a pooled connection,
        or connecting) to its answer's head. proxy_gateway_seconds: from the request's arrival
        to its answer's head leaving the gateway (the first flush: a held-back JSON answer is
        written whole, an SSE stream's head goes at once), less that upstream time."""
        head = getattr(self, "time_to_head", None)  # set at the first flush (LeanHandler)
        if head is None:
            if not self._r.flushed and not self._finished:
                return  # nothing went out: the client left first
            head = self.request.request_time()
        metrics = self.services.metrics
        metrics.observe("proxy_upstream_ttfb_seconds", self._r.ttfb, server=call.server_id)
        metrics.observe("proxy_gateway_seconds", max(head - self._r.ttfb, 0.0), server=call.server_id)

    def record(self, call: Call, message, outcome: str, started: float) -> None:
        self.services.gate.record(
            call, message, outcome,
            # To the response, not to the end of a stream that may stay open after it.
            ((self._r.answered_at or time.monotonic()) - started) * 1000,
            len(self.request.body), self._r.bytes_out, self.request.headers, self._r.era,
        )
