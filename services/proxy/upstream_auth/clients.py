"""How the gateway identifies itself to an upstream authorization server: the owner's static
client, else a client ID metadata document it serves (when the AS supports them), else one
dynamic registration (RFC 7591) per (server, issuer), kept in storage."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from services.proxy.upstream.errors import UpstreamError
from storage.upstream_auth import UpstreamAuthStore, UpstreamRegistration

from .discovery import AuthServer
from .errors import DiscoveryError, UpstreamAuthTemporarilyUnavailable
from .http import AuthHttp
from .sealing import SecretBox, open_client_secret, seal_client_secret

CLIENT_NAME = "MCP Auth Gateway"
GRANT_TYPES = ["authorization_code", "refresh_token"]


@dataclass(frozen=True)
class UpstreamAuthSettings:
    """A server's upstream-authorization options. Read from the Server record's fields of the
    same names with `of` (upstream_client_id, upstream_client_secret_enc, upstream_scope,
    upstream_audience, upstream_send_resource, upstream_issuer) when they exist."""

    client_id: str = ""  # a static client; "" for discovery (CIMD or DCR)
    client_secret: str = ""
    scope: str = ""  # "" : what the upstream's metadata names
    audience: str = ""  # an extra `audience` parameter some providers need
    send_resource: bool = True  # False for authorization servers that reject RFC 8707
    issuer: str = ""  # the authorization server, when the upstream publishes no RFC 9728 metadata

    @classmethod
    def of(cls, server: object, box: SecretBox) -> UpstreamAuthSettings:
        server_id = str(getattr(server, "server_id", ""))
        return cls(
            client_id=str(getattr(server, "upstream_client_id", "") or ""),
            client_secret=open_client_secret(box, server_id, "", str(getattr(server, "upstream_client_secret_enc", "")
                                                                      or "")),
            scope=str(getattr(server, "upstream_scope", "") or ""),
            audience=str(getattr(server, "upstream_audience", "") or ""),
            send_resource=bool(getattr(server, "upstream_send_resource", True)),
            issuer=str(getattr(server, "upstream_issuer", "") or ""),
        )


@dataclass(frozen=True)
class ClientIdentity:
    """The gateway as this AS knows it, and how it authenticates at the token endpoint."""

    client_id: str
    client_secret: str = ""
    auth_method: str = "none"  # client_secret_basic | client_secret_post | none
    kind: str = "dcr"  # static | cimd | dcr

    def authenticate(self, form: dict[str, str]) -> list[tuple[str, str]]:
        """Add this client's authentication to a token/revocation request: headers to send."""
        # client_id in the body with Basic too: harmless (RFC 6749 §2.3.1 does not forbid it)
        # and some servers (the MCP SDK's among them) look the client up by it.
        form["client_id"] = self.client_id
        if self.auth_method == "client_secret_basic":
            pair = f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
            return [("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())]
        if self.auth_method == "client_secret_post":
            form["client_secret"] = self.client_secret
        return []


def client_metadata_document(client_id_url: str, redirect_uri: str) -> dict:
    """The CIMD the gateway serves at `client_id_url` (its own client id at every AS)."""
    return {
        "client_id": client_id_url,
        "client_name": CLIENT_NAME,
        "redirect_uris": [redirect_uri],
        "grant_types": GRANT_TYPES,
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


def _secret_method(supported: tuple[str, ...]) -> str:
    # The body before Basic: servers differ in how they decode Basic credentials (RFC 6749
    # §2.3.1 form-encoding), and some (the MCP SDK's revocation endpoint) read only the body.
    for method in ("client_secret_post", "client_secret_basic"):
        if method in supported:
            return method
    return "none"


class ClientIdentification:
    """Picks (and when needed registers) the gateway's client at an upstream AS."""

    def __init__(self, store: UpstreamAuthStore, box: SecretBox, http: AuthHttp, redirect_uri: str,
                 client_id_url: str, *, now: Callable[[], float] = time.time) -> None:
        self.store, self.box, self.http = store, box, http
        self.redirect_uri = redirect_uri
        self.client_id_url = client_id_url  # "" when the gateway cannot serve a CIMD (no https)
        self.now = now

    async def identify(self, server_id: str, server: AuthServer, settings: UpstreamAuthSettings,
                       public_only: bool) -> ClientIdentity:
        if settings.client_id:
            method = _secret_method(server.token_auth_methods) if settings.client_secret else "none"
            return ClientIdentity(settings.client_id, settings.client_secret, method, "static")
        if server.cimd_supported and self.client_id_url:
            return ClientIdentity(self.client_id_url, "", "none", "cimd")
        stored = await self.store.get_registration(server_id, server.issuer)
        if stored is None:
            stored = await self._register(server_id, server, settings, public_only)
        secret = open_client_secret(self.box, server_id, server.issuer, stored.client_secret_enc)
        method = str(stored.metadata.get("token_endpoint_auth_method") or ("client_secret_basic" if secret else "none"))
        return ClientIdentity(stored.client_id, secret, method, stored.kind)

    async def forget(self, server_id: str, issuer: str) -> None:
        """The AS no longer knows our registration (invalid_client): register again next time."""
        await self.store.delete_registration(server_id, issuer)

    async def _register(self, server_id: str, server: AuthServer, settings: UpstreamAuthSettings,
                        public_only: bool) -> UpstreamRegistration:
        if not server.registration_endpoint:
            raise DiscoveryError(
                f"the authorization server {server.issuer} offers neither client ID metadata documents nor "
                "dynamic registration: register the gateway there (redirect URI "
                f"{self.redirect_uri}) and set the server's static client id")
        request = {
            "client_name": CLIENT_NAME,
            "redirect_uris": [self.redirect_uri],
            "grant_types": GRANT_TYPES,
            "response_types": ["code"],
            "token_endpoint_auth_method": _secret_method(server.token_auth_methods),
        }
        if settings.scope:
            request["scope"] = settings.scope
        try:
            answer = await self.http.post(server.registration_endpoint, [("Content-Type", "application/json")],
                                          json.dumps(request).encode(), public_only=public_only)
        except UpstreamError as exc:
            raise UpstreamAuthTemporarilyUnavailable(f"dynamic registration at {server.issuer} failed: {exc}") from None
        document = answer.json()
        if answer.status >= 500:
            raise UpstreamAuthTemporarilyUnavailable(
                f"dynamic registration at {server.issuer} answered HTTP {answer.status}")
        if answer.status not in (200, 201) or not isinstance(document, dict) \
                or not isinstance(document.get("client_id"), str) or not document["client_id"]:
            error = document.get("error_description") or document.get("error") if isinstance(document, dict) else ""
            raise DiscoveryError(f"dynamic registration at {server.issuer} was refused (HTTP {answer.status}"
                                 f"{': ' + str(error)[:200] if error else ''})")
        secret = document.pop("client_secret", "") or ""
        registration = UpstreamRegistration(
            server_id=server_id, issuer=server.issuer, client_id=document["client_id"],
            client_secret_enc=seal_client_secret(self.box, server_id, server.issuer, str(secret)),
            kind="dcr", metadata=document, created_at=self.now(),
        )
        if await self.store.add_registration(registration):
            return registration
        # Another instance registered at the same moment: use the one that was kept.
        kept = await self.store.get_registration(server_id, server.issuer)
        return kept or registration
