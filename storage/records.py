"""The records of the storage contract (`storage.base.Storage`): one frozen dataclass per
stored thing; their fields and lifetimes are in docs/architecture.md."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class User:
    sub: str  # the IdP subject: the one stable key of a person
    email: str = ""
    email_verified: bool = False
    hd: str = ""  # Google Workspace domain from the ID token; never derived from email
    name: str = ""
    picture: str = ""
    created_at: float = 0.0
    last_login_at: float = 0.0


@dataclass(frozen=True)
class Client:
    client_id: str
    client_name: str
    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str = "none"  # none | client_secret_basic | client_secret_post
    secret_hash: str = ""  # hash of the client secret for confidential clients
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token")
    response_types: tuple[str, ...] = ("code",)
    application_type: str = "web"  # web | native
    scope: str = ""
    kind: str = "dcr"  # dcr | static (CLI) | cimd (cached metadata document)
    metadata: dict = field(default_factory=dict, compare=False, hash=False)  # the rest, as sent
    created_at: float = 0.0
    last_used_at: float = 0.0


@dataclass(frozen=True)
class Server:
    server_id: str  # srv_…
    name: str
    upstream_url: str
    owner_sub: str = ""  # empty until the owner's first verified sign-in binds it
    owner_email: str = ""  # lower-case; used to bind owner_sub at first sign-in
    upstream_headers_enc: str = ""  # SecretBox ciphertext of a JSON object of headers
    forward_identity: bool = False
    created_at: float = 0.0
    # An administrator or the operator's CLI chose this upstream URL: the proxy may reach
    # it at an internal (allow-listed, non-public) address. False: public addresses only,
    # checked at every connection, so a name re-pointed inward later (DNS rebinding) is
    # refused. Set and cleared by ServerRegistry.add/update, never by the owner.
    internal_upstream: bool = False
    # The default tool rule (storage.tools.ToolRule), for everyone, the owner included,
    # and pinning: changed or new tools unavailable until the owner approves them.
    tools_allow: tuple[str, ...] = ()
    tools_deny: tuple[str, ...] = ()
    tools_read_only: bool = False
    tools_pinned: bool = False
    # Connected accounts (storage.upstream_auth): "oauth" when each user connects their own
    # account at the upstream's authorization server, else "none". The rest configures that
    # trip (services.proxy.upstream_auth.clients.UpstreamAuthSettings reads them): a static
    # client (its secret SecretBox ciphertext bound to the server), the scope, an extra
    # `audience`, whether `resource` (RFC 8707) is sent, and an authorization server named by
    # the owner for upstreams without RFC 9728 metadata. Rows from before read as "none".
    upstream_auth: str = "none"
    upstream_client_id: str = ""
    upstream_client_secret_enc: str = ""
    upstream_scope: str = ""
    upstream_audience: str = ""
    upstream_send_resource: bool = True
    upstream_issuer: str = ""


# Host suffixes that no outside party's DNS answers for: loopback names, mDNS, and names
# reserved for private networks (RFC 6761, RFC 6762, RFC 8375, ICANN's .internal) and
# their common private-use cousins.
_PRIVATE_NAME_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan", ".localdomain",
                          ".intranet", ".corp", ".private")


def legacy_internal_upstream(url: str) -> bool:
    """`Server.internal_upstream` for a record stored before the flag existed (the SQLite
    migration and DynamoDB items without the attribute): True when the URL points at an
    internal place without asking public DNS, i.e. a non-public IP literal, `localhost`,
    a single-label name (a compose service, /etc/hosts) or a private-use suffix. Such a
    server was accepted under the old rules and keeps working; nobody outside can re-point
    those names. Any other name gets False (public addresses only), which cannot be
    rebound inward; an operator re-approves one that must reach inward with
    `servers edit ID --upstream URL`."""
    try:
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "." not in host or host.endswith(_PRIVATE_NAME_SUFFIXES)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


@dataclass(frozen=True)
class Grant:
    server_id: str
    kind: str  # email | domain
    value: str  # lower-case e-mail address or domain
    created_at: float = 0.0
    # This grant's tool rule (storage.tools.ToolRule), narrowing the server's default.
    tools_allow: tuple[str, ...] = ()
    tools_deny: tuple[str, ...] = ()
    tools_read_only: bool = False


@dataclass(frozen=True)
class Pending:
    """Short-lived single-use state: an /authorize in flight, an IdP login state, …"""

    kind: str
    key: str
    payload: dict
    expires_at: float


@dataclass(frozen=True)
class AuthCode:
    code_hash: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    user_sub: str
    scope: str
    audience: str
    expires_at: float
    family_id: str  # the refresh family this code starts; revoked when the code is replayed
    used: bool = False


@dataclass(frozen=True)
class RefreshToken:
    token_hash: str
    family_id: str
    client_id: str
    user_sub: str
    scope: str
    audience: str
    created_at: float
    expires_at: float  # idle expiry of this token (rotation extends the family)
    family_expires_at: float  # absolute lifetime of the family
    used_at: float = 0.0  # set once, when rotated
    replaced_by: str = ""  # hash of the successor
    successor_enc: str = ""  # SecretBox ciphertext of the successor pair, for the grace window


@dataclass(frozen=True)
class RefreshFamily:
    family_id: str
    client_id: str
    user_sub: str
    audience: str
    scope: str
    created_at: float
    expires_at: float
    revoked_at: float = 0.0
    last_used_at: float = 0.0


@dataclass(frozen=True)
class Consent:
    user_sub: str
    client_id: str
    audience: str
    scope: str
    created_at: float


@dataclass(frozen=True)
class McpSession:
    session_id: str  # the gateway's id, shown to the client
    upstream_session_id: str  # the upstream's id, never shown to the client
    user_sub: str
    server_id: str
    protocol_version: str
    created_at: float
    expires_at: float  # idle expiry, pushed forward by touch_session


SIGNING_KEY_STATUSES = ("active", "retiring", "retired")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key_enc: str  # SecretBox ciphertext of the PEM private key
    public_jwk: dict = field(compare=False, hash=False)
    status: str = "active"  # active | retiring (verifies only) | retired (gone from JWKS)
    created_at: float = 0.0
    retire_at: float = 0.0  # for retiring keys: when the longest token they signed expires


@dataclass(frozen=True)
class RevokedAccessToken:
    jti: str
    expires_at: float  # kept until the token would have expired anyway
