"""The storage contract: one suite that every backend must pass, plus the SQLite
specifics (file mode, WAL, migrations, several processes) and `open_storage` parsing.

Each test runs one `asyncio.run`, opening and closing its stores inside that loop.
Races use separate instances on the same store, which for SQLite means separate
connections on separate threads: the same locking as separate processes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from storage import (
    AuthCode,
    Client,
    Conflict,
    Consent,
    DynamoDBStorage,
    Grant,
    McpSession,
    Pending,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Server,
    SigningKey,
    SqliteStorage,
    Storage,
    StorageError,
    ToolChange,
    ToolEntry,
    ToolRule,
    ToolUpdate,
    UsageEvent,
    UsageStore,
    User,
    open_storage,
)
from storage.base import LATENCY_BUCKETS, latency_bucket, latency_bucket_bounds, legacy_internal_upstream
from storage.sqlite import MIGRATIONS

BACKENDS = ["sqlite", "dynamodb"]
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z: a fixed clock for everything but reaping
DAY = 86_400.0
ROOT = Path(__file__).resolve().parent.parent

StorageFactory = Callable[[], Storage]


@pytest.fixture
def dynamodb_table(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """(endpoint, a fresh table name), with dummy credentials for this test only."""
    endpoint = request.getfixturevalue("dynamodb_endpoint")
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return endpoint, f"gw-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=BACKENDS)
def storage_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StorageFactory:
    """Makes new, unopened instances that all share one fresh store."""
    if request.param == "sqlite":
        path = str(tmp_path / "state" / "gateway.db")
        return lambda: SqliteStorage(path)
    if request.param == "dynamodb":
        endpoint, table = request.getfixturevalue("dynamodb_table")
        return lambda: DynamoDBStorage(table, "us-east-1", endpoint)
    raise AssertionError(f"unknown backend {request.param}")


@pytest.fixture
def storage(storage_factory: StorageFactory) -> Storage:
    return storage_factory()


def run(scenario: Callable[..., Awaitable[None]], *stores: Storage) -> None:
    """Open the stores, run the scenario with them, close them: all in one loop."""

    async def main() -> None:
        for store in stores:
            await store.open()
        try:
            await scenario(*stores)
        finally:
            for store in stores:
                await store.close()

    asyncio.run(main())


# ------------------------------------------------------------------------ builders


def client(client_id: str = "c1", kind: str = "dcr", created_at: float = T0, **kw: Any) -> Client:
    defaults = {
        "client_name": f"name of {client_id}",
        "redirect_uris": ("http://127.0.0.1:33418/callback", "cursor://anysphere/oauth"),
    }
    return Client(client_id=client_id, kind=kind, created_at=created_at, **{**defaults, **kw})


def server(server_id: str = "srv_a", owner_sub: str = "", owner_email: str = "o@x.org") -> Server:
    return Server(
        server_id=server_id,
        name=f"server {server_id}",
        upstream_url="http://127.0.0.1:9000/mcp",
        owner_sub=owner_sub,
        owner_email=owner_email,
        upstream_headers_enc="ct:headers",
        forward_identity=True,
        created_at=T0,
    )


def code(code_hash: str = "h1", expires_at: float = T0 + 60) -> AuthCode:
    return AuthCode(
        code_hash=code_hash,
        client_id="c1",
        redirect_uri="http://127.0.0.1:33418/callback",
        code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        user_sub="u1",
        scope="mcp:connect mcp:invoke",
        audience="https://gw.example/mcp/srv_a",
        expires_at=expires_at,
        family_id="fam1",
    )


def family(
    family_id: str = "fam1",
    client_id: str = "c1",
    user_sub: str = "u1",
    created_at: float = T0,
    expires_at: float = T0 + 30 * DAY,
) -> RefreshFamily:
    return RefreshFamily(
        family_id=family_id,
        client_id=client_id,
        user_sub=user_sub,
        audience="https://gw.example/mcp/",
        scope="mcp:connect",
        created_at=created_at,
        expires_at=expires_at,
    )


def refresh(
    token_hash: str,
    family_id: str = "fam1",
    created_at: float = T0,
    family_expires_at: float | None = None,
) -> RefreshToken:
    return RefreshToken(
        token_hash=token_hash,
        family_id=family_id,
        client_id="c1",
        user_sub="u1",
        scope="mcp:connect",
        audience="https://gw.example/mcp/",
        created_at=created_at,
        expires_at=created_at + 7 * DAY,
        family_expires_at=T0 + 30 * DAY if family_expires_at is None else family_expires_at,
    )


def signing_key(kid: str, status: str = "active", created_at: float = T0) -> SigningKey:
    return SigningKey(
        kid=kid,
        private_key_enc=f"ct:{kid}",
        public_jwk={"kty": "RSA", "kid": kid, "n": "AQAB" * 8, "e": "AQAB"},
        status=status,
        created_at=created_at,
    )


def session(
    session_id: str = "s1", server_id: str = "srv_a", expires_at: float = T0 + 600
) -> McpSession:
    return McpSession(
        session_id=session_id,
        upstream_session_id=f"up-{session_id}",
        user_sub="u1",
        server_id=server_id,
        protocol_version="2025-11-25",
        created_at=T0,
        expires_at=expires_at,
    )


def event(
    at: float,
    server_id: str = "srv_a",
    target: str = "search",
    user_sub: str = "u1",
    outcome: str = "ok",
    latency_ms: float = 10.0,
) -> UsageEvent:
    return UsageEvent(
        at=at,
        server_id=server_id,
        user_sub=user_sub,
        user_email=f"{user_sub}@x.org",
        client_id="c1",
        method="tools/call",
        target=target,
        outcome=outcome,
        latency_ms=latency_ms,
        bytes_in=100,
        bytes_out=2000,
        era="2025",
    )


# ----------------------------------------------------------------------- lifecycle


def test_open_is_idempotent_and_data_survives_reopening(
    storage: Storage, storage_factory: StorageFactory
) -> None:
    async def first(s: Storage) -> None:
        await s.open()  # a second open() on the same instance is harmless
        await s.ping()
        await s.create_server(server())

    async def again(a: Storage, b: Storage) -> None:
        assert await a.get_server("srv_a") == server()
        assert await b.get_server("srv_a") == server()

    run(first, storage)
    run(again, storage_factory(), storage_factory())


def test_calls_on_a_store_that_is_not_open_raise_storage_error(storage: Storage) -> None:
    async def scenario() -> None:
        with pytest.raises(StorageError):
            await storage.ping()
        await storage.open()
        await storage.ping()
        await storage.close()
        await storage.close()  # closing twice is harmless
        with pytest.raises(StorageError):
            await storage.get_user("u1")

    asyncio.run(scenario())


# --------------------------------------------------------------------------- users


def test_upsert_user_keeps_created_at_and_updates_the_rest(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        assert await s.get_user("u1") is None
        first = User("u1", "a@x.org", True, "x.org", "A", "", created_at=T0, last_login_at=T0)
        assert await s.upsert_user(first) == first
        later = User(
            "u1", "b@x.org", False, "", "B", "pic", created_at=T0 + 99, last_login_at=T0 + 99
        )
        stored = await s.upsert_user(later)
        assert stored == User("u1", "b@x.org", False, "", "B", "pic", T0, T0 + 99)
        assert await s.get_user("u1") == stored

    run(scenario, storage)


# ------------------------------------------------------------------------- clients


def test_clients_create_conflict_put_touch_delete(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        original = client(metadata={"logo_uri": "https://x.org/l.png", "contacts": ["a@x.org"]})
        await s.create_client(original)
        with pytest.raises(Conflict):
            await s.create_client(client(client_name="impostor"))
        stored = await s.get_client("c1")
        assert stored == original
        assert stored.metadata == original.metadata  # metadata is compare=False
        assert isinstance(stored.redirect_uris, tuple)
        assert stored.grant_types == ("authorization_code", "refresh_token")

        replaced = client(kind="cimd", scope="mcp:connect", metadata={"v": 2})
        await s.put_client(replaced)
        await s.put_client(client("c2", kind="cimd"))  # put also inserts
        assert await s.get_client("c1") == replaced
        assert (await s.get_client("c1")).metadata == {"v": 2}
        assert await s.get_client("c2") is not None

        await s.touch_client("c1", T0 + 50)
        await s.touch_client("c1", T0 + 10)  # out of order: never moves backwards
        await s.touch_client("nope", T0)
        assert (await s.get_client("c1")).last_used_at == T0 + 50

        assert await s.delete_client("c1") is True
        assert await s.delete_client("c1") is False
        assert await s.get_client("c1") is None

    run(scenario, storage)


def test_reap_idle_clients(storage: Storage) -> None:
    now = time.time()
    old, recent, cutoff = now - 90 * DAY, now - DAY, now - 30 * DAY

    async def scenario(s: Storage) -> None:
        await s.create_client(client("idle", created_at=old))
        await s.create_client(client("idle-used-long-ago", created_at=old, last_used_at=old + 1))
        await s.create_client(client("used-recently", created_at=old, last_used_at=recent))
        await s.create_client(client("new", created_at=recent))
        await s.create_client(client("static", kind="static", created_at=old))
        await s.create_client(client("live-family", created_at=old))
        await s.create_client(client("revoked-family", created_at=old))
        await s.create_client(client("expired-family", created_at=old))
        await s.create_family(
            family("f-live", "live-family", expires_at=now + DAY), refresh("t-live", "f-live")
        )
        await s.create_family(
            family("f-rev", "revoked-family", expires_at=now + DAY), refresh("t-rev", "f-rev")
        )
        await s.revoke_family("f-rev", now)
        await s.create_family(
            family("f-exp", "expired-family", expires_at=now - 1), refresh("t-exp", "f-exp")
        )

        assert await s.reap_idle_clients("dcr", cutoff, limit=2) == 2
        assert await s.reap_idle_clients("dcr", cutoff) == 2
        assert await s.reap_idle_clients("dcr", cutoff) == 0
        remaining = [
            cid
            for cid in (
                "idle",
                "idle-used-long-ago",
                "used-recently",
                "new",
                "static",
                "live-family",
                "revoked-family",
                "expired-family",
            )
            if await s.get_client(cid) is not None
        ]
        assert remaining == ["used-recently", "new", "static", "live-family"]

    run(scenario, storage)


# ------------------------------------------------------------------------- servers


def test_servers_create_update_list_and_owner_lookups(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.create_server(server("srv_a", owner_sub="u1"))
        with pytest.raises(Conflict):
            await s.create_server(server("srv_a"))
        await s.create_server(server("srv_b", owner_sub="u2"))
        await s.create_server(server("srv_c", owner_sub="u1"))

        assert await s.get_server("srv_zzz") is None
        assert [x.server_id for x in await s.list_servers()] == ["srv_a", "srv_b", "srv_c"]
        assert [x.server_id for x in await s.servers_owned_by("u1")] == ["srv_a", "srv_c"]
        assert await s.servers_owned_by("nobody") == []

        changed = Server("srv_b", "renamed", "http://127.0.0.1:9001/mcp", "u1", "n@x.org")
        await s.update_server(changed)
        assert await s.get_server("srv_b") == changed
        assert [x.server_id for x in await s.servers_owned_by("u1")] == [
            "srv_b",  # created_at 0 after the update sorts first
            "srv_a",
            "srv_c",
        ]
        with pytest.raises(KeyError):
            await s.update_server(server("srv_missing"))
        assert await s.get_server("srv_missing") is None

    run(scenario, storage)


def test_bind_owner_binds_only_unbound_servers_of_that_email(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.create_server(server("srv_1", owner_email="o@x.org"))
        await s.create_server(server("srv_2", owner_email="o@x.org"))
        await s.create_server(server("srv_3", owner_email="o@x.org", owner_sub="someone-else"))
        await s.create_server(server("srv_4", owner_email="other@x.org"))

        assert await s.bind_owner("o@x.org", "u-o") == 2
        assert await s.bind_owner("o@x.org", "u-intruder") == 0
        owners = {x.server_id: x.owner_sub for x in await s.list_servers()}
        assert owners == {"srv_1": "u-o", "srv_2": "u-o", "srv_3": "someone-else", "srv_4": ""}

    run(scenario, storage)


def test_server_internal_upstream_flag_round_trips(storage: Storage) -> None:
    """Server.internal_upstream (an administrator or the CLI approved internal targets) is
    stored, read back by every lookup, changed by update_server and kept by bind_owner."""

    async def scenario(s: Storage) -> None:
        approved = replace(server("srv_in", owner_email="o@x.org"), internal_upstream=True)
        await s.create_server(approved)
        await s.create_server(server("srv_out", owner_email="o@x.org"))
        assert (await s.get_server("srv_in")).internal_upstream is True
        assert (await s.get_server("srv_out")).internal_upstream is False
        assert {x.server_id: x.internal_upstream for x in await s.list_servers()} == {
            "srv_in": True, "srv_out": False}
        assert await s.bind_owner("o@x.org", "u-o") == 2
        assert {x.server_id: x.internal_upstream for x in await s.servers_owned_by("u-o")} == {
            "srv_in": True, "srv_out": False}
        await s.update_server(replace(await s.get_server("srv_in"), internal_upstream=False))
        await s.update_server(replace(await s.get_server("srv_out"), internal_upstream=True))
        assert (await s.get_server("srv_in")).internal_upstream is False
        assert (await s.get_server("srv_out")).internal_upstream is True

    run(scenario, storage)


UPSTREAM_AUTH_FIELDS = ("upstream_auth", "upstream_client_id", "upstream_client_secret_enc", "upstream_scope",
                        "upstream_audience", "upstream_send_resource", "upstream_issuer")


def upstream_auth_of(record: Server) -> dict:
    return {name: getattr(record, name) for name in UPSTREAM_AUTH_FIELDS}


NO_UPSTREAM_AUTH = upstream_auth_of(Server("srv_x", "x", "https://x"))


def test_server_upstream_auth_settings_round_trip(storage: Storage) -> None:
    """A server's upstream authorization (connected accounts) is stored, read back by every
    lookup, changed by update_server; a server without it needs no account."""
    settings = {"upstream_auth": "oauth", "upstream_client_id": "gw-client", "upstream_client_secret_enc": "v1.sealed",
                "upstream_scope": "repo read:user", "upstream_audience": "https://api.example.com",
                "upstream_send_resource": False, "upstream_issuer": "https://as.example.com"}

    async def scenario(s: Storage) -> None:
        await s.create_server(replace(server("srv_oauth", owner_email="o@x.org"), **settings))
        await s.create_server(server("srv_plain", owner_email="o@x.org"))
        assert upstream_auth_of(await s.get_server("srv_oauth")) == settings
        assert upstream_auth_of(await s.get_server("srv_plain")) == NO_UPSTREAM_AUTH
        assert NO_UPSTREAM_AUTH["upstream_auth"] == "none" and NO_UPSTREAM_AUTH["upstream_send_resource"] is True
        assert {x.server_id: x.upstream_auth for x in await s.list_servers()} == {
            "srv_oauth": "oauth", "srv_plain": "none"}
        await s.bind_owner("o@x.org", "u-o")
        assert {x.server_id: upstream_auth_of(x) for x in await s.servers_owned_by("u-o")} == {
            "srv_oauth": settings, "srv_plain": NO_UPSTREAM_AUTH}
        await s.update_server(replace(await s.get_server("srv_oauth"), **NO_UPSTREAM_AUTH))
        assert upstream_auth_of(await s.get_server("srv_oauth")) == NO_UPSTREAM_AUTH

    run(scenario, storage)


def test_sqlite_migration_7_gives_old_servers_no_upstream_auth(tmp_path: Path) -> None:
    path = tmp_path / "v6.db"
    with sqlite3.connect(path) as conn:
        conn.create_function("legacy_internal_upstream", 1, legacy_internal_upstream)  # migration 4's
        for migration in MIGRATIONS[:6]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 6")
        conn.execute("INSERT INTO servers (server_id, name, upstream_url, owner_sub, owner_email, "
                     "upstream_headers_enc, forward_identity, created_at) "
                     "VALUES ('srv_old', 'old', 'https://mcp.example.com/mcp', '', 'o@x.org', '', 0, ?)", (T0,))

    async def scenario(s: Storage) -> None:
        assert upstream_auth_of(await s.get_server("srv_old")) == NO_UPSTREAM_AUTH

    run(scenario, SqliteStorage(str(path)))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_dynamodb_server_items_from_before_upstream_auth_need_no_account(dynamodb_table: Any) -> None:
    import boto3

    endpoint, table = dynamodb_table
    storage = DynamoDBStorage(table, "us-east-1", endpoint)

    async def scenario(s: Storage) -> None:
        await s.create_server(replace(server("srv_old"), upstream_auth="oauth", upstream_send_resource=False))
        db = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=endpoint)
        # As an item written before the attributes existed.
        db.update_item(TableName=table, Key={"PK": {"S": "SERVER#srv_old"}, "SK": {"S": "SERVER"}},
                       UpdateExpression="REMOVE " + ", ".join(UPSTREAM_AUTH_FIELDS))
        assert upstream_auth_of(await s.get_server("srv_old")) == NO_UPSTREAM_AUTH

    run(scenario, storage)


# URL -> the flag a server stored before the flag existed gets (legacy_internal_upstream).
LEGACY_URLS = {
    "http://127.0.0.1:9000/mcp": True,
    "http://localhost:9000/mcp": True,
    "http://mcp:8000/mcp": True,  # a compose service
    "https://tools.internal/mcp": True,
    "http://10.1.2.3/mcp": True,
    "http://[::1]:9000/mcp": True,
    "http://[::ffff:10.0.0.1]/mcp": True,
    "http://169.254.169.254/latest": True,  # non-public: the proxy's own guard still decides
    "https://mcp.example.com/mcp": False,  # a public name: could be re-pointed inward
    "https://8.8.8.8/mcp": False,
    "https://[2606:4700::1111]/mcp": False,
}


def test_sqlite_migration_4_approves_old_servers_whose_url_points_inward(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    with sqlite3.connect(path) as conn:
        for migration in MIGRATIONS[:3]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 3")
        for number, url in enumerate(LEGACY_URLS):
            conn.execute("INSERT INTO servers VALUES (?, 'old', ?, '', 'o@x.org', '', 0, ?)",
                         (f"srv_{number}", url, T0 + number))

    async def scenario(s: Storage) -> None:
        found = {x.upstream_url: x.internal_upstream for x in await s.list_servers()}
        assert found == LEGACY_URLS
        await s.create_server(server("srv_new"))  # new rows: the default, False
        assert (await s.get_server("srv_new")).internal_upstream is False

    run(scenario, SqliteStorage(str(path)))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_dynamodb_server_items_from_before_the_flag_get_the_migration_default(dynamodb_table: Any) -> None:
    import boto3

    endpoint, table = dynamodb_table
    storage = DynamoDBStorage(table, "us-east-1", endpoint)

    async def scenario(s: Storage) -> None:
        for number, url in enumerate(LEGACY_URLS):
            await s.create_server(replace(server(f"srv_{number}"), upstream_url=url, created_at=T0 + number,
                                          internal_upstream=not LEGACY_URLS[url]))
        db = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=endpoint)
        for number in range(len(LEGACY_URLS)):
            # As an item written before the attribute existed.
            db.update_item(TableName=table, Key={"PK": {"S": f"SERVER#srv_{number}"}, "SK": {"S": "SERVER"}},
                           UpdateExpression="REMOVE internal_upstream")
        assert {x.upstream_url: x.internal_upstream for x in await s.list_servers()} == LEGACY_URLS
        assert (await s.get_server("srv_0")).internal_upstream is True
        # Once written again the stored value counts, whatever the URL.
        await s.update_server(replace(await s.get_server("srv_0"), internal_upstream=False))
        assert (await s.get_server("srv_0")).internal_upstream is False

    run(scenario, storage)


def test_grants_and_delete_server_cascade(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.create_server(server("srv_a"))
        await s.create_server(server("srv_b"))
        assert await s.add_grant(Grant("srv_a", "email", "bob@x.org", T0)) is True
        assert await s.add_grant(Grant("srv_a", "email", "bob@x.org", T0 + 5)) is False
        assert await s.add_grant(Grant("srv_a", "domain", "x.org", T0)) is True
        assert await s.add_grant(Grant("srv_b", "email", "bob@x.org", T0)) is True

        assert await s.grants_for("srv_a") == [
            Grant("srv_a", "domain", "x.org", T0),
            Grant("srv_a", "email", "bob@x.org", T0),
        ]
        assert [g.server_id for g in await s.grants_matching("email", "bob@x.org")] == [
            "srv_a",
            "srv_b",
        ]
        assert await s.grants_matching("domain", "x.org") == [Grant("srv_a", "domain", "x.org", T0)]
        assert await s.grants_matching("domain", "bob@x.org") == []

        assert await s.remove_grant("srv_b", "email", "bob@x.org") is True
        assert await s.remove_grant("srv_b", "email", "bob@x.org") is False

        await s.put_session(session("s-a", "srv_a"))
        await s.put_session(session("s-b", "srv_b"))
        assert await s.delete_server("srv_a") is True
        assert await s.delete_server("srv_a") is False
        assert await s.get_server("srv_a") is None
        assert await s.grants_for("srv_a") == []
        assert await s.grants_matching("email", "bob@x.org") == []
        assert await s.get_session("s-a", T0) is None
        assert await s.get_session("s-b", T0) == session("s-b", "srv_b")

    run(scenario, storage)


# ------------------------------------------------------------------------- pending


def test_pending_get_does_not_consume_take_does_and_expiry_hides(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        payload = {"client_id": "c1", "scopes": ["a", "b"], "n": 1}
        await s.put_pending(Pending("authorize", "k1", payload, T0 + 60))
        await s.put_pending(Pending("login", "k1", {"other": True}, T0 + 60))

        assert await s.get_pending("authorize", "k1", T0) == Pending(
            "authorize", "k1", payload, T0 + 60
        )
        assert await s.get_pending("authorize", "k1", T0 + 60) is None  # expiry is exclusive
        assert await s.take_pending("authorize", "k1", T0 + 61) is None  # expired: not taken
        assert await s.take_pending("authorize", "missing", T0) is None

        taken = await s.take_pending("authorize", "k1", T0)
        assert taken == Pending("authorize", "k1", payload, T0 + 60)
        assert await s.take_pending("authorize", "k1", T0) is None
        assert await s.get_pending("authorize", "k1", T0) is None
        assert (await s.get_pending("login", "k1", T0)).payload == {"other": True}

    run(scenario, storage)


def test_take_pending_has_exactly_one_winner_across_instances(
    storage_factory: StorageFactory,
) -> None:
    stores = [storage_factory() for _ in range(4)]

    async def scenario(*ss: Storage) -> None:
        for i in range(25):
            await ss[0].put_pending(Pending("authorize", f"k{i}", {"i": i}, T0 + 60))
        for i in range(25):
            results = await asyncio.gather(*(x.take_pending("authorize", f"k{i}", T0) for x in ss))
            assert [r for r in results if r is not None] == [
                Pending("authorize", f"k{i}", {"i": i}, T0 + 60)
            ]

    run(scenario, *stores)


# --------------------------------------------------------------------------- codes


def test_redeem_code_first_use_replay_and_unknown(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.put_code(code("h1"))
        with pytest.raises(Conflict):
            await s.put_code(code("h1"))  # never overwrite: it could resurrect a used code

        assert await s.redeem_code("unknown") == (None, False)
        first, first_use = await s.redeem_code("h1")
        assert first_use is True
        assert first == AuthCode(**{**code("h1").__dict__, "used": True})
        replay, replay_first = await s.redeem_code("h1")
        assert (replay, replay_first) == (first, False)
        # Expiry is the caller's check: an expired code is still returned.
        await s.put_code(code("old", expires_at=T0 - 1))
        assert (await s.redeem_code("old"))[1] is True

    run(scenario, storage)


def test_redeem_code_has_exactly_one_winner_across_instances(
    storage_factory: StorageFactory,
) -> None:
    stores = [storage_factory() for _ in range(4)]

    async def scenario(*ss: Storage) -> None:
        for i in range(25):
            await ss[0].put_code(code(f"h{i}"))
        for i in range(25):
            results = await asyncio.gather(*(x.redeem_code(f"h{i}") for x in ss))
            assert sorted(first for _, first in results) == [False, False, False, True]
            assert all(c is not None and c.used for c, _ in results)

    run(scenario, *stores)


# -------------------------------------------------------------------------- refresh


def test_refresh_family_create_rotate_and_replay(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.create_family(family(), refresh("rt0"))
        with pytest.raises(Conflict):
            await s.create_family(family(), refresh("rt-other"))
        assert await s.get_refresh_token("rt-other") is None  # all or nothing
        with pytest.raises(Conflict):
            await s.create_family(family("fam2"), refresh("rt0"))
        assert await s.get_family("fam2") is None

        assert await s.get_family("fam1") == family()
        assert await s.get_refresh_token("rt0") == refresh("rt0")
        assert await s.get_refresh_token("nope") is None

        rt1 = refresh("rt1", created_at=T0 + 100)
        assert await s.rotate_refresh_token("rt0", rt1, "ct:rt1-pair", T0 + 100) is True
        old = await s.get_refresh_token("rt0")
        assert (old.used_at, old.replaced_by, old.successor_enc) == (
            T0 + 100,
            "rt1",
            "ct:rt1-pair",
        )
        assert await s.get_refresh_token("rt1") == rt1
        assert (await s.get_family("fam1")).last_used_at == T0 + 100

        # A replay of rt0 loses and changes nothing.
        rt1b = refresh("rt1b", created_at=T0 + 101)
        assert await s.rotate_refresh_token("rt0", rt1b, "ct:other", T0 + 101) is False
        assert await s.get_refresh_token("rt1b") is None
        assert (await s.get_refresh_token("rt0")).replaced_by == "rt1"
        assert (await s.get_family("fam1")).last_used_at == T0 + 100
        assert await s.rotate_refresh_token("unknown", rt1b, "ct", T0 + 101) is False

    run(scenario, storage)


def test_rotate_refresh_token_is_all_or_nothing(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.create_family(family(), refresh("rt0"))
        await s.create_family(family("fam2"), refresh("taken", "fam2"))
        # The successor cannot be inserted (its hash exists): rt0 must stay unused.
        with pytest.raises(Conflict):
            await s.rotate_refresh_token("rt0", refresh("taken"), "ct", T0 + 5)
        assert await s.get_refresh_token("rt0") == refresh("rt0")
        assert (await s.get_family("fam1")).last_used_at == 0
        assert await s.get_refresh_token("taken") == refresh("taken", "fam2")
        assert await s.rotate_refresh_token("rt0", refresh("rt1"), "ct", T0 + 6) is True

    run(scenario, storage)


def test_rotate_refresh_token_has_exactly_one_winner_across_instances(
    storage_factory: StorageFactory,
) -> None:
    stores = [storage_factory() for _ in range(4)]

    async def scenario(*ss: Storage) -> None:
        for i in range(20):
            await ss[0].create_family(family(f"f{i}"), refresh(f"rt{i}", f"f{i}"))
        for i in range(20):
            results = await asyncio.gather(
                *(
                    x.rotate_refresh_token(
                        f"rt{i}", refresh(f"rt{i}-next-{n}", f"f{i}"), f"ct{n}", T0 + 1
                    )
                    for n, x in enumerate(ss)
                )
            )
            assert sorted(results) == [False, False, False, True]
            winner = results.index(True)
            old = await ss[0].get_refresh_token(f"rt{i}")
            assert old.replaced_by == f"rt{i}-next-{winner}"
            assert old.successor_enc == f"ct{winner}"
            for n in range(len(ss)):
                successor = await ss[0].get_refresh_token(f"rt{i}-next-{n}")
                assert (successor is not None) == (n == winner)

    run(scenario, *stores)


def test_revoke_family_and_families_of_user(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.create_family(family("fa", created_at=T0), refresh("ta", "fa"))
        await s.create_family(family("fb", created_at=T0 + 1), refresh("tb", "fb"))
        await s.create_family(family("fc", user_sub="u2"), refresh("tc", "fc"))

        assert await s.revoke_family("fa", T0 + 10) is True
        assert await s.revoke_family("fa", T0 + 20) is True
        assert (await s.get_family("fa")).revoked_at == T0 + 10  # the first revocation
        assert await s.revoke_family("unknown", T0) is False

        mine = await s.families_of_user("u1")
        assert [f.family_id for f in mine] == ["fb", "fa"]  # newest first, revoked included
        assert [f.revoked_at for f in mine] == [0, T0 + 10]
        assert await s.families_of_user("nobody") == []
        # get_refresh_token returns the row as is; validity is the caller's check.
        assert await s.get_refresh_token("ta") == refresh("ta", "fa")

    run(scenario, storage)


# ------------------------------------------------------------------------- consent


def test_consents(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        aud_a, aud_b = "https://gw/mcp/srv_a", "https://gw/mcp/"
        assert await s.get_consent("u1", "c1", aud_a) is None
        await s.put_consent(Consent("u1", "c1", aud_a, "mcp:connect", T0))
        await s.put_consent(Consent("u1", "c1", aud_a, "mcp:connect mcp:invoke", T0 + 1))
        await s.put_consent(Consent("u1", "c1", aud_b, "mcp:connect", T0))
        await s.put_consent(Consent("u1", "c2", aud_a, "mcp:connect", T0))
        assert await s.get_consent("u1", "c1", aud_a) == Consent(
            "u1", "c1", aud_a, "mcp:connect mcp:invoke", T0 + 1
        )
        assert await s.delete_consents("u1", "c1") == 2
        assert await s.delete_consents("u1", "c1") == 0
        assert await s.get_consent("u1", "c1", aud_b) is None
        assert await s.get_consent("u1", "c2", aud_a) is not None

    run(scenario, storage)


# -------------------------------------------------------------------- signing keys


def test_signing_keys(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        assert await s.list_signing_keys() == []
        assert await s.add_signing_key(signing_key("k1"), only_if_none_active=True) is True
        assert await s.add_signing_key(signing_key("k2", created_at=T0 + 1), True) is False
        assert await s.add_signing_key(signing_key("k2", created_at=T0 + 1)) is True
        with pytest.raises(Conflict):
            await s.add_signing_key(signing_key("k1"))

        keys = await s.list_signing_keys()
        assert [k.kid for k in keys] == ["k1", "k2"]
        assert keys[0].public_jwk == signing_key("k1").public_jwk  # compare=False field

        await s.set_signing_key_status("k1", "retiring", retire_at=T0 + 3600)
        await s.set_signing_key_status("k2", "retiring", retire_at=T0 + 7200)
        with pytest.raises(KeyError):
            await s.set_signing_key_status("missing", "retired")
        with pytest.raises(ValueError, match="status"):
            await s.set_signing_key_status("k1", "bogus")
        keys = {k.kid: k for k in await s.list_signing_keys()}
        assert (keys["k1"].status, keys["k1"].retire_at) == ("retiring", T0 + 3600)
        # No active key left: the first-start insert may succeed again.
        assert await s.add_signing_key(signing_key("k3"), only_if_none_active=True) is True

    run(scenario, storage)


def test_add_signing_key_only_if_none_active_has_one_winner_across_instances(
    storage_factory: StorageFactory,
) -> None:
    stores = [storage_factory() for _ in range(4)]

    async def scenario(*ss: Storage) -> None:
        results = await asyncio.gather(
            *(
                x.add_signing_key(signing_key(f"k{n}"), only_if_none_active=True)
                for n, x in enumerate(ss)
            )
        )
        assert sorted(results) == [False, False, False, True]
        keys = await ss[0].list_signing_keys()
        assert [k.kid for k in keys] == [f"k{results.index(True)}"]

    run(scenario, *stores)


# ------------------------------------------------------------ revoked access tokens


def test_revoked_access_tokens_are_filtered_by_expiry(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.revoke_access_token(RevokedAccessToken("j1", T0 + 10))
        await s.revoke_access_token(RevokedAccessToken("j2", T0 + 20))
        await s.revoke_access_token(RevokedAccessToken("j1", T0 + 5))  # repeats are harmless
        assert await s.revoked_access_tokens(T0) == [
            RevokedAccessToken("j1", T0 + 10),
            RevokedAccessToken("j2", T0 + 20),
        ]
        assert await s.revoked_access_tokens(T0 + 10) == [RevokedAccessToken("j2", T0 + 20)]
        assert await s.revoked_access_tokens(T0 + 20) == []

    run(scenario, storage)


# -------------------------------------------------------------------- MCP sessions


def test_sessions_put_get_touch_delete_and_expiry(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.put_session(session("s1", expires_at=T0 + 60))
        assert await s.get_session("s1", T0) == session("s1", expires_at=T0 + 60)
        assert await s.get_session("s1", T0 + 60) is None
        await s.touch_session("s1", T0 + 600)
        assert (await s.get_session("s1", T0 + 60)).expires_at == T0 + 600
        await s.touch_session("missing", T0 + 600)
        assert await s.get_session("missing", T0) is None
        assert await s.delete_session("s1") is True
        assert await s.delete_session("s1") is False
        assert await s.get_session("s1", T0) is None

    run(scenario, storage)


# ------------------------------------------- usage: the UsageStore contract (storage.usage)


def test_usage_analytics_stand_behind_their_own_interface(storage: Storage) -> None:
    """Every backend offers its usage analytics as `storage.usage`, a UsageStore; the
    Storage interface itself holds none of them."""
    assert isinstance(storage.usage, UsageStore)
    usage_methods = set(UsageStore.__abstractmethods__)
    assert "record_usage" in usage_methods and "purge_usage_events" in usage_methods
    assert not usage_methods & set(Storage.__abstractmethods__)


def test_usage_aggregates_sum_across_batches_and_split_by_utc_day(storage: Storage) -> None:
    midnight = 1_800_057_600.0  # 2027-01-16T00:00:00Z
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(midnight)) == "2027-01-16 00:00:00"

    async def scenario(s: Storage) -> None:
        await s.usage.record_usage([])
        await s.usage.record_usage(
            [
                event(midnight - 1, latency_ms=10),
                event(midnight - 2, latency_ms=30, outcome="-32602"),
                event(midnight - 3, target="fetch"),
                event(midnight - 4, user_sub="u2"),
                event(midnight - 5, server_id="srv_other"),
            ]
        )
        await s.usage.record_usage(
            [
                event(midnight - 6, latency_ms=50, outcome="500"),
                event(midnight, latency_ms=7),  # the next UTC day
            ]
        )
        aggregates = await s.usage.usage_aggregates("srv_a", "2027-01-15")
        summary = [
            (a.day, a.target, a.user_sub, a.calls, a.errors, a.latency_ms_sum, a.latency_ms_max)
            for a in aggregates
        ]
        assert summary == [
            ("2027-01-15", "fetch", "u1", 1, 0, 10.0, 10.0),
            ("2027-01-15", "search", "u1", 3, 2, 90.0, 50.0),
            ("2027-01-15", "search", "u2", 1, 0, 10.0, 10.0),
            ("2027-01-16", "search", "u1", 1, 0, 7.0, 7.0),
        ]
        assert all(a.server_id == "srv_a" for a in aggregates)
        assert [a.day for a in await s.usage.usage_aggregates("srv_a", "2027-01-16")] == ["2027-01-16"]
        assert len(await s.usage.usage_aggregates("srv_other", "2000-01-01")) == 1

    run(scenario, storage)


def test_usage_counts_calls_the_tool_policy_refused_apart_from_errors(storage: Storage) -> None:
    """An outcome "denied:<reason>" is a denied call, not an error, in daily and hourly rows."""
    async def scenario(s: Storage) -> None:
        await s.usage.record_usage([event(T0, outcome="denied:read_only"), event(T0 + 1, outcome="-32602")])
        await s.usage.record_usage([event(T0 + 2, outcome="denied:deny"), event(T0 + 3)])
        day = time.strftime("%Y-%m-%d", time.gmtime(T0))
        [aggregate] = await s.usage.usage_aggregates("srv_a", day)
        assert (aggregate.calls, aggregate.errors, aggregate.denied) == (4, 1, 2)
        hour = time.strftime("%Y-%m-%dT%H", time.gmtime(T0 - 3600))
        for rollup in (await s.usage.usage_rollup("srv_a", day), await s.usage.usage_rollup_hours("srv_a", hour)):
            assert [(r.calls, r.errors, r.denied) for r in rollup] == [(4, 1, 2)]

    run(scenario, storage)


def test_sqlite_migration_8_old_usage_rows_read_no_denied_calls(tmp_path: Path) -> None:
    path = tmp_path / "v7.db"
    with sqlite3.connect(path) as conn:
        conn.create_function("legacy_internal_upstream", 1, legacy_internal_upstream)  # migration 4's
        for migration in MIGRATIONS[:7]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 7")
        for table, period in (("usage_daily", "2027-01-15"), ("usage_hourly", "2027-01-15T10")):
            conn.execute(f"INSERT INTO {table} VALUES ('srv_a', ?, 'search', 'u1', 3, 1, 30.0, 10.0, "
                         f"{', '.join('0' for _ in range(LATENCY_BUCKETS))})", (period,))

    async def scenario(s: Storage) -> None:
        [old] = await s.usage.usage_rollup("srv_a", "2027-01-15")
        assert (old.calls, old.errors, old.denied) == (3, 1, 0)
        [hourly] = await s.usage.usage_rollup_hours("srv_a", "2027-01-15T00")
        assert (hourly.calls, hourly.errors, hourly.denied) == (3, 1, 0)

    run(scenario, SqliteStorage(str(path)))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_recent_usage_pages_newest_first(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        events = [event(T0 + i, target=f"t{i}") for i in range(7)]
        await s.usage.record_usage(events[:4])
        await s.usage.record_usage([*events[4:], event(T0 + 3.5, server_id="srv_other")])

        page1 = await s.usage.recent_usage("srv_a", float("inf"), 3)
        assert page1 == [events[6], events[5], events[4]]
        page2 = await s.usage.recent_usage("srv_a", page1[-1].at, 3)
        assert page2 == [events[3], events[2], events[1]]
        page3 = await s.usage.recent_usage("srv_a", page2[-1].at, 3)
        assert page3 == [events[0]]
        assert await s.usage.recent_usage("srv_a", page3[-1].at, 3) == []
        assert await s.usage.recent_usage("srv_none", float("inf"), 3) == []

    run(scenario, storage)


def test_purge_usage_events_drops_old_history_oldest_first_and_keeps_aggregates(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        old = [event(T0 - 100 + i, target=f"old{i}") for i in range(5)]
        other = event(T0 - 50, server_id="srv_other", target="old-other")
        new = [event(T0 + i, target=f"new{i}") for i in range(3)]
        await s.usage.record_usage([*old, other])
        await s.usage.record_usage(new)

        assert await s.usage.purge_usage_events(T0, 4) == 4  # bounded batches
        assert await s.usage.purge_usage_events(T0, 100) == 2  # the rest of the old, across servers
        assert await s.usage.purge_usage_events(T0, 100) == 0
        assert await s.usage.recent_usage("srv_a", float("inf"), 10) == list(reversed(new))
        assert await s.usage.recent_usage("srv_other", float("inf"), 10) == []
        # The aggregates still count every call.
        whole = {r.target: r.calls for r in await s.usage.usage_rollup("srv_a", "2000-01-01")}
        assert whole["old0"] == 1 and whole["new2"] == 1
        assert [u.user_sub for u in await s.usage.server_users("srv_other")] == ["u1"]

    run(scenario, storage)


def test_usage_aggregates_carry_a_latency_histogram_that_adds_up(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.usage.record_usage([event(T0, latency_ms=0.05), event(T0 + 1, latency_ms=10)])
        await s.usage.record_usage([event(T0 + 2, latency_ms=10), event(T0 + 3, latency_ms=5000)])
        (aggregate,) = await s.usage.usage_aggregates("srv_a", "2000-01-01")
        assert len(aggregate.latency_hist) == LATENCY_BUCKETS
        assert sum(aggregate.latency_hist) == aggregate.calls == 4
        assert aggregate.latency_hist[latency_bucket(0.05)] == 1
        assert aggregate.latency_hist[latency_bucket(10)] == 2
        assert aggregate.latency_hist[latency_bucket(5000)] == 1

    run(scenario, storage)


def test_latency_buckets_are_fixed_and_log_spaced() -> None:
    assert latency_bucket(0) == 0 and latency_bucket(0.1) == 0
    assert latency_bucket(1.0) == 5 and latency_bucket(1.01) == 6
    assert latency_bucket(100_000) == 30 and latency_bucket(10**9) == LATENCY_BUCKETS - 1
    for i in range(1, LATENCY_BUCKETS - 1):
        lower, upper = latency_bucket_bounds(i)
        assert latency_bucket(upper) == i and latency_bucket(lower * 1.0001) == i
        assert abs(upper / lower - 10 ** 0.2) < 1e-9


def test_usage_rollup_per_day_and_per_hour(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.usage.record_usage([
            event(T0 - 2 * DAY, latency_ms=1),
            event(T0, latency_ms=10),
            event(T0 + 1, latency_ms=20, outcome="-32603"),
            event(T0 + 2, target="fetch", user_sub="u2", latency_ms=300),
            event(T0 + 3, server_id="srv_other"),
        ])
        rollup = {(r.target, r.user_sub): r for r in await s.usage.usage_rollup("srv_a", "2027-01-15")}
        assert set(rollup) == {("search", "u1"), ("fetch", "u2")}
        search = rollup[("search", "u1")]
        assert (search.calls, search.errors, search.latency_ms_sum, search.latency_ms_max) == (2, 1, 30.0, 20.0)
        assert sum(search.latency_hist) == 2
        whole = {(r.target, r.user_sub): r.calls for r in await s.usage.usage_rollup("srv_a", "2000-01-01")}
        assert whole[("search", "u1")] == 3
        days = await s.usage.usage_per_day("srv_a", "2000-01-01")
        assert [(d.period, d.calls, d.errors) for d in days] == [("2027-01-13", 1, 0), ("2027-01-15", 3, 1)]
        since = {(r.target, r.user_sub): r for r in await s.usage.usage_rollup_hours("srv_a", "2027-01-15T08")}
        assert {k: (r.calls, r.errors) for k, r in since.items()} == {("search", "u1"): (2, 1), ("fetch", "u2"): (1, 0)}
        assert since[("fetch", "u2")].latency_hist[latency_bucket(300)] == 1
        assert await s.usage.usage_rollup_hours("srv_a", "2027-01-15T09") == []
        hours = await s.usage.usage_per_hour("srv_a", "2027-01-13T00")
        assert [(h.period, h.calls, h.errors) for h in hours] == [("2027-01-13T08", 1, 0), ("2027-01-15T08", 3, 1)]
        assert [h.period for h in await s.usage.usage_per_hour("srv_a", "2027-01-14T00")] == ["2027-01-15T08"]
        # Hourly rows serve the last day only: purging drops them after a few days, never
        # the daily ones.
        await s.purge_expired(T0 + 10 * DAY)
        assert await s.usage.usage_per_hour("srv_a", "2000-01-01T00") == []
        assert len(await s.usage.usage_per_day("srv_a", "2000-01-01")) == 2

    run(scenario, storage)


def test_server_users_remember_first_and_last_use(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.usage.record_usage([event(T0 + 5), event(T0 + 1), event(T0 + 2, user_sub="u2")])
        await s.usage.record_usage([event(T0 + 9, user_sub="u2"), event(T0, server_id="srv_other")])
        users = await s.usage.server_users("srv_a")
        assert [(u.user_sub, u.user_email, u.first_used_at, u.last_used_at) for u in users] == [
            ("u2", "u2@x.org", T0 + 2, T0 + 9),
            ("u1", "u1@x.org", T0 + 1, T0 + 5),
        ]
        assert await s.usage.server_users("srv_none") == []

    run(scenario, storage)


def test_users_matching_email_and_domain(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.upsert_user(User("s1", "ana@corp.example", True, "corp.example", last_login_at=T0))
        await s.upsert_user(User("s2", "bo@corp.example", False, "corp.example", last_login_at=T0 + 1))
        await s.upsert_user(User("s3", "cy@else.example", True, "", last_login_at=T0))
        assert [u.sub for u in await s.users_matching("email", "ana@corp.example")] == ["s1"]
        assert await s.users_matching("email", "bo@corp.example") == []  # unverified
        assert [u.sub for u in await s.users_matching("domain", "corp.example")] == ["s2", "s1"]
        assert await s.users_matching("domain", "else.example") == []

    run(scenario, storage)


def test_count_sessions_counts_live_sessions_of_one_server(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.put_session(session("a", expires_at=T0 + 60))
        await s.put_session(session("b", expires_at=T0 + 60))
        await s.put_session(session("old", expires_at=T0 - 1))
        assert await s.count_sessions(session("x").server_id, T0) == 2
        assert await s.count_sessions("srv_none", T0) == 0

    run(scenario, storage)


def test_sqlite_migration_2_keeps_old_aggregates_and_backfills_server_users(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO usage_events (at, server_id, user_sub, user_email, client_id, method, target, "
            "outcome, latency_ms, bytes_in, bytes_out, era) VALUES (?, 'srv_a', 'u1', 'u1@x.org', 'c1', "
            "'tools/call', 'search', 'ok', 10, 1, 1, '2025')",
            (T0,),
        )
        conn.execute("INSERT INTO usage_daily VALUES ('2027-01-15', 'srv_a', 'search', 'u1', 1, 0, 10, 10)")

    async def scenario(s: Storage) -> None:
        (old,) = await s.usage.usage_aggregates("srv_a", "2000-01-01")
        assert old.calls == 1 and sum(old.latency_hist) == 0  # history from before histograms
        assert [(u.user_sub, u.last_used_at) for u in await s.usage.server_users("srv_a")] == [("u1", T0)]
        await s.usage.record_usage([event(T0 + 1)])
        (new,) = await s.usage.usage_aggregates("srv_a", "2000-01-01")
        assert new.calls == 2 and sum(new.latency_hist) == 1

    run(scenario, SqliteStorage(str(path)))


def test_sqlite_migration_3_backfills_hourly_aggregates_of_recent_events(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    recent, old = time.time() - 3600, time.time() - 10 * DAY
    with sqlite3.connect(path) as conn:
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        for at, latency in ((recent, 12.0), (recent + 1, 300.0), (old, 5.0)):
            conn.execute(
                "INSERT INTO usage_events (at, server_id, user_sub, user_email, client_id, method, target, "
                "outcome, latency_ms, bytes_in, bytes_out, era) VALUES (?, 'srv_a', 'u1', 'u1@x.org', 'c1', "
                "'tools/call', 'search', ?, ?, 1, 1, '2025')",
                (at, "ok" if latency < 100 else "-32603", latency),
            )

    async def scenario(s: Storage) -> None:
        (rollup,) = await s.usage.usage_rollup_hours("srv_a", "2000-01-01T00")
        assert (rollup.calls, rollup.errors, rollup.latency_ms_max) == (2, 1, 300.0)  # the old event is not
        assert rollup.latency_hist[latency_bucket(12.0)] == 1 and rollup.latency_hist[latency_bucket(300.0)] == 1

    run(scenario, SqliteStorage(str(path)))


# -------------------------------------------------------------------- housekeeping


def test_purge_expired(storage: Storage) -> None:
    now = T0 + 1000

    async def scenario(s: Storage) -> None:
        await s.put_pending(Pending("authorize", "old", {}, now))
        await s.put_pending(Pending("authorize", "live", {}, now + 1))
        await s.put_code(code("old", expires_at=now - 1))
        await s.put_code(code("live", expires_at=now + 60))
        await s.put_session(session("old", expires_at=now))
        await s.put_session(session("live", expires_at=now + 60))
        await s.revoke_access_token(RevokedAccessToken("old", now - 5))
        await s.revoke_access_token(RevokedAccessToken("live", now + 5))
        await s.create_family(family("f-live", expires_at=now + DAY), refresh("rt-live", "f-live"))
        await s.rotate_refresh_token(
            "rt-live", refresh("rt-live-2", "f-live"), "ct", now - 10
        )  # a used token of a live family stays: replay detection needs it
        await s.create_family(family("f-rev", expires_at=now + DAY), refresh("rt-rev", "f-rev"))
        await s.revoke_family("f-rev", now - 1)
        await s.create_family(
            family("f-exp", expires_at=now - 1),
            refresh("rt-exp", "f-exp", family_expires_at=now - 1),
        )
        await s.usage.record_usage([event(T0 - 400 * DAY)])

        # pending, code, session, revocation: one each; tokens: rt-rev and rt-exp; the
        # 400-day-old event's hourly aggregate (its event and daily row stay)
        assert await s.purge_expired(now) == 7
        assert await s.purge_expired(now) == 0

        assert await s.get_pending("authorize", "live", now) is not None
        assert await s.redeem_code("old") == (None, False)
        assert (await s.redeem_code("live"))[0] is not None
        assert await s.get_session("live", now) is not None
        assert [r.jti for r in await s.revoked_access_tokens(0)] == ["live"]
        assert await s.get_refresh_token("rt-live") is not None
        assert await s.get_refresh_token("rt-live-2") is not None
        assert await s.get_refresh_token("rt-rev") is None
        assert await s.get_refresh_token("rt-exp") is None
        # Families stay listed ("my authorizations"); usage history is never purged.
        assert {f.family_id for f in await s.families_of_user("u1")} == {
            "f-live",
            "f-rev",
            "f-exp",
        }
        assert len(await s.usage.recent_usage("srv_a", float("inf"), 10)) == 1

    run(scenario, storage)


# ------------------------------------------------------------------ SQLite specifics


def test_sqlite_file_is_private_in_created_directories_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "gateway.db"
    store = SqliteStorage(str(path))

    async def scenario(s: Storage) -> None:
        await s.put_pending(Pending("k", "k", {}, T0))

    run(scenario, store)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    for sidecar in path.parent.glob("gateway.db-*"):
        assert stat.S_IMODE(sidecar.stat().st_mode) & 0o077 == 0, sidecar


def test_sqlite_refuses_a_schema_newer_than_it_knows(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    run(lambda s: asyncio.sleep(0), SqliteStorage(str(path)))
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

    async def scenario() -> None:
        store = SqliteStorage(str(path))
        with pytest.raises(StorageError, match="newer"):
            await store.open()
        with pytest.raises(StorageError):
            await store.ping()  # a failed open leaves nothing half-open

    asyncio.run(scenario())


def test_sqlite_in_memory(tmp_path: Path) -> None:
    async def scenario(s: Storage) -> None:
        await s.put_code(code("h"))
        assert (await s.redeem_code("h"))[1] is True

    run(scenario, SqliteStorage(":memory:"))
    assert list(tmp_path.iterdir()) == []


# Each process opens the (possibly fresh) file, then races for the first signing key.
RACER = """
import asyncio, sys
from storage import SigningKey, SqliteStorage

