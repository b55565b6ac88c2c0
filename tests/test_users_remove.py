"""`gateway.py users list|remove` (issue 11: a removed user's upstream tokens go with them): the
storage operations on both backends (SQLite, DynamoDB on moto), and the command against a real
gateway process, the real OAuth upstream and the MCP SDK's OAuth client (tests/support/upstream_accounts.py):
the removed user's refresh token, access token, consents, sessions and connected account stop
working or are gone, the upstream sees the revocation, everyone else keeps theirs."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from services.authserver.signin import dev_subject
from storage import (
    Consent,
    DynamoDBStorage,
    McpSession,
    RefreshFamily,
    RefreshToken,
    Server,
    SqliteStorage,
    User,
)
from storage.dynamodb.codecs import CONSENTS, _consent_pk, _key
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import run
from tests.support.jsonrpc import rpc
from tests.support.mcp_oauth import connect, refresh_now
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.upstream_accounts import (  # noqa: F401 (fixtures)
    ALICE_AT_UPSTREAM,
    BOB_AT_UPSTREAM,
    FRIEND,
    OWNER,
    credential,
    gateway,
    server_id,
    signed_in,
    upstream,
    whoami_text,
)

T0 = 1_800_000_000.0
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2025-11-25"}


# ------------------------------------------------------------------ storage, both backends


@pytest.fixture(params=["sqlite", "dynamodb"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if request.param == "sqlite":
        return SqliteStorage(str(tmp_path / "gateway.db"))
    endpoint = request.getfixturevalue("dynamodb_endpoint")
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return DynamoDBStorage(f"gw-{uuid.uuid4().hex[:16]}", "us-east-1", endpoint)


def in_loop(scenario, store) -> None:
    async def main() -> None:
        await store.open()
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def session(session_id: str, user_sub: str, server_id: str) -> McpSession:
    return McpSession(session_id, "up-" + session_id, user_sub, server_id, "2025-11-25", T0, time.time() + 3600)


def test_users_are_listed_and_a_users_consents_sessions_and_row_are_deleted_alone(store) -> None:
    async def scenario(s) -> None:
        for sub, email in (("u-bob", "bob@x.org"), ("u-alice", "alice@x.org"), ("u-unverified", "")):
            await s.upsert_user(User(sub, email, bool(email), created_at=T0, last_login_at=T0))
        assert [u.sub for u in await s.list_users()] == ["u-unverified", "u-alice", "u-bob"]  # by e-mail, then sub
        for srv in ("srv_a", "srv_b"):
            await s.create_server(Server(srv, srv, "http://127.0.0.1:9/mcp", owner_sub="u-owner", created_at=T0))
        for sub, client_id, audience in (("u-alice", "c1", "aud-a"), ("u-alice", "c1", "aud-b"),
                                         ("u-alice", "c2", "aud-a"), ("u-bob", "c1", "aud-a")):
            await s.put_consent(Consent(sub, client_id, audience, "mcp:connect", T0))
        for session_id, sub, srv in (("mcpgw-1", "u-alice", "srv_a"), ("mcpgw-2", "u-alice", "srv_b"),
                                     ("mcpgw-3", "u-bob", "srv_a")):
            await s.put_session(session(session_id, sub, srv))

        assert await s.delete_user_consents("u-alice") == 3
        assert await s.get_consent("u-alice", "c1", "aud-a") is None
        assert await s.get_consent("u-alice", "c2", "aud-a") is None
        assert await s.get_consent("u-bob", "c1", "aud-a") is not None
        assert await s.delete_user_sessions("u-alice") == 2
        now = time.time()
        assert await s.get_session("mcpgw-1", now) is None and await s.get_session("mcpgw-2", now) is None
        assert await s.get_session("mcpgw-3", now) is not None
        assert await s.delete_user("u-alice") is True
        assert await s.get_user("u-alice") is None
        assert await s.delete_user("u-alice") is False
        assert [u.sub for u in await s.list_users()] == ["u-unverified", "u-bob"]
        assert await s.get_user("u-bob") is not None
        assert await s.delete_user_consents("u-alice") == 0 and await s.delete_user_sessions("u-alice") == 0

    in_loop(scenario, store)


def test_dynamodb_consents_written_before_the_user_index_are_found_through_the_users_families(
        dynamodb_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)
    store = DynamoDBStorage(f"gw-{uuid.uuid4().hex[:16]}", "us-east-1", dynamodb_endpoint)

    async def scenario(s: DynamoDBStorage) -> None:
        old = Consent("u-alice", "c-old", "aud-a", "mcp:connect", T0)
        # As put_consent wrote it before the user index existed: the key and the record only.
        item = {**_key(_consent_pk(old.user_sub, old.client_id), f"AUD#{old.audience}"), **CONSENTS.encode(old)}
        await s._run(s._put, item)
        family = RefreshFamily("fam-1", "c-old", "u-alice", "aud-a", "mcp:connect", T0, T0 + 86400)
        await s.create_family(family, RefreshToken("h-1", "fam-1", "c-old", "u-alice", "mcp:connect", "aud-a", T0,
                                                   T0 + 3600, T0 + 86400))
        await s.put_consent(Consent("u-alice", "c-new", "aud-a", "mcp:connect", T0))
        assert await s.delete_user_consents("u-alice") == 2
        assert await s.get_consent("u-alice", "c-old", "aud-a") is None
        assert await s.get_consent("u-alice", "c-new", "aud-a") is None

    in_loop(scenario, store)


# ------------------------------------------------------------------ the command, real processes


async def in_store(gateway: GatewayProcess, job):
    """`job(storage)` on the gateway's own SQLite file."""
    storage = SqliteStorage(str(gateway.state_dir / "gateway.db"))
    await storage.open()
    try:
        return await job(storage)
    finally:
        await storage.close()


