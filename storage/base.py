"""The storage contract: the abstract async `Storage` (records in `storage.records`); one lookup,
query or conditional write per method, at-most-once steps race-safe (docs/architecture.md §7–9)."""

from __future__ import annotations

import abc

from .records import (  # noqa: F401 (the records are part of the contract)
    SIGNING_KEY_STATUSES,
    AuthCode,
    Client,
    Consent,
    Grant,
    McpSession,
    Pending,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Server,
    SigningKey,
    User,
    legacy_internal_upstream,
)

# Usage analytics and the tool catalog live with their own interfaces; re-exported here,
# with the records.
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