async def main(path, kid):
    store = SqliteStorage(path)
    await store.open()
    key = SigningKey(kid, "ct", {"kid": kid})
    won = await store.add_signing_key(key, only_if_none_active=True)
    await store.close()
    print("won" if won else "lost")

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_sqlite_processes_racing_on_a_fresh_file(tmp_path: Path) -> None:
    path = str(tmp_path / "fresh" / "gateway.db")
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, path, f"k{n}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(6)
    ]
    outputs = [racer.communicate(timeout=60) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outputs
    assert sorted(out.strip() for out, _ in outputs) == ["lost"] * 5 + ["won"]

    async def scenario(s: Storage) -> None:
        assert len(await s.list_signing_keys()) == 1

    run(scenario, SqliteStorage(path))


# -------------------------------------------------------------------- open_storage


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/gateway.db", "var/gateway.db"),
        ("sqlite:////srv/gw/state.db", "/srv/gw/state.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("  sqlite:///var/gateway.db\n", "var/gateway.db"),
    ],
)
def test_open_storage_sqlite_urls(url: str, path: str) -> None:
    store = open_storage(url)
    assert isinstance(store, SqliteStorage)
    assert store.path == path


@pytest.mark.parametrize(
    "url",
    [
        "",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/gateway.db",
        "sqlite:gateway.db",
        "sqlite:///var/",
        "sqlite:///gateway.db?mode=ro",
        "postgres://localhost/db",
        "/var/gateway.db",
    ],
)
def test_open_storage_rejects_bad_urls_naming_the_variable(url: str) -> None:
    with pytest.raises(ValueError, match="^MCPGW_STORAGE") as caught:
        open_storage(url)
    assert "\n" not in str(caught.value)


