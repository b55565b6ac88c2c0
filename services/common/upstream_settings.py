"""An owner's choice of upstream authorization for a server (connected accounts): the checked
Server fields of a change (static client, sealed secret, scope, audience, resource, issuer), the
rule that keeps it consistent with static headers, and what discovery found, for owner views."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.common.errors import InvalidInput
from services.common.validation import check_text
from services.proxy.upstream_auth.sealing import SecretBox, seal_client_secret
from storage.base import Server

AUTH_MODES = ("none", "oauth")
# RFC 6749 §3.3 scope-token; VSCHAR (§A.1) for client ids and secrets.
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
_VSCHAR = re.compile(r"^[\x20-\x7e]+$")
CALLBACK_PATH = "/oauth/upstream/callback"


@dataclass(frozen=True)
class UpstreamAuthChange:
    """What the owner gave; None leaves a setting as it is. `client_secret` "" removes it;
    `client_id` "" goes back to discovery (and drops the secret)."""

    mode: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scope: str | None = None
    audience: str | None = None
    send_resource: bool | None = None
    issuer: str | None = None


def checked_fields(change: UpstreamAuthChange, server_id: str, box: SecretBox, current: Server | None) -> dict:
    """The Server field values `change` sets, each checked (InvalidInput naming its field);
    the secret sealed for (server, static client). Nothing of a secret is ever echoed."""
    fields: dict = {}
    if change.mode is not None:
        mode = str(change.mode).strip().lower()
        if mode not in AUTH_MODES:
            raise InvalidInput("the upstream authorization must be none or oauth", "upstream_auth")
        fields["upstream_auth"] = mode
    if change.client_id is not None:
        client_id = _vschar(change.client_id, "upstream_client_id", "the upstream client ID", 500)
        fields["upstream_client_id"] = client_id
        if not client_id:
            fields["upstream_client_secret_enc"] = ""
    if change.client_secret is not None:
        secret = _vschar(change.client_secret, "upstream_client_secret", "the upstream client secret", 2000)
        client_id = fields.get("upstream_client_id", current.upstream_client_id if current else "")
        if secret and not client_id:
            raise InvalidInput("a client secret needs the client ID it belongs to", "upstream_client_secret")
        fields["upstream_client_secret_enc"] = seal_client_secret(box, server_id, "", secret)
    if change.scope is not None:
        scope = check_text(change.scope, "upstream_scope", limit=1000, label="the upstream scope")
        tokens = scope.split()
        if any(not _SCOPE_TOKEN.match(token) for token in tokens):
            raise InvalidInput("the upstream scope must be scope names separated by spaces "
                               "(printable ASCII, no quotes or backslashes)", "upstream_scope")
        fields["upstream_scope"] = " ".join(tokens)
    if change.audience is not None:
        fields["upstream_audience"] = _vschar(change.audience, "upstream_audience", "the upstream audience", 500)
    if change.send_resource is not None:
        fields["upstream_send_resource"] = bool(change.send_resource)
    if change.issuer is not None:
        fields["upstream_issuer"] = _issuer(change.issuer)
    return fields


def check_consistent(server: Server, headers: Mapping[str, str]) -> None:
    """With connected accounts the gateway sends each user's token as `Authorization`: a
    static Authorization header would be a second, shared credential for the same place.
    Forwarding the identity (X-MCPGW-* headers) and other static headers stay allowed."""
    if server.upstream_auth == "oauth" and any(name.lower() == "authorization" for name in headers):
        raise InvalidInput("with each user's own account the gateway sends the Authorization header: "
                           "remove the static Authorization header first", "headers")


def redirect_uri(public_url: str) -> str:
    """Where the upstream's authorization server sends the browser back (a static client is
    registered there with this redirect URI)."""
    return public_url.rstrip("/") + CALLBACK_PATH


@dataclass(frozen=True)
class UpstreamAuthStatus:
    """What an owner is shown of an oauth server: the redirect URI, the authorization server
    discovery found (and its host when it is not the upstream's), or why discovery failed."""

    redirect_uri: str
    authorization_server: str = ""
    foreign_host: str = ""
    warning: str = ""
    client: str = "discovery"  # static | discovery (client ID metadata document or registration)

    def as_dict(self) -> dict:
        return {"redirect_uri": self.redirect_uri, "authorization_server": self.authorization_server,
                "foreign_authorization_server": self.foreign_host, "warning": self.warning, "client": self.client}

    def lines(self) -> list[str]:
        """For the CLI: one fact per line."""
        found = [f"upstream redirect URI: {self.redirect_uri}", f"upstream client: {self.client}"]
        if self.authorization_server:
            found.append(f"upstream authorization server: {self.authorization_server}")
        if self.foreign_host:
            found.append(f"note: the authorization server is on another host ({self.foreign_host}) "
                         "than the upstream")
        return found


def _vschar(value: object, field: str, label: str, limit: int) -> str:
    text = check_text(value, field, limit=limit, label=label).strip()
    if text and not _VSCHAR.match(text):
        raise InvalidInput(f"{label} must be printable ASCII", field)
    return text


def _issuer(value: object) -> str:
    text = check_text(value, "upstream_issuer", limit=2000, label="the upstream authorization server").strip()
    if not text:
        return ""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise InvalidInput("the upstream authorization server's URL is malformed", "upstream_issuer") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise InvalidInput("the upstream authorization server must be an http(s) issuer URL "
                           "without query, fragment or user information", "upstream_issuer")
    return text
