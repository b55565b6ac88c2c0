"""Discovery documents: protected resource metadata (RFC 9728), authorization server
metadata (RFC 8414 and OIDC discovery) and the public signing keys."""

from __future__ import annotations

from handlers.base import BaseHandler
from services.common.scopes import MCP_SCOPES, SUPPORTED_SCOPES


class _Document(BaseHandler):
    cors = True

    def document(self, body: dict) -> None:
        self.set_header("Cache-Control", "public, max-age=300")
        self.write_json(body)


class ProtectedResourceHandler(_Document):
    async def get(self, server_id: str | None = None) -> None:
        config = self.config
        if server_id is None:
            resource, name = config.base_resource, "MCP servers behind this gateway"
        else:
            self.log_fields["server_id"] = server_id
            server = await self.services.access.server(server_id)
            if server is None:
                self.write_json({"error": "not_found", "error_description": "unknown MCP server"}, 404)
                return
            resource, name = config.server_resource(server_id), server.name
        self.document(
            {
                "resource": resource,
                "authorization_servers": [config.issuer],
                "scopes_supported": list(MCP_SCOPES),
                "bearer_methods_supported": ["header"],
                "resource_name": name,
                "jwks_uri": config.issuer + "/jwks.json",
            }
        )


class AuthorizationServerHandler(_Document):
    def get(self) -> None:
        issuer = self.config.issuer
        self.document(
            {
                "issuer": issuer,
                "authorization_endpoint": issuer + "/authorize",
                "token_endpoint": issuer + "/token",
                "registration_endpoint": issuer + "/register",
                "revocation_endpoint": issuer + "/revoke",
                "jwks_uri": issuer + "/jwks.json",
                "scopes_supported": list(SUPPORTED_SCOPES),
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "none",
                    "client_secret_basic",
                    "client_secret_post",
                ],
                "revocation_endpoint_auth_methods_supported": [
                    "none",
                    "client_secret_basic",
                    "client_secret_post",
                ],
                "client_id_metadata_document_supported": True,
                "authorization_response_iss_parameter_supported": True,
                "prompt_values_supported": ["none", "login", "consent", "select_account"],
                # OIDC discovery requires these; the gateway issues no ID tokens itself.
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "service_documentation": issuer + "/",
            }
        )


class JwksHandler(_Document):
    def get(self) -> None:
        self.document(self.services.keyring.jwks())