def test_open_storage_dynamodb_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    store = open_storage("dynamodb://gateway?region=eu-west-1&endpoint=http://127.0.0.1:8000")
    assert isinstance(store, DynamoDBStorage)
    assert (store.table, store.region, store.endpoint) == ("gateway", "eu-west-1", "http://127.0.0.1:8000")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    store = open_storage("dynamodb://my-table.v2")
    assert (store.table, store.region, store.endpoint) == ("my-table.v2", "us-west-2", "")
    assert open_storage("dynamodb://gateway?region=eu-north-1").region == "eu-north-1"


@pytest.mark.parametrize(
    "url",
    [
        "dynamodb://",
        "dynamodb://gw?region=eu-west-1",  # too short a table name
        "dynamodb://bad/table?region=eu-west-1",
        "dynamodb://bad*name?region=eu-west-1",
        "dynamodb:gateway?region=eu-west-1",
        "dynamodb://gateway",  # no region anywhere
        "dynamodb://gateway?region=",
        "dynamodb://gateway?region=eu-west-1&colour=blue",
        "dynamodb://gateway?region=eu-west-1&endpoint=ftp://127.0.0.1:8000",
        "dynamodb://gateway?region=eu-west-1&endpoint=127.0.0.1:8000",
    ],
)
def test_open_storage_rejects_bad_dynamodb_urls(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    with pytest.raises(ValueError, match="^MCPGW_STORAGE") as caught:
        open_storage(url)
    assert "\n" not in str(caught.value)


def test_dynamodb_instances_race_on_one_shot_operations_and_on_creating_the_table(
    dynamodb_table: tuple[str, str],
) -> None:
    endpoint, table = dynamodb_table
    a, b = DynamoDBStorage(table, "us-east-1", endpoint), DynamoDBStorage(table, "us-east-1", endpoint)

    async def scenario() -> None:
        await asyncio.gather(a.open(), b.open())  # both find the table missing
        try:
            for i in range(10):
                await a.put_code(code(f"c{i}"))
                await a.put_pending(Pending("authorize", f"p{i}", {}, T0 + 60))
                await a.create_family(family(f"f{i}"), refresh(f"rt{i}", f"f{i}"))
                redeemed = await asyncio.gather(a.redeem_code(f"c{i}"), b.redeem_code(f"c{i}"))
                assert sorted(first for _, first in redeemed) == [False, True]
                taken = await asyncio.gather(
                    a.take_pending("authorize", f"p{i}", T0), b.take_pending("authorize", f"p{i}", T0)
                )
                assert sum(t is not None for t in taken) == 1
                rotated = await asyncio.gather(
                    a.rotate_refresh_token(f"rt{i}", refresh(f"rt{i}-a", f"f{i}"), "ct", T0 + 1),
                    b.rotate_refresh_token(f"rt{i}", refresh(f"rt{i}-b", f"f{i}"), "ct", T0 + 1),
                )
                assert sorted(rotated) == [False, True]
                winner = "a" if rotated[0] else "b"
                assert (await b.get_refresh_token(f"rt{i}")).replaced_by == f"rt{i}-{winner}"
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_open_storage_does_not_touch_the_filesystem(tmp_path: Path) -> None:
    open_storage(f"sqlite:///{tmp_path}/not/yet/gateway.db")
    assert list(tmp_path.iterdir()) == []
    assert os.path.isabs(open_storage(f"sqlite:///{tmp_path}/x.db").path)


# ----------------------------------------------------------- SQLite storage faults


def test_sqlite_transaction_that_fails_at_commit_leaves_nothing_half_written(tmp_path: Path) -> None:
    """A COMMIT can fail (here a deferred constraint; in life a full disk): the helper
    rolls back, so the connection is clean and no later COMMIT can publish the half."""
    from storage.sqlite.connection import _transaction

    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER "
                 "REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    conn.execute("CREATE TABLE log (line TEXT)")
    with pytest.raises(sqlite3.IntegrityError):
        with _transaction(conn):
            conn.execute("INSERT INTO log VALUES ('half')")
            conn.execute("INSERT INTO child VALUES (1, 42)")  # only checked at COMMIT
    assert not conn.in_transaction
    with _transaction(conn):  # the connection takes the next transaction as usual
        conn.execute("INSERT INTO log VALUES ('whole')")
    other = sqlite3.connect(tmp_path / "t.db")
    assert other.execute("SELECT line FROM log").fetchall() == [("whole",)]
    assert other.execute("SELECT count(*) FROM child").fetchone() == (0,)


def test_sqlite_write_lock_held_elsewhere(tmp_path: Path) -> None:
    """Another process's write lock: reads go on at once, writes (however many are
    queued) fail within one budget with StorageUnavailable, the readiness probe says so
    at once, and everything works again when the lock goes."""
    from storage.base import StorageUnavailable
    from storage.sqlite.connection import PROBE_BUDGET, WRITE_BUDGET

    path = tmp_path / "gateway.db"

    async def scenario() -> None:
        store = SqliteStorage(str(path))
        await store.open()
        await store.create_server(server())
        await store.ping()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            assert await store.get_server("srv_a") == server()
            assert time.monotonic() - started < WRITE_BUDGET / 2  # did not queue behind writes
            writes = [store.create_server(server(f"srv_{i}")) for i in range(5)]
            started = time.monotonic()
            failures = await asyncio.gather(*writes, store.get_server("srv_a"), return_exceptions=True)
            assert all(isinstance(f, StorageUnavailable) and f.retry_after > 0 for f in failures[:5])
            assert failures[5] == server()
            assert time.monotonic() - started < WRITE_BUDGET + 1  # one budget, not five
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="locked"):
                await store.ping()
            assert time.monotonic() - started < PROBE_BUDGET + 0.5
        finally:
            other.execute("ROLLBACK")
        await store.create_server(server("srv_after"))
        assert await store.get_server("srv_after") == server("srv_after")
        await store.ping()  # a write went through: no failure is kept
        await store.close()

    asyncio.run(scenario())


