"""The SQLite schema: forward migrations (DDL) applied in order under `PRAGMA
user_version`, and `migrate`, which brings a connection's database up to date."""

from __future__ import annotations

import sqlite3

from ..base import (
    StorageError,
    legacy_internal_upstream,
)
from ..usage import (
    HOURLY_KEPT_SECONDS,
    LATENCY_BUCKETS,
    latency_bucket_bounds,
)
from .connection import _transaction

HIST_COLUMNS = tuple(f"h{i}" for i in range(LATENCY_BUCKETS))
# The bucket of an event's latency, in SQL (the same bounds as latency_bucket).
_BUCKET_SQL = (
    "CASE "
    + " ".join(
        f"WHEN latency_ms <= {latency_bucket_bounds(i)[1]!r} THEN {i}" for i in range(LATENCY_BUCKETS - 1)
    )
    + f" ELSE {LATENCY_BUCKETS - 1} END"
)

# Forward migrations, applied in order; user_version is the number applied. Append
# new entries, never edit a released one. Each entry is a sequence of statements rather
# than one script because sqlite3's executescript() commits first, which would break
# the all-or-nothing migration transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            sub TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            email_verified INTEGER NOT NULL,
            hd TEXT NOT NULL,
            name TEXT NOT NULL,
            picture TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_login_at REAL NOT NULL
        )""",
        """CREATE TABLE clients (
            client_id TEXT PRIMARY KEY,
            client_name TEXT NOT NULL,
            redirect_uris TEXT NOT NULL,
            token_endpoint_auth_method TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            grant_types TEXT NOT NULL,
            response_types TEXT NOT NULL,
            application_type TEXT NOT NULL,
            scope TEXT NOT NULL,
            kind TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_used_at REAL NOT NULL
        )""",
        # The expression must match reap_idle_clients' WHERE clause for the index to
        # be used.
        """CREATE INDEX clients_by_kind_idle
            ON clients (kind, max(created_at, last_used_at))""",
        """CREATE TABLE servers (
            server_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            upstream_url TEXT NOT NULL,
            owner_sub TEXT NOT NULL,
            owner_email TEXT NOT NULL,
            upstream_headers_enc TEXT NOT NULL,
            forward_identity INTEGER NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX servers_by_owner_sub ON servers (owner_sub)",
        "CREATE INDEX servers_by_owner_email ON servers (owner_email)",
        """CREATE TABLE grants (
            server_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (server_id, kind, value)
        ) WITHOUT ROWID""",
        "CREATE INDEX grants_by_kind_value ON grants (kind, value)",
        """CREATE TABLE pending (
            kind TEXT NOT NULL,
            "key" TEXT NOT NULL,
            payload TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (kind, "key")
        ) WITHOUT ROWID""",
        "CREATE INDEX pending_by_expiry ON pending (expires_at)",
        """CREATE TABLE codes (
            code_hash TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            redirect_uri TEXT NOT NULL,
            code_challenge TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            scope TEXT NOT NULL,
            audience TEXT NOT NULL,
            expires_at REAL NOT NULL,
            family_id TEXT NOT NULL,
            used INTEGER NOT NULL
        )""",
        "CREATE INDEX codes_by_expiry ON codes (expires_at)",
        """CREATE TABLE refresh_families (
            family_id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            audience TEXT NOT NULL,
            scope TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL NOT NULL,
            last_used_at REAL NOT NULL
        )""",
        "CREATE INDEX families_by_user ON refresh_families (user_sub)",
        "CREATE INDEX families_by_client ON refresh_families (client_id)",
        """CREATE TABLE refresh_tokens (
            token_hash TEXT PRIMARY KEY,
            family_id TEXT NOT NULL,
            client_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            scope TEXT NOT NULL,
            audience TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            family_expires_at REAL NOT NULL,
            used_at REAL NOT NULL,
            replaced_by TEXT NOT NULL,
            successor_enc TEXT NOT NULL
        )""",
        "CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family_id)",
        """CREATE TABLE consents (
            user_sub TEXT NOT NULL,
            client_id TEXT NOT NULL,
            audience TEXT NOT NULL,
            scope TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (user_sub, client_id, audience)
        ) WITHOUT ROWID""",
        """CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            private_key_enc TEXT NOT NULL,
            public_jwk TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            retire_at REAL NOT NULL
        )""",
        "CREATE INDEX signing_keys_by_status ON signing_keys (status)",
        """CREATE TABLE revoked_access_tokens (
            jti TEXT PRIMARY KEY,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX revoked_access_tokens_by_expiry ON revoked_access_tokens (expires_at)",
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            upstream_session_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            server_id TEXT NOT NULL,
            protocol_version TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX sessions_by_server ON sessions (server_id)",
        "CREATE INDEX sessions_by_expiry ON sessions (expires_at)",
        # The explicit id orders events that share a timestamp.
        """CREATE TABLE usage_events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            server_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            user_email TEXT NOT NULL,
            client_id TEXT NOT NULL,
            method TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome TEXT NOT NULL,
            latency_ms REAL NOT NULL,
            bytes_in INTEGER NOT NULL,
            bytes_out INTEGER NOT NULL,
            era TEXT NOT NULL
        )""",
        "CREATE INDEX usage_events_by_server_at ON usage_events (server_id, at)",
        """CREATE TABLE usage_daily (
            day TEXT NOT NULL,
            server_id TEXT NOT NULL,
            target TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            calls INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            latency_ms_sum REAL NOT NULL,
            latency_ms_max REAL NOT NULL,
            PRIMARY KEY (day, server_id, target, user_sub)
        ) WITHOUT ROWID""",
        "CREATE INDEX usage_daily_by_server_day ON usage_daily (server_id, day)",
    ),
    # 2: the dashboard. A latency histogram in the daily aggregates (one integer column
    # per fixed bucket, so SQL can add histograms up); who has used each server and when;
    # user lookups by e-mail and Workspace domain for the sharing list.
    (
        # Rebuilt rather than altered: keyed by server first, so that a server's days are
        # one contiguous range of the table (the usage page reads them without lookups).
        f"""CREATE TABLE usage_daily_v2 (
            server_id TEXT NOT NULL,
            day TEXT NOT NULL,
            target TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            calls INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            latency_ms_sum REAL NOT NULL,
            latency_ms_max REAL NOT NULL,
            {", ".join(f"h{i} INTEGER NOT NULL DEFAULT 0" for i in range(LATENCY_BUCKETS))},
            PRIMARY KEY (server_id, day, target, user_sub)
        ) WITHOUT ROWID""",
        """INSERT INTO usage_daily_v2
            (server_id, day, target, user_sub, calls, errors, latency_ms_sum, latency_ms_max)
            SELECT server_id, day, target, user_sub, calls, errors, latency_ms_sum, latency_ms_max
            FROM usage_daily""",
        "DROP TABLE usage_daily",
        "ALTER TABLE usage_daily_v2 RENAME TO usage_daily",
        """CREATE TABLE usage_users (
            server_id TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            user_email TEXT NOT NULL,
            first_used_at REAL NOT NULL,
            last_used_at REAL NOT NULL,
            PRIMARY KEY (server_id, user_sub)
        ) WITHOUT ROWID""",
        """INSERT INTO usage_users
            SELECT server_id, user_sub, max(user_email), min(at), max(at)
            FROM usage_events GROUP BY server_id, user_sub""",
        "CREATE INDEX users_by_email ON users (email)",
        "CREATE INDEX users_by_hd ON users (hd)",
    ),
    # 3: hourly aggregates, the same shape as the daily ones, so that the 24-hour usage
    # view reads aggregates too instead of a day of raw events. Kept for a few days only.
    (
        f"""CREATE TABLE usage_hourly (
            server_id TEXT NOT NULL,
            hour TEXT NOT NULL,
            target TEXT NOT NULL,
            user_sub TEXT NOT NULL,
            calls INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            latency_ms_sum REAL NOT NULL,
            latency_ms_max REAL NOT NULL,
            {", ".join(f"h{i} INTEGER NOT NULL DEFAULT 0" for i in range(LATENCY_BUCKETS))},
            PRIMARY KEY (server_id, hour, target, user_sub)
        ) WITHOUT ROWID""",
        f"""INSERT INTO usage_hourly
            SELECT server_id, strftime('%Y-%m-%dT%H', at, 'unixepoch'), target, user_sub, count(*),
                   sum(outcome != 'ok'), sum(latency_ms), max(latency_ms),
                   {", ".join(f"sum(bucket = {i})" for i in range(LATENCY_BUCKETS))}
            FROM (SELECT *, {_BUCKET_SQL} AS bucket FROM usage_events
                  WHERE at >= strftime('%s', 'now') - {HOURLY_KEPT_SECONDS})
            GROUP BY 1, 2, 3, 4""",
    ),
    # 4: who may reach internal upstreams is recorded per server (Server.internal_upstream).
    # Servers from before keep working when their URL plainly points inward (the operator
    # registered them under the old rules); see storage.base.legacy_internal_upstream.
    (
        "ALTER TABLE servers ADD COLUMN internal_upstream INTEGER NOT NULL DEFAULT 0",
        "UPDATE servers SET internal_upstream = 1 WHERE legacy_internal_upstream(upstream_url)",
    ),
    # 5: tool policy and the tool catalog. Rules are columns of servers (the default rule
    # and pinning) and grants (each grant's narrowing), read with them; lists are JSON
    # text. Existing servers and grants get the empty rule: every tool, as before.
    (
        "ALTER TABLE servers ADD COLUMN tools_allow TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE servers ADD COLUMN tools_deny TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE servers ADD COLUMN tools_read_only INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE servers ADD COLUMN tools_pinned INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE grants ADD COLUMN tools_allow TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE grants ADD COLUMN tools_deny TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE grants ADD COLUMN tools_read_only INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE tool_catalog (
            server_id TEXT NOT NULL,
            name TEXT NOT NULL,
            title TEXT NOT NULL,
            description TEXT NOT NULL,
            input_schema TEXT NOT NULL,
            annotations TEXT NOT NULL,
            hash TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_changed REAL NOT NULL,
            approved_hash TEXT NOT NULL,
            PRIMARY KEY (server_id, name)
        ) WITHOUT ROWID""",
        # The explicit id orders lines that share a timestamp and bounds the history.
        """CREATE TABLE tool_history (
            id INTEGER PRIMARY KEY,
            server_id TEXT NOT NULL,
            at REAL NOT NULL,
            tool TEXT NOT NULL,
            kind TEXT NOT NULL,
            old_hash TEXT NOT NULL,
            new_hash TEXT NOT NULL
        )""",
        "CREATE INDEX tool_history_by_server ON tool_history (server_id, id)",
    ),
    # 6: connected accounts (storage.upstream_auth). Token sets are SecretBox ciphertext
    # bound to (user, server, issuer); they, the gateway's registrations at upstream
    # authorization servers and the refresh leases go with their server (the trigger: no
    # caller can forget them).
    (
        """CREATE TABLE upstream_credentials (
            user_sub TEXT NOT NULL,
            server_id TEXT NOT NULL,
            issuer TEXT NOT NULL,
            token_enc TEXT NOT NULL,
            expires_at REAL NOT NULL,
            scope TEXT NOT NULL,
            upstream_subject TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (user_sub, server_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX upstream_credentials_by_server ON upstream_credentials (server_id)",
        """CREATE TABLE upstream_registrations (
            server_id TEXT NOT NULL,
            issuer TEXT NOT NULL,
            client_id TEXT NOT NULL,
            client_secret_enc TEXT NOT NULL,
            kind TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (server_id, issuer)
        ) WITHOUT ROWID""",
        """CREATE TABLE upstream_refresh_leases (
            user_sub TEXT NOT NULL,
            server_id TEXT NOT NULL,
            holder TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (user_sub, server_id)
        ) WITHOUT ROWID""",
        """CREATE TRIGGER upstream_auth_follows_server AFTER DELETE ON servers BEGIN
            DELETE FROM upstream_credentials WHERE server_id = OLD.server_id;
            DELETE FROM upstream_registrations WHERE server_id = OLD.server_id;
            DELETE FROM upstream_refresh_leases WHERE server_id = OLD.server_id;
        END""",
    ),
    # 7: a server's upstream authorization (Server.upstream_auth and its settings). Servers
    # from before need no account: "none", every other setting empty, `resource` sent.
    (
        "ALTER TABLE servers ADD COLUMN upstream_auth TEXT NOT NULL DEFAULT 'none'",
        "ALTER TABLE servers ADD COLUMN upstream_client_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE servers ADD COLUMN upstream_client_secret_enc TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE servers ADD COLUMN upstream_scope TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE servers ADD COLUMN upstream_audience TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE servers ADD COLUMN upstream_send_resource INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE servers ADD COLUMN upstream_issuer TEXT NOT NULL DEFAULT ''",
    ),
    # 8: calls the tool policy refused are counted apart from errors (UsageAggregate.denied);
    # rows from before counted them as errors and read 0 denied.
    (
        "ALTER TABLE usage_daily ADD COLUMN denied INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE usage_hourly ADD COLUMN denied INTEGER NOT NULL DEFAULT 0",
    ),
)



def migrate(conn: sqlite3.Connection, path: str) -> None:
    # Read first: a database already at the latest version needs no write lock, so a
    # gateway can start (and serve reads) on a store it cannot write just now.
    if _schema_version(conn, path) == len(MIGRATIONS):
        return
    # Under IMMEDIATE, a second process opening a fresh file waits here and then
    # finds the schema already at the latest version.
    conn.create_function("legacy_internal_upstream", 1, legacy_internal_upstream, deterministic=True)
    with _transaction(conn):
        version = _schema_version(conn, path)
        for script in MIGRATIONS[version:]:
            for statement in script:
                conn.execute(statement)
        # PRAGMA takes no bound parameters; the value is our own integer.
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

def _schema_version(conn: sqlite3.Connection, path: str) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StorageError(
            f"{path} has schema version {version}, newer than this gateway "
            f"knows ({len(MIGRATIONS)}); upgrade the gateway"
        )
    return version
