"""The proxy's side of connected accounts (issue 11): the user's own upstream token on the
upstream hop, one retry after an upstream 401, and the answers when there is no usable account."""

from __future__ import annotations

import json
import time

from services.proxy import connect_elicitation, connect_required
from services.proxy.gate import Call
from services.proxy.protocol.jsonrpc import INVALID_PARAMS
from services.proxy.upstream_auth.errors import ConnectRequired, UpstreamAuthError


class AccountRelay:
    """McpProxyHandler's methods for servers with upstream_auth "oauth"."""

    # The retry of a call answered with the gateway's own URL elicitation (2026-07-28); set on
    # such retries only.
    _connect_retry: connect_elicitation.Retry | None = None

    async def send_with_account(self, call: Call, message, started: float):
        """The upstream's response to the request sent with the user's token (another token and
        one retry after a 401), or None once an answer is sent (the connect link, 503, errors)."""
        try:
            retry = connect_elicitation.take_retry(self.services.upstream_auth.box, message, call.claims["sub"],
                                                   call.server_id, now=time.time())
        except connect_elicitation.InvalidRequestState as exc:
            self.jsonrpc_error(400, INVALID_PARAMS, str(exc), message.id)
            self.record(call, message, str(INVALID_PARAMS), started)
            return None
        if retry is not None:
            # What the gateway asked for is answered here: the upstream gets the call as it was.
            self._connect_retry = retry
            self.request.body = retry.body
        token = self._upstream_token = await self.upstream_token(call, message, started)
        if not token:
            return None
        response = await self.send(call, message, started, token)
        if response is not None and self.more_scope_needed(call, message, response, started):
            return None
        if response is None or response.status != 401 or self._r.client_gone:
            return response
        # The token expired early or was revoked: another one (refreshed), and one retry (the
        # body is held whole, so it can be sent again).
        challenge = response.headers.get("WWW-Authenticate", "")
        response.close()
        token = await self.upstream_token(call, message, started, rejected=token, challenge=challenge)
        if not token:
            return None
        self._upstream_token = token
        response = await self.send(call, message, started, token)
        if response is not None and self.more_scope_needed(call, message, response, started):
            return None
        if response is not None and response.status == 401:
            response.close()
            self.upstream_auth_failed(call, message, ConnectRequired(
                "the upstream does not accept your account", self.services.upstream_auth.connect_url(call.server_id)),
                started)
            return None
        return response

    def more_scope_needed(self, call: Call, message, response, started: float) -> bool:
        """An upstream 403 insufficient_scope: answered with the link to connect again (asking
        for more), not the 502 of an upstream that refuses the gateway."""
        if response.status != 403 or self._r.client_gone:
            return False  # another 403 (the upstream refuses the gateway) is relay_head's 502
        exc = connect_required.needs_more_scope(self.services.upstream_auth, call.server_id,
                                                response.headers.get("WWW-Authenticate", ""))
        if exc is None:
            return False
        response.close()
        self.upstream_auth_failed(call, message, exc, started)
        return True

    async def upstream_token(self, call: Call, message, started: float, rejected: str = "",
                             challenge: str = "") -> str:
        """The user's upstream access token; "" once the answer (connect link, 503) is sent."""
        upstream_auth = self.services.upstream_auth
        try:
            if rejected:
                return await connect_required.token_after_401(upstream_auth, call.claims["sub"], call.server,
                                                              rejected, challenge)
            return await upstream_auth.get_token(call.claims["sub"], call.server)
        except UpstreamAuthError as exc:
            self.upstream_auth_failed(call, message, exc, started)
            return ""

    def upstream_auth_failed(self, call: Call, message, exc: UpstreamAuthError, started: float) -> None:
        """Answered without reaching the upstream: never a 401 (the client would re-run the
        gateway's own authorization), but the connect link or a temporary error."""
        if isinstance(exc, ConnectRequired):
            self.services.metrics.inc("connect_required_total")
            if self._r.era == "2026" and self.ask_to_connect(call, message, exc):
                return
        answer = connect_required.answer_for(message, exc, self._r.era)
        if answer.retry_after:
            self.set_header("Retry-After", str(answer.retry_after))
        self.set_status(answer.status)
        self.set_header("Content-Type", "application/json")
        self.finish(answer.body)
        self.record(call, message, answer.outcome, started)

    def ask_to_connect(self, call: Call, message, exc: ConnectRequired) -> bool:
        """A 2026-07-28 client that takes URL elicitations gets one (an input_required result);
        False, and the tool error or JSON-RPC error with the link instead, when it cannot take
        one, the user declined or cancelled, or it was asked MAX_ROUNDS times for this call."""
        retry = self._connect_retry
        if not connect_elicitation.accepts_url_elicitation(message) or (
                retry is not None and (retry.action != "accept" or retry.rounds >= connect_elicitation.MAX_ROUNDS)):
            return False
        reply = connect_elicitation.input_required(
            self.services.upstream_auth.box, message, call.claims["sub"], call.server_id, exc.url,
            f"{exc}: open the link to connect your account at {call.server.name or call.server_id}, then continue.",
            rounds=retry.rounds if retry is not None else 0, now=time.time())
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(reply))
        # Not a usage record: this answer is interim, and the retry is the one logical call.
        return True