# ------------------------------------------------------------- tool rules and catalog


def tool(name: str, digest: str, at: float = T0, server_id: str = "srv_a", **kw: Any) -> ToolEntry:
    values = {"title": f"The {name}", "description": f"does {name}", "input_schema": {"type": "object"},
              "annotations": {"readOnlyHint": True}, "first_seen": at, "last_changed": at}
    return ToolEntry(server_id=server_id, name=name, hash=digest, **{**values, **kw})


def appeared(entry: ToolEntry, at: float = T0) -> ToolUpdate:
    return ToolUpdate(ToolChange(entry.server_id, at, entry.name, "appeared", "", entry.hash), entry)


def test_tool_rules_live_on_servers_and_grants_and_change_alone(storage: Storage) -> None:
    """The default rule and pinning on the server, a narrowing rule on each grant: stored,
    read back by every lookup, changed by set_*_rule without touching the rest."""

    async def scenario(s: Storage) -> None:
        await s.create_server(server("srv_a", owner_sub="u-o"))
        assert ToolRule.of(await s.get_server("srv_a")) == ToolRule()  # every tool, as before
        rule = ToolRule(allow=("search", "github_*"), deny=("github_delete?",), read_only=True)
        assert await s.tools.set_server_rule("srv_a", rule, pinned=True) is True
        assert await s.tools.set_server_rule("srv_nope", rule, pinned=True) is False
        stored = await s.get_server("srv_a")
        assert ToolRule.of(stored) == rule and stored.tools_pinned is True
        assert stored.name == "server srv_a" and stored.upstream_headers_enc == "ct:headers"
        assert ToolRule.of((await s.servers_owned_by("u-o"))[0]) == rule
        assert (await s.list_servers())[0].tools_pinned is True
        await s.update_server(replace(stored, name="renamed"))  # a whole-record edit keeps the rule
        assert ToolRule.of(await s.get_server("srv_a")) == rule

        narrowed = Grant("srv_a", "domain", "x.org", T0, tools_allow=("search",), tools_read_only=True)
        assert await s.add_grant(narrowed) is True
        assert await s.add_grant(Grant("srv_a", "email", "bob@x.org", T0)) is True
        assert await s.grants_for("srv_a") == [narrowed, Grant("srv_a", "email", "bob@x.org", T0)]
        assert await s.grants_matching("domain", "x.org") == [narrowed]
        bob = ToolRule(deny=("*",))
        assert await s.tools.set_grant_rule("srv_a", "email", "bob@x.org", bob) is True
        assert await s.tools.set_grant_rule("srv_a", "email", "eve@x.org", bob) is False
        assert [ToolRule.of(g) for g in await s.grants_for("srv_a")] == [ToolRule(("search",), (), True), bob]
        assert await s.tools.set_server_rule("srv_a", ToolRule(), pinned=False) is True
        cleared = await s.get_server("srv_a")
        assert ToolRule.of(cleared).empty and cleared.tools_pinned is False and cleared.name == "renamed"

    run(scenario, storage)


