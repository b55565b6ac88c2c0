"""How /mcp/{serverId} answers what went wrong (a mixin of McpProxyHandler): the gate's
refusals, storage faults, and an upstream that cannot be reached, refuses the gateway or
breaks off its answer; each a JSON-RPC error with its HTTP status, or a cut connection once
bytes of the answer are out."""

from __future__ import annotations

import json
import logging

from services.proxy.gate import Call, Refused
from services.proxy.upstream.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamStreamError,
    UpstreamTimeout,
)
from storage.base import StorageError, StorageUnavailable

log = logging.getLogger("gateway.proxy")

STORAGE_RETRY_AFTER = 2  # seconds, when a storage failure does not say (StorageUnavailable does)


class ErrorAnswers:
    def jsonrpc_error(self, status: int, code: int, message: str, request_id=None) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}))

    def refuse(self, refused: Refused) -> None:
        """A refusal from the gate: its status, challenge and body."""
        if refused.www_authenticate:
            self.set_header("WWW-Authenticate", refused.www_authenticate)
        if refused.jsonrpc:
            self.set_status(refused.status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(refused.body))
        else:
            self.write_json(refused.body, refused.status)

    def storage_failed(self, exc: StorageError) -> None:
        """503 + Retry-After with a JSON-RPC error (the request's id when known); one log
        line, no traceback: a locked, read-only or full store is an operating condition."""
        log.warning("storage failure on %s %s: %s", self.request.method, self.request.path, exc)
        self.services.metrics.inc("storage_errors_total", where="proxy")
        if self._finished:
            return
        if self._r.flushed:
            self.request.connection.close()  # an answer is under way: cut it, never fake its end
            return
        self.clear()
        retry_after = exc.retry_after if isinstance(exc, StorageUnavailable) else STORAGE_RETRY_AFTER
        self.set_header("Retry-After", str(retry_after))
        message = self._r.message
        self.jsonrpc_error(503, -32603, "the gateway's storage is unavailable; retry later",
                           message.id if message is not None else None)

    def upstream_failed(self, exc: UpstreamError, call: Call, message, started: float) -> None:
        """No answer from the upstream: 504 when it did not answer in time, 502 otherwise."""
        metrics = self.services.metrics
        if isinstance(exc, UpstreamTimeout):
            metrics.inc("upstream_errors_total", kind="timeout")
            self.jsonrpc_error(504, -32603, "the upstream MCP server did not answer in time", message and message.id)
            self.record(call, message, "504", started)
            return
        if isinstance(exc, UpstreamRefused):
            metrics.inc("upstream_errors_total", kind="refused")
            log.warning("upstream %s refused by the address policy: %s", call.server_id, exc)
            text = "the gateway's address policy refuses the upstream MCP server's address"
        else:
            metrics.inc("upstream_errors_total",
                        kind="protocol" if isinstance(exc, UpstreamProtocolError) else "unreachable")
            log.warning("upstream %s unreachable: %s", call.server_id, exc)
            text = "the upstream MCP server is unreachable"
        self.jsonrpc_error(502, -32603, text, message and message.id)
        self.record(call, message, "502", started)

    def upstream_refused_gateway(self, call: Call, message, started: float, status: int) -> None:
        """The upstream answered 401/403 to the gateway's own credentials: 502. Passing its
        challenge on would send the client into a re-authorization loop with us."""
        log.warning("upstream %s answered %s to the gateway", call.server_id, status)
        self.services.metrics.inc("upstream_errors_total", kind="auth_rejected")
        self.jsonrpc_error(502, -32603, "the upstream MCP server refused the gateway", message and message.id)
        self.observe_latency(call)
        self.record(call, message, "502", started)

    def body_broke_off(self, exc: UpstreamStreamError, message) -> str:
        """The upstream's JSON answer broke off: a whole 502 while nothing went out, else the
        connection is closed (finishing would make a cut-off body look complete: its
        Content-Length would match). The usage outcome."""
        self.services.metrics.inc("upstream_errors_total", kind="broken_body")
        log.warning("upstream answer broke off: %s", exc)
        if not self._r.flushed:
            self.clear()
            self.jsonrpc_error(502, -32603, "the upstream MCP server broke off its answer", message and message.id)
        else:
            self.request.connection.close()
        return "502"
