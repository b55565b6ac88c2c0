"""The storage contract: record dataclasses and the abstract async `Storage` interface.

Methods are named after access patterns so that every backend serves each one with a
single key lookup, one query or one conditional write (SQLite: one indexed statement in
a transaction; DynamoDB: one item or one partition). Anything that must happen at most
once (redeem a code, rotate a refresh token, take a pending state, create the first
signing key) is a conditional write that is safe when two processes race.

Times are float UNIX seconds. Secrets never reach storage in clear: tokens and codes are
stored as hashes, private material as ciphertext made by `services.keys.SecretBox`.
"""

from __future__ import annotations

import abc
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Usage analytics and the tool catalog live with their own interfaces; re-exported here,
# where the records are.
from .tools import ToolChange, ToolEntry, ToolRule, ToolStore, ToolUpdate  # noqa: F401
from .upstream_auth import UpstreamAuthStore, UpstreamCredential, UpstreamRegistration  # noqa: F401
from .usage import (  # noqa: F401
    LATENCY_BUCKETS,
    ServerUser,
    UsageAggregate,
    UsageEvent,
    UsagePeriod,
    UsageRollup,
    UsageStore,
    latency_bucket,
    latency_bucket_bounds,
)


class StorageError(Exception):
    """A backend failure that is not the caller's fault."""


class StorageUnavailable(StorageError):
    """The store cannot take this operation right now (locked, read-only, full, throttled):
    the caller answers 503 with Retry-After and nothing is half-written."""

    def __init__(self, message: str = "storage is unavailable", retry_after: int = 2):
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(StorageError):
    """A conditional write lost: the key exists already or the condition no longer holds."""


# --------------------------------------------------------------------------- records


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


# ------------------------------------------------------------------------- interface