def test_tool_catalog_changes_apply_only_on_the_definition_they_were_computed_from(storage: Storage) -> None:
    async def scenario(s: Storage) -> None:
        await s.create_server(server("srv_a"))
        search, fetch = tool("search", "h1"), tool("fetch", "f1", annotations={}, input_schema={"a": [1, "x"]})
        assert await s.tools.apply_tool_changes("srv_a", []) == []
        done = await s.tools.apply_tool_changes("srv_a", [appeared(search), appeared(fetch)])
        assert [c.tool for c in done] == ["search", "fetch"]
        assert await s.tools.tool_catalog("srv_a") == [fetch, search]  # by name
        assert await s.tools.apply_tool_changes("srv_a", [appeared(tool("search", "other"))]) == []

        approve = ToolUpdate(ToolChange("srv_a", T0 + 1, "search", "approved", "", "h1"))
        stale_approve = ToolUpdate(ToolChange("srv_a", T0 + 1, "fetch", "approved", "", "f0"))
        assert await s.tools.apply_tool_changes("srv_a", [approve, stale_approve]) == [approve.change]
        changed = tool("search", "h2", at=T0 + 2, description="now deletes", first_seen=0.0, approved_hash="x")
        change = ToolUpdate(ToolChange("srv_a", T0 + 2, "search", "changed", "h1", "h2"), changed)
        stale = ToolUpdate(ToolChange("srv_a", T0 + 2, "fetch", "changed", "f0", "f2"), tool("fetch", "f2"))
        assert await s.tools.apply_tool_changes("srv_a", [change, stale]) == [change.change]
        now = {e.name: e for e in await s.tools.tool_catalog("srv_a")}
        # The definition changes; when it was first seen and what was approved stay.
        assert (now["search"].hash, now["search"].description) == ("h2", "now deletes")
        assert (now["search"].first_seen, now["search"].last_changed) == (T0, T0 + 2)
        assert now["search"].approved_hash == "h1" and now["fetch"] == fetch

        gone = ToolUpdate(ToolChange("srv_a", T0 + 3, "fetch", "disappeared", "f1", ""))
        stale_gone = ToolUpdate(ToolChange("srv_a", T0 + 3, "search", "disappeared", "h1", ""))
        assert await s.tools.apply_tool_changes("srv_a", [gone, stale_gone]) == [gone.change]
        assert [e.name for e in await s.tools.tool_catalog("srv_a")] == ["search"]
        history = await s.tools.tool_history("srv_a")
        assert [(c.kind, c.tool, c.old_hash, c.new_hash) for c in history] == [
            ("disappeared", "fetch", "f1", ""), ("changed", "search", "h1", "h2"), ("approved", "search", "", "h1"),
            ("appeared", "fetch", "", "f1"), ("appeared", "search", "", "h1")]
        assert [c.tool for c in await s.tools.tool_history("srv_a", limit=2)] == ["fetch", "search"]
        assert await s.tools.tool_catalog("srv_b") == [] and await s.tools.tool_history("srv_b") == []

    run(scenario, storage)