def sessions_of(gateway: GatewayProcess, sub: str) -> int:
    with sqlite3.connect(gateway.state_dir / "gateway.db") as db:
        return db.execute("SELECT count(*) FROM sessions WHERE user_sub = ?", (sub,)).fetchone()[0]


async def mcp_status(gateway: GatewayProcess, server_id: str, token: str, message: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        return await http.post(f"{gateway.url}/mcp/{server_id}", json=message or rpc("ping"),
                               headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"})


async def open_session(gateway: GatewayProcess, server_id: str, token: str) -> str:
    """An MCP session of the token's user (left open, as a client that went away would)."""
    answer = await mcp_status(gateway, server_id, token, rpc(
        "initialize", protocolVersion="2025-11-25", capabilities={}, clientInfo={"name": "t", "version": "1"}))
    assert answer.status_code == 200, answer.text
    return answer.headers["mcp-session-id"]


async def refused_by_proxy(gateway: GatewayProcess, server_id: str, token: str) -> None:
    """Revocations reach the serving process within 3 s (its revocation poll): wait for it."""
    deadline = time.monotonic() + 30
    while (answer := await mcp_status(gateway, server_id, token)).status_code != 401:
        assert answer.status_code not in (403, 404), answer.text
        assert time.monotonic() < deadline, "the revoked access token is still accepted"
        await asyncio.sleep(0.2)


def test_removing_a_user_ends_all_their_access_and_connected_account_and_leaves_others_alone(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    friend_sub, owner_sub = dev_subject(FRIEND), dev_subject(OWNER)

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as owner_browser, ScriptedBrowser() as friend_browser:
            owner = await signed_in(owner_browser, gateway, server_id, upstream, OWNER, ALICE_AT_UPSTREAM)
            friend = await signed_in(friend_browser, gateway, server_id, upstream, FRIEND, BOB_AT_UPSTREAM)
            async with connect(owner) as owner_client, connect(friend) as friend_client:
                assert whoami_text(await owner_client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                assert whoami_text(await friend_client.call_tool("whoami", {})) == BOB_AT_UPSTREAM
            owner_token, friend_token = owner.tokens.access_token, friend.tokens.access_token  # type: ignore[union-attr]
            await open_session(gateway, server_id, friend_token)
            assert sessions_of(gateway, friend_sub) >= 1
            assert {friend_sub, owner_sub} <= {u["sub"] for u in gateway.cli_json("users", "list")}

            # The owner of a server is refused, naming it, and nothing changes.
            refused = gateway.cli("users", "remove", "--user", OWNER, check=False)
            assert refused.returncode == 1 and server_id in refused.stderr, refused.stderr
            assert "servers remove" in refused.stderr and "user_removed" not in refused.stderr
            assert await in_store(gateway, lambda s: s.get_user(owner_sub)) is not None
            assert await in_store(gateway, lambda s: s.get_pending("signout-all", owner_sub, time.time())) is None
            assert await credential(gateway, OWNER, server_id) is not None

            revocations = upstream.stats()["revoke"]
            removed = gateway.cli("--json", "users", "remove", "--user", FRIEND)
            done = json.loads(removed.stdout)
            assert done["removed"] == friend_sub and done["email"] == FRIEND
            assert done["families_revoked"] >= 1 and done["consents_deleted"] >= 1
            assert done["sessions_deleted"] >= 1 and done["upstream_credentials_deleted"] == 1
            assert removed.stderr.count("event=user_removed") == 1, removed.stderr
            assert upstream.stats()["revoke"] == revocations + 2  # its refresh and access token, at the upstream

            # The refresh token is refused at /token, the access token at the proxy.
            refreshed = await refresh_now(friend)
            assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant", refreshed.text
            await refused_by_proxy(gateway, server_id, friend_token)

            async def gone(s) -> None:
                assert await s.get_user(friend_sub) is None
                assert await s.upstream_auth.credentials_of_user(friend_sub) == []
                assert [f for f in await s.families_of_user(friend_sub) if not f.revoked_at] == []
                assert await s.get_pending("signout-all", friend_sub, time.time()) is not None

            await in_store(gateway, gone)
            assert sessions_of(gateway, friend_sub) == 0
            page = await friend_browser.follow(f"{gateway.url}/dashboard")
            assert urlsplit(page.url).path == "/login"  # the browser sign-in ended

            # Everyone else keeps their tokens and their connected account.
            assert (await mcp_status(gateway, server_id, owner_token)).status_code not in (401, 403, 404)
            assert await credential(gateway, OWNER, server_id) is not None
            async with connect(owner) as owner_client:
                assert whoami_text(await owner_client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
            assert (await refresh_now(owner)).status_code == 200
            assert [u["sub"] for u in gateway.cli_json("users", "list") if u["sub"] == friend_sub] == []

        again = gateway.cli("users", "remove", "--user", FRIEND, check=False)
        assert again.returncode == 1 and f"no such user: nobody has signed in as {FRIEND}" in again.stderr
        by_sub = gateway.cli("users", "remove", "--user", friend_sub, check=False)
        assert by_sub.returncode == 1 and "no such user" in by_sub.stderr

    scenario()


def test_a_removal_that_fails_half_way_leaves_nothing_usable_and_can_be_run_again(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    friend_sub = dev_subject(FRIEND)
    db = gateway.state_dir / "gateway.db"

    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            friend = await signed_in(browser, gateway, server_id, upstream, FRIEND, BOB_AT_UPSTREAM)
            async with connect(friend) as client:
                assert whoami_text(await client.call_tool("whoami", {})) == BOB_AT_UPSTREAM
            token = friend.tokens.access_token  # type: ignore[union-attr]
            with sqlite3.connect(db) as conn:  # the storage refuses the last step: deleting the user row
                conn.execute("CREATE TRIGGER keep_users BEFORE DELETE ON users "
                             "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
            failed = gateway.cli("users", "remove", "--user", FRIEND, check=False)
            assert failed.returncode == 1 and "injected failure" in failed.stderr, failed.stderr
            assert "Traceback" not in failed.stderr and "user_removed" not in failed.stderr
            # Everything but the user row is gone already: nothing of theirs works.
            assert (await refresh_now(friend)).status_code == 400
            await refused_by_proxy(gateway, server_id, token)
            assert await in_store(gateway, lambda s: s.upstream_auth.credentials_of_user(friend_sub)) == []
            assert await in_store(gateway, lambda s: s.get_user(friend_sub)) is not None

            with sqlite3.connect(db) as conn:
                conn.execute("DROP TRIGGER keep_users")
            rerun = gateway.cli("--json", "users", "remove", "--user", FRIEND)
            done = json.loads(rerun.stdout)
            assert (done["removed"], done["families_revoked"], done["upstream_credentials_deleted"]) == (
                friend_sub, 0, 0)
            assert rerun.stderr.count("event=user_removed") == 1
            assert await in_store(gateway, lambda s: s.get_user(friend_sub)) is None

    scenario()


def test_users_remove_names_users_by_sub_when_an_e_mail_is_ambiguous_and_refuses_nonsense(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw")  # the CLI only: nothing serves
    gateway.state_dir.mkdir(parents=True)

    async def seed(s) -> None:
        for sub in ("idp-1", "idp-2"):  # one address, two accounts at the identity provider
            await s.upsert_user(User(sub, "pat@example.com", True, created_at=T0, last_login_at=T0))
        await s.upsert_user(User("idp-3", "lee@example.com", True, created_at=T0, last_login_at=T0))

    asyncio.run(in_store(gateway, seed))
    listed = gateway.cli("users", "list").stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [
        ["idp-3", "lee@example.com"], ["idp-1", "pat@example.com"], ["idp-2", "pat@example.com"]]
    ambiguous = gateway.cli("users", "remove", "--user", "Pat@Example.com", check=False)
    assert ambiguous.returncode == 1 and "idp-1, idp-2" in ambiguous.stderr and "sub" in ambiguous.stderr
    assert len(gateway.cli_json("users", "list")) == 3  # nothing removed
    unknown = gateway.cli("users", "remove", "--user", "nobody@example.com", check=False)
    assert unknown.returncode == 1 and "no such user" in unknown.stderr and "Traceback" not in unknown.stderr
    empty = gateway.cli("users", "remove", "--user", " ", check=False)
    assert empty.returncode == 1 and "--user is empty" in empty.stderr
    out = gateway.cli("users", "remove", "--user", "idp-2")
    assert out.stdout.startswith("removed pat@example.com (idp-2): 0 authorization(s) revoked")
    assert [u["sub"] for u in gateway.cli_json("users", "list")] == ["idp-3", "idp-1"]
    by_mail = gateway.cli_json("users", "remove", "--user", "pat@example.com")  # one left: the e-mail will do
    assert by_mail["removed"] == "idp-1"
