"""The proxy's side of connected accounts (issue 11): the user's own upstream token on the
upstream hop, one retry after an upstream 401, and the answers when there is no usable account."""

from __future__ import annotations

from services.proxy import connect_required
from services.proxy.gate import Call
from services.proxy.upstream_auth.errors import ConnectRequired, UpstreamAuthError


class AccountRelay:
    """McpProxyHandler's methods for servers with upstream_auth "oauth"."""

    async def send_with_account(self, call: Call, message, started: float):
        """The upstream's response to the request sent with the user's token (another token and
        one retry after a 401), or None once an answer is sent (the connect link, 503, errors)."""
        token = self._upstream_token = await self.upstream_token(call, message, started)
        if not token:
            return None
        response = await self.send(call, message, started, token)
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
        if response is not None and response.status == 401:
            response.close()
            self.upstream_auth_failed(call, message, ConnectRequired(
                "the upstream does not accept your account", self.services.upstream_auth.connect_url(call.server_id)),
                started)
            return None
        return response

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
        answer = connect_required.answer_for(message, exc, self._r.era)
        if isinstance(exc, ConnectRequired):
            self.services.metrics.inc("connect_required_total")
        if answer.retry_after:
            self.set_header("Retry-After", str(answer.retry_after))
        self.set_status(answer.status)
        self.set_header("Content-Type", "application/json")
        self.finish(answer.body)
        self.record(call, message, answer.outcome, started)