def test_tool_changes_have_one_winner_across_instances(storage_factory: StorageFactory) -> None:
    """Instances seeing the same new definition race to record it: it is applied, and
    written to the history, once."""
    stores = [storage_factory() for _ in range(3)]

    async def scenario(*ss: Storage) -> None:
        await ss[0].create_server(server("srv_a"))
        for i in range(5):
            name = f"t{i}"
            won = await asyncio.gather(*(x.tools.apply_tool_changes("srv_a", [appeared(tool(name, "v1"))]) for x in ss))
            assert sum(len(w) for w in won) == 1
            update = ToolUpdate(ToolChange("srv_a", T0 + 1, name, "changed", "v1", "v2"), tool(name, "v2"))
            won = await asyncio.gather(*(x.tools.apply_tool_changes("srv_a", [update]) for x in ss))
            assert sum(len(w) for w in won) == 1
        history = await ss[1].tools.tool_history("srv_a", limit=100)
        assert sorted((c.tool, c.kind) for c in history) == sorted(
            (f"t{i}", kind) for i in range(5) for kind in ("appeared", "changed"))

    run(scenario, *stores)


def test_tool_history_keeps_the_newest_lines_and_goes_with_the_server(storage: Storage) -> None:
    from storage.tools import HISTORY_KEPT

    async def scenario(s: Storage) -> None:
        await s.create_server(server("srv_a"))
        await s.create_server(server("srv_b"))
        count = HISTORY_KEPT + 30
        entries = [tool(f"tool_{i:04d}", f"h{i}", at=T0 + i) for i in range(count)]
        applied = await s.tools.apply_tool_changes("srv_a", [appeared(e, T0 + i) for i, e in enumerate(entries)])
        assert len(applied) == count and len(await s.tools.tool_catalog("srv_a")) == count
        history = await s.tools.tool_history("srv_a", limit=10 * HISTORY_KEPT)
        assert [c.tool for c in history] == [f"tool_{i:04d}" for i in reversed(range(30, count))]
        await s.tools.apply_tool_changes("srv_b", [appeared(tool("x", "h", server_id="srv_b"))])
        await s.add_grant(Grant("srv_a", "email", "bob@x.org", T0))
        assert await s.delete_server("srv_a") is True
        assert await s.tools.tool_catalog("srv_a") == [] and await s.tools.tool_history("srv_a") == []
        assert len(await s.tools.tool_catalog("srv_b")) == 1 and len(await s.tools.tool_history("srv_b")) == 1

    run(scenario, storage)