class Storage(abc.ABC):
    """Every persistent operation of the gateway but usage analytics, which are `usage`,
    and tool rules and catalogs, which are `tools`.
    All methods are async and never block the event loop; backends run their blocking
    drivers in an executor."""

    # Usage events and aggregates (storage.usage.UsageStore) on the same store, sharing
    # this object's connections: set by each backend's constructor.
    usage: UsageStore
    # Tool rules and the tool catalog (storage.tools.ToolStore), the same way.
    tools: ToolStore
    # Connected accounts: upstream credentials, registrations, refresh leases
    # (storage.upstream_auth.UpstreamAuthStore), the same way.
    upstream_auth: UpstreamAuthStore

    # lifecycle
    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema; idempotent and safe for racing processes."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Readiness: raise StorageError (StorageUnavailable for a passing fault) when the
        store cannot serve requests, writes included where the backend can tell cheaply
        (SQLite: a real write probe on its own connection, at most once a second). Answers
        within about a second, even while other writes wait on a lock."""

    # users
    @abc.abstractmethod
    async def upsert_user(self, user: User) -> User:
        """Insert or update by `sub`; keeps the original created_at. Returns the stored row."""

    @abc.abstractmethod
    async def get_user(self, sub: str) -> User | None: ...

    @abc.abstractmethod
    async def list_users(self) -> list[User]:
        """Every user, by e-mail then sub (the operator's `users list`; DynamoDB: one Scan)."""

    @abc.abstractmethod
    async def delete_user(self, sub: str) -> bool:
        """Delete the user row alone; False if unknown. What else the user holds is removed
        first by the caller (services/ops/users.py), so a failure half-way can be re-run."""

    @abc.abstractmethod
    async def delete_user_consents(self, sub: str) -> int:
        """Delete every remembered consent of the user (all clients and audiences)."""

    @abc.abstractmethod
    async def delete_user_sessions(self, sub: str) -> int:
        """Delete every MCP session of the user (all servers; not a hot path)."""

    # clients
    @abc.abstractmethod
    async def create_client(self, client: Client) -> None:
        """Raise Conflict when the client_id exists."""

    @abc.abstractmethod
    async def put_client(self, client: Client) -> None:
        """Insert or replace (used for cached client ID metadata documents)."""

    @abc.abstractmethod
    async def get_client(self, client_id: str) -> Client | None: ...

    @abc.abstractmethod
    async def touch_client(self, client_id: str, at: float) -> None:
        """Record that a client was used (authorize or token), for idle reaping."""

    @abc.abstractmethod
    async def delete_client(self, client_id: str) -> bool: ...

    @abc.abstractmethod
    async def reap_idle_clients(self, kind: str, unused_since: float, limit: int = 500) -> int:
        """Delete up to `limit` clients of `kind` last used (or created, if never used)
        before `unused_since` that hold no live refresh family. Background job, not a hot path."""

    # servers and sharing rules
    @abc.abstractmethod
    async def create_server(self, server: Server) -> None:
        """Raise Conflict when the server_id exists."""

    @abc.abstractmethod
    async def update_server(self, server: Server) -> None:
        """Replace an existing server; raise KeyError when it does not exist."""

    @abc.abstractmethod
    async def get_server(self, server_id: str) -> Server | None: ...

    @abc.abstractmethod
    async def list_servers(self) -> list[Server]:
        """All servers (admin views and the CLI)."""

    @abc.abstractmethod
    async def servers_owned_by(self, sub: str) -> list[Server]: ...

    @abc.abstractmethod
    async def bind_owner(self, email: str, sub: str) -> int:
        """Set owner_sub on servers whose owner_email is `email` and owner_sub is empty."""

    @abc.abstractmethod
    async def delete_server(self, server_id: str) -> bool:
        """Delete the server, its grants, its sessions and its tool catalog and history."""

    @abc.abstractmethod
    async def add_grant(self, grant: Grant) -> bool:
        """False when the same grant exists already."""

    @abc.abstractmethod
    async def remove_grant(self, server_id: str, kind: str, value: str) -> bool: ...

    @abc.abstractmethod
    async def grants_for(self, server_id: str) -> list[Grant]: ...

    @abc.abstractmethod
    async def grants_matching(self, kind: str, value: str) -> list[Grant]:
        """Grants naming this e-mail (kind=email) or domain (kind=domain): 'shared with me'."""

    @abc.abstractmethod
    async def users_matching(self, kind: str, value: str) -> list[User]:
        """Users who have signed in with this e-mail (kind=email) or Workspace domain
        (kind=domain, the hd claim): who a sharing rule has actually reached."""

    # short-lived single-use state
    @abc.abstractmethod
    async def put_pending(self, pending: Pending) -> None: ...

    @abc.abstractmethod
    async def get_pending(self, kind: str, key: str, now: float) -> Pending | None:
        """The unexpired record, without consuming it."""

    @abc.abstractmethod
    async def take_pending(self, kind: str, key: str, now: float) -> Pending | None:
        """Atomically delete and return the unexpired record; None for a second taker."""

    # authorization codes
    @abc.abstractmethod
    async def put_code(self, code: AuthCode) -> None: ...

    @abc.abstractmethod
    async def redeem_code(self, code_hash: str) -> tuple[AuthCode | None, bool]:
        """Mark the code used in one conditional write. Returns (code, first_use):
        (code, True) for the first redemption, (code, False) for a replay, (None, False)
        when unknown. Expiry is the caller's check."""

    # refresh tokens
    @abc.abstractmethod
    async def create_family(self, family: RefreshFamily, first: RefreshToken) -> None: ...

    @abc.abstractmethod
    async def get_family(self, family_id: str) -> RefreshFamily | None: ...

    @abc.abstractmethod
    async def families_of_user(self, user_sub: str) -> list[RefreshFamily]:
        """Live and revoked families of a user ('my authorizations')."""

    @abc.abstractmethod
    async def get_refresh_token(self, token_hash: str) -> RefreshToken | None: ...

    @abc.abstractmethod
    async def rotate_refresh_token(
        self, old_hash: str, successor: RefreshToken, successor_enc: str, now: float
    ) -> bool:
        """If `old_hash` is unused: mark it used (replaced_by, successor_enc, used_at=now),
        insert `successor` and touch the family, all or nothing. False when it was
        used already (the caller then applies the grace-window / theft rule)."""

    @abc.abstractmethod
    async def revoke_family(self, family_id: str, at: float) -> bool:
        """Mark the family revoked (every token of it stops working). False if unknown."""

    # consent
    @abc.abstractmethod
    async def get_consent(self, user_sub: str, client_id: str, audience: str) -> Consent | None: ...

    @abc.abstractmethod
    async def put_consent(self, consent: Consent) -> None: ...

    @abc.abstractmethod
    async def delete_consents(self, user_sub: str, client_id: str) -> int: ...

    # signing keys
    @abc.abstractmethod
    async def list_signing_keys(self) -> list[SigningKey]: ...

    @abc.abstractmethod
    async def add_signing_key(self, key: SigningKey, only_if_none_active: bool = False) -> bool:
        """Insert a key. With only_if_none_active, succeed only when no active key exists
        (race-safe first start); False when another process won."""

    @abc.abstractmethod
    async def set_signing_key_status(self, kid: str, status: str, retire_at: float = 0.0) -> None: ...

    # revoked access tokens (RFC 7009 for JWTs)
    @abc.abstractmethod
    async def revoke_access_token(self, revoked: RevokedAccessToken) -> None: ...

    @abc.abstractmethod
    async def revoked_access_tokens(self, now: float) -> list[RevokedAccessToken]:
        """The unexpired revocations (a small set: bounded by the access-token lifetime)."""

    # MCP sessions
    @abc.abstractmethod
    async def put_session(self, session: McpSession) -> None: ...

    @abc.abstractmethod
    async def get_session(self, session_id: str, now: float) -> McpSession | None: ...

    @abc.abstractmethod
    async def touch_session(self, session_id: str, expires_at: float) -> None: ...

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    async def count_sessions(self, server_id: str, now: float) -> int:
        """Unexpired MCP sessions of one server (the usage page's 'active sessions')."""

    # housekeeping
    @abc.abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Drop expired pending states, codes, sessions, revocations and dead tokens, and
        hourly usage aggregates older than storage.usage.HOURLY_KEPT_SECONDS."""
