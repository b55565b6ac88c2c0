"""/mcp/{serverId}: the MCP Streamable HTTP proxy. Authentication and the sharing rules
are checked on every request before anything reaches the upstream."""

from __future__ import annotations

import json
import logging

from handlers.base import CORS_ALLOW_HEADERS, CORS_EXPOSE_HEADERS, BaseHandler
from services.tokens import MCP_SCOPES, SCOPE_INVOKE, InvalidToken, principal_from_claims

log = logging.getLogger("gateway.proxy")


class McpProxyHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET", "POST", "DELETE", "OPTIONS")

    def set_default_headers(self) -> None:
        super().set_default_headers()
        origin = self.request.headers.get("Origin")
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)
            self.set_header("Access-Control-Max-Age", "86400")

    def jsonrpc_error(self, status: int, code: int, message: str, request_id=None) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}))

    def challenge(self, server_id: str, error: str | None = None, description: str = "",
                  scope: str = " ".join(MCP_SCOPES), status: int = 401) -> None:
        metadata = f"{self.config.public_url}/.well-known/oauth-protected-resource/mcp/{server_id}"
        parts = [f'resource_metadata="{metadata}"', f'scope="{scope}"']
        if error:
            parts.append(f'error="{error}"')
            if description:
                parts.append('error_description="{}"'.format(description.replace('"', "'")))
        self.set_header("WWW-Authenticate", "Bearer " + ", ".join(parts))
        self.jsonrpc_error(status, -32001 if status == 401 else -32003, description or "authorization required")

    def origin_allowed(self) -> bool:
        """Requests without Origin (native clients) pass; browsers need an allowed origin."""
        origin = self.request.headers.get("Origin")
        if not origin:
            return True
        origin = origin.rstrip("/").lower()
        return origin == self.config.public_url or origin in self.config.allowed_origins

    async def authenticate(self, server_id: str) -> dict | None:
        """The token's claims when the request may proceed; otherwise the response is sent."""
        if not self.origin_allowed():
            self.jsonrpc_error(403, -32003, "this Origin is not allowed to call the gateway")
            return None
        server = await self.services.access.server(server_id)
        if server is None:
            self.write_json({"error": "not_found", "error_description": f"there is no MCP server {server_id}"}, 404)
            return None
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.challenge(server_id)
            return None
        try:
            claims = await self.services.tokens.verify_access_token(token.strip())
        except InvalidToken as exc:
            self.challenge(server_id, "invalid_token", str(exc))
            return None
        if claims["aud"] not in (self.config.server_resource(server_id), self.config.base_resource):
            self.challenge(server_id, "invalid_token", "the access token is for another resource")
            return None
        decision = await self.services.access.decide(principal_from_claims(claims), server_id)
        if not decision.allowed:
            self.jsonrpc_error(403, -32003, f"access denied: {decision.reason}")
            return None
        return claims

    def require_invoke(self, server_id: str, claims: dict) -> bool:
        """Step-up: a call that needs mcp:invoke with a token that lacks it gets 403."""
        if SCOPE_INVOKE in claims.get("scope", "").split():
            return True
        self.challenge(
            server_id, "insufficient_scope", "this call needs the mcp:invoke scope",
            scope=" ".join(MCP_SCOPES), status=403,
        )
        return False

    async def get(self, server_id: str) -> None:
        claims = await self.authenticate(server_id)
        if claims is not None:
            await self.relay(server_id, claims)

    async def post(self, server_id: str) -> None:
        claims = await self.authenticate(server_id)
        if claims is not None:
            await self.relay(server_id, claims)

    async def delete(self, server_id: str) -> None:
        claims = await self.authenticate(server_id)
        if claims is not None:
            await self.relay(server_id, claims)

    async def relay(self, server_id: str, claims: dict) -> None:
        self.jsonrpc_error(502, -32603, "relaying is not implemented yet")