def test_sqlite_migration_5_gives_old_servers_and_grants_the_empty_rule(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    with sqlite3.connect(path) as conn:
        conn.create_function("legacy_internal_upstream", 1, lambda url: False)
        for migration in MIGRATIONS[:4]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 4")
        conn.execute("INSERT INTO servers VALUES ('srv_old', 'old', 'http://127.0.0.1:9/mcp', 'u-o', 'o@x.org', "
                     "'', 0, ?, 1)", (T0,))
        conn.execute("INSERT INTO grants VALUES ('srv_old', 'domain', 'x.org', ?)", (T0,))

    async def scenario(s: Storage) -> None:
        old = await s.get_server("srv_old")
        assert (old.name, old.internal_upstream, old.tools_pinned) == ("old", True, False)
        assert ToolRule.of(old).empty
        (grant,) = await s.grants_for("srv_old")
        assert grant == Grant("srv_old", "domain", "x.org", T0) and ToolRule.of(grant).empty
        assert await s.tools.set_grant_rule("srv_old", "domain", "x.org", ToolRule(deny=("rm*",))) is True
        assert await s.tools.apply_tool_changes("srv_old", [appeared(tool("a", "h", server_id="srv_old"))])
        assert [e.name for e in await s.tools.tool_catalog("srv_old")] == ["a"]

    run(scenario, SqliteStorage(str(path)))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 5
    run(lambda s: asyncio.sleep(0), SqliteStorage(str(path)))  # opens again: nothing left to migrate


def test_dynamodb_items_from_before_tool_rules_read_as_the_empty_rule(dynamodb_table: Any) -> None:
    import boto3

    endpoint, table = dynamodb_table

    async def scenario(s: Storage) -> None:
        await s.create_server(server("srv_a"))
        await s.add_grant(Grant("srv_a", "email", "bob@x.org", T0, tools_deny=("x",)))
        await s.tools.set_server_rule("srv_a", ToolRule(allow=("a",)), pinned=True)
        db = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=endpoint)
        remove = "REMOVE tools_allow, tools_deny, tools_read_only"
        db.update_item(TableName=table, Key={"PK": {"S": "SERVER#srv_a"}, "SK": {"S": "SERVER"}},
                       UpdateExpression=remove + ", tools_pinned")
        db.update_item(TableName=table, Key={"PK": {"S": "SERVER#srv_a"}, "SK": {"S": "GRANT#email#bob@x.org"}},
                       UpdateExpression=remove)
        stored = await s.get_server("srv_a")
        assert ToolRule.of(stored).empty and stored.tools_pinned is False
        assert await s.grants_for("srv_a") == [Grant("srv_a", "email", "bob@x.org", T0)]

    run(scenario, DynamoDBStorage(table, "us-east-1", endpoint))


# ------------------------------------------------------- connected accounts (issue 11)


def upcred(sub: str, server_id: str = "srv_a", updated_at: float = T0, **kw: Any) -> Any:
    from storage.upstream_auth import UpstreamCredential

    return UpstreamCredential(user_sub=sub, server_id=server_id, issuer="https://as.example", token_enc=f"ct:{sub}",
                              expires_at=updated_at + 60, scope="mcp", upstream_subject=f"up-{sub}",
                              updated_at=updated_at, **kw)


def test_upstream_credentials_per_user_and_server_replace_on_condition_and_go_with_their_server(
    storage: Storage,
) -> None:
    async def scenario(s: Storage) -> None:
        up = s.upstream_auth
        for server_id in ("srv_a", "srv_b"):
            await s.create_server(server(server_id))
        assert await up.get_credential("u1", "srv_a") is None
        await up.put_credential(upcred("u1"))
        await up.put_credential(upcred("u2"))
        await up.put_credential(upcred("u1", "srv_b"))
        assert await up.get_credential("u1", "srv_a") == upcred("u1")
        assert await up.count_credentials("srv_a") == 2
        assert [c.user_sub for c in await up.credentials_of_server("srv_a")] == ["u1", "u2"]
        assert [c.server_id for c in await up.credentials_of_user("u1")] == ["srv_a", "srv_b"]
        # A conditional replace: only over the version it read.
        newer = upcred("u1", updated_at=T0 + 10)
        assert await up.put_credential(newer, if_updated_at=T0 + 5) is False
        assert await up.put_credential(newer, if_updated_at=T0) is True
        assert await up.get_credential("u1", "srv_a") == newer
        # ... and never over a disconnected account.
        assert await up.delete_credential("u2", "srv_a") is True
        assert await up.delete_credential("u2", "srv_a") is False
        assert await up.put_credential(upcred("u2", updated_at=T0 + 10), if_updated_at=T0) is False
        assert await up.get_credential("u2", "srv_a") is None
        # Registrations: the first one stored wins.
        from storage.upstream_auth import UpstreamRegistration

        first = UpstreamRegistration("srv_a", "https://as.example", "client-1", "ct:s1", "dcr", {"a": 1}, T0)
        assert await up.add_registration(first) is True
        assert await up.add_registration(replace(first, client_id="client-2")) is False
        assert await up.get_registration("srv_a", "https://as.example") == first
        assert (await up.get_registration("srv_a", "https://as.example")).metadata == {"a": 1}
        # Deleting the server takes its credentials, registrations and leases along.
        assert await up.take_refresh_lease("u1", "srv_a", "me", T0 + 30, T0)
        assert await s.delete_server("srv_a") is True
        assert await up.get_credential("u1", "srv_a") is None
        assert await up.get_registration("srv_a", "https://as.example") is None
        assert await up.count_credentials("srv_a") == 0
        assert await up.take_refresh_lease("u1", "srv_a", "other", T0 + 30, T0)
        assert [c.server_id for c in await up.credentials_of_user("u1")] == ["srv_b"]
        assert await up.delete_user_credentials("u1") == 1
        assert await up.credentials_of_user("u1") == []

    run(scenario, storage)


def test_upstream_refresh_lease_has_one_holder_across_instances_until_it_expires(
    storage_factory: StorageFactory,
) -> None:
    async def scenario(a: Storage, b: Storage) -> None:
        got = await asyncio.gather(*(
            store.upstream_auth.take_refresh_lease("u1", "srv_a", name, T0 + 30, T0)
            for store, name in ((a, "a"), (b, "b")) * 3
        ))
        assert sorted(got) == [False] * 3 + [True] * 3  # one instance, three times (its own lease)
        winner, loser = ("a", "b") if got[0] else ("b", "a")
        assert not await b.upstream_auth.take_refresh_lease("u1", "srv_a", loser, T0 + 60, T0 + 29)
        assert await a.upstream_auth.take_refresh_lease("u2", "srv_a", loser, T0 + 30, T0)  # another user
        await a.upstream_auth.release_refresh_lease("u1", "srv_a", loser)  # not theirs: no effect
        assert not await b.upstream_auth.take_refresh_lease("u1", "srv_a", loser, T0 + 60, T0 + 1)
        await a.upstream_auth.release_refresh_lease("u1", "srv_a", winner)
        assert await b.upstream_auth.take_refresh_lease("u1", "srv_a", loser, T0 + 60, T0 + 1)
        # Expired: anyone may take it.
        assert await a.upstream_auth.take_refresh_lease("u1", "srv_a", winner, T0 + 90, T0 + 60)

    run(scenario, storage_factory(), storage_factory())


def test_sqlite_migration_6_upgrades_a_version_5_file_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    with sqlite3.connect(path) as conn:
        conn.create_function("legacy_internal_upstream", 1, lambda url: 0)
        for migration in MIGRATIONS[:5]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 5")
        conn.execute("INSERT INTO servers (server_id, name, upstream_url, owner_sub, owner_email, "
                     "upstream_headers_enc, forward_identity, created_at) "
                     "VALUES ('srv_old', 'old', 'https://a.example/mcp', '', 'o@x.org', '', 0, ?)", (T0,))

    async def scenario(s: Storage) -> None:
        assert (await s.get_server("srv_old")).name == "old"
        assert await s.upstream_auth.put_credential(upcred("u1", "srv_old"))
        assert await s.upstream_auth.count_credentials("srv_old") == 1

    run(scenario, SqliteStorage(str(path)))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
