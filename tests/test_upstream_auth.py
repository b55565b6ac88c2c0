"""Connected accounts (issue 11) against a real OAuth-protected upstream on loopback: an
authorization server process and an MCP SDK resource server process (tests/support/oauth_upstream.py).
The gateway side is `services.proxy.upstream_auth.UpstreamAuth` over real SQLite stores; the browser
trip is driven by an HTTP client that follows the gateway's authorization URL to the test AS."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import tornado.httpserver
import tornado.web

from services.authserver.keys import SecretBox
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream_auth.discovery import foreign_authorization_server, parse_www_authenticate
from services.proxy.upstream_auth.errors import (
    AuthorizationFailed,
    ConnectRequired,
    DiscoveryError,
    UpstreamAuthTemporarilyUnavailable,
)
from services.proxy.upstream_auth.sealing import Unreadable, open_tokens, seal_client_secret
from services.proxy.upstream_auth.service import TOKEN_CACHE_TTL, UpstreamAuth
from storage import DynamoDBStorage, SqliteStorage, Storage
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.ports import bind_unused_port

PUBLIC_URL = "http://127.0.0.1:9"  # the gateway's callback is never followed: the test reads the redirect
MASTER = b"m" * 32
DAY = 86_400.0


@dataclass(frozen=True)
class Srv:
    """The Server fields UpstreamAuth reads (the Server record gains the upstream_* ones later)."""

    server_id: str
    upstream_url: str
    internal_upstream: bool = True
    upstream_client_id: str = ""
    upstream_client_secret_enc: str = ""
    upstream_send_resource: bool = True
    upstream_audience: str = ""


class Clock:
    def __init__(self) -> None:
        import time

        self.offset = 0.0
        self._time = time.time

    def __call__(self) -> float:
        return self._time() + self.offset


@pytest.fixture(scope="module")
def upstream():
    process = OAuthUpstream().wait_ready()
    yield process
    process.stop()


@pytest.fixture(params=["sqlite", "dynamodb"])
def stores(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Makes storage instances that share one fresh store, on each backend."""
    if request.param == "sqlite":
        return lambda: SqliteStorage(str(tmp_path / "shared.db"))
    endpoint = request.getfixturevalue("dynamodb_endpoint")
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)
    table = f"gw-{uuid.uuid4().hex[:16]}"
    return lambda: DynamoDBStorage(table, "us-east-1", endpoint)


def service(path: Path | Storage, clock: Clock | None = None, policy: AddressPolicy | None = None) -> UpstreamAuth:
    storage = SqliteStorage(str(path)) if isinstance(path, Path) else path
    return UpstreamAuth(storage, SecretBox(MASTER), policy or AddressPolicy(["127.0.0.1/32"]), PUBLIC_URL,
                        now=clock or Clock())


def run(scenario, *services: UpstreamAuth) -> None:
    async def main() -> None:
        for svc in services:
            await svc.pending.open()
        try:
            await scenario(*services)
        finally:
            for svc in services:
                svc.close()
                await svc.pending.close()

    asyncio.run(main())


async def connect(svc: UpstreamAuth, user: str, server: Srv, upstream: OAuthUpstream, as_user: str) -> dict:
    """The browser trip: the gateway's authorization URL, the AS signing `as_user` in, the
    callback's query handed to `complete`. Returns the callback query."""
    url = await svc.begin(user, server, browser=f"browser-of-{user}", return_to="/done")
    async with httpx.AsyncClient(trust_env=False) as browser:
        await browser.get(f"{upstream.issuer}/signin", params={"user": as_user})
        answer = await browser.get(url)
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    assert location.startswith(svc.redirect_uri + "?")
    params = dict(parse_qsl(urlsplit(location).query))

    async def server_of(server_id: str):
        return server if server_id == server.server_id else None

    assert await svc.complete(params, user, f"browser-of-{user}", server_of) == (server.server_id, "/done")
    return params


async def whoami(upstream: OAuthUpstream, token: str) -> str:
    """The upstream's own answer through the MCP SDK client, with `token` as the bearer."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, trust_env=False) as http:
        async with Client(streamable_http_client(upstream.mcp_url, http_client=http), mode="legacy") as client:
            result = await client.call_tool("whoami", {})
    return result.content[0].text  # type: ignore[union-attr]


def refreshes(upstream: OAuthUpstream, subject: str) -> list[dict]:
    return [r for r in upstream.stats()["token_requests"]
            if r["grant_type"] == "refresh_token" and r["subject"] == subject]


# ------------------------------------------------------------------------ discovery


def test_discovery_reads_the_upstreams_resource_metadata_and_its_authorization_server(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    async def scenario(svc: UpstreamAuth) -> None:
        challenge = httpx.post(upstream.mcp_url, json={}, trust_env=False).headers["www-authenticate"]
        assert parse_www_authenticate(challenge)["resource_metadata"].endswith("/oauth-protected-resource/mcp")
        for header in ("", challenge):  # the well-known path, then the challenge's pointer
            found = await svc.discover(Srv("srv_a", upstream.mcp_url), header, fresh=True)
            assert found.resource == upstream.mcp_url
            assert found.server.issuer == upstream.issuer
            assert found.server.token_endpoint == f"{upstream.issuer}/token"
            assert found.server.registration_endpoint == f"{upstream.issuer}/register"
            assert found.server.revocation_endpoint == f"{upstream.issuer}/revoke"
            assert found.scopes == ("mcp",)
            assert foreign_authorization_server(found, upstream.mcp_url) == ""  # both on 127.0.0.1
            elsewhere = replace(found, server=replace(found.server, issuer="https://login.example/tenant"))
            assert foreign_authorization_server(elsewhere, upstream.mcp_url) == "login.example"

    run(scenario, service(tmp_path / "gw.db"))


def test_dynamic_registration_happens_once_per_server_and_issuer_and_its_secret_is_sealed(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    async def scenario(svc: UpstreamAuth) -> None:
        before = upstream.stats()["register"]
        first = await svc.begin("alice", Srv("srv_reg", upstream.mcp_url), "b")
        second = await svc.begin("bob", Srv("srv_reg", upstream.mcp_url), "b")
        assert upstream.stats()["register"] == before + 1
        client_ids = {dict(parse_qsl(urlsplit(u).query))["client_id"] for u in (first, second)}
        assert len(client_ids) == 1
        kept = await svc.store.get_registration("srv_reg", upstream.issuer)
        assert kept.client_id in client_ids and kept.kind == "dcr"
        assert kept.client_secret_enc.startswith("v1.") and "client_secret" not in kept.metadata
        # Another server is another registration.
        await svc.begin("alice", Srv("srv_reg2", upstream.mcp_url), "b")
        assert upstream.stats()["register"] == before + 2
        query = dict(parse_qsl(urlsplit(first).query))
        assert query["code_challenge_method"] == "S256" and query["resource"] == upstream.mcp_url
        assert query["redirect_uri"] == f"{PUBLIC_URL}/oauth/upstream/callback" and len(query["state"]) >= 40

    run(scenario, service(tmp_path / "gw.db"))
    with sqlite3.connect(tmp_path / "gw.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert upstream.stats()["clients"] and "client_secret\"" not in dump


# -------------------------------------------------------------------- the code flow


def test_two_users_each_get_their_own_token_and_the_upstream_sees_their_own_identity(
    upstream: OAuthUpstream, stores,
) -> None:
    server = Srv("srv_two", upstream.mcp_url)

    async def scenario(svc: UpstreamAuth) -> None:
        with pytest.raises(ConnectRequired) as missing:
            await svc.get_token("alice", server)
        assert missing.value.url == f"{PUBLIC_URL}/oauth/upstream/connect/srv_two"
        await connect(svc, "alice", server, upstream, as_user="up-alice")
        await connect(svc, "bob", server, upstream, as_user="up-bob")
        alice, bob = await svc.get_token("alice", server), await svc.get_token("bob", server)
        assert alice != bob
        assert await whoami(upstream, alice) == "up-alice"
        assert await whoami(upstream, bob) == "up-bob"
        assert await svc.store.count_credentials("srv_two") == 2
        code_requests = [r for r in upstream.stats()["token_requests"] if r["grant_type"] == "authorization_code"]
        assert code_requests[-1]["resource"] == upstream.mcp_url

    run(scenario, service(stores()))


def test_a_credential_row_copied_to_another_user_does_not_open(
    upstream: OAuthUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    server = Srv("srv_copy", upstream.mcp_url)

    async def scenario(svc: UpstreamAuth) -> None:
        await connect(svc, "alice", server, upstream, as_user="up-alice")
        row = await svc.store.get_credential("alice", "srv_copy")
        assert open_tokens(svc.box, row).access_token
        for forged in (replace(row, user_sub="mallory"), replace(row, server_id="srv_other"),
                       replace(row, issuer="https://evil.example")):
            with pytest.raises(Unreadable):
                open_tokens(svc.box, forged)
        # At the storage level: alice's row stored as mallory's.
        await svc.store.put_credential(replace(row, user_sub="mallory"))
        with caplog.at_level("WARNING", logger="mcpgw.security"):
            with pytest.raises(ConnectRequired):
                await svc.get_token("mallory", server)
        events = [r for r in caplog.records if getattr(r, "event", "") == "upstream_credential_unreadable"]
        assert [(e.user_sub, e.server_id) for e in events] == [("mallory", "srv_copy")]
        assert row.token_enc not in caplog.text
        assert await whoami(upstream, await svc.get_token("alice", server)) == "up-alice"

    run(scenario, service(tmp_path / "gw.db"))


def test_the_callback_refuses_unknown_reused_foreign_refused_and_expired_states(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_cb", upstream.mcp_url)
    clock = Clock()

    async def server_of(server_id: str):
        return server

    async def scenario(svc: UpstreamAuth) -> None:
        with pytest.raises(AuthorizationFailed, match="unknown"):
            await svc.complete({"state": "made-up", "code": "x"}, "alice", "browser-of-alice", server_of)
        params = await connect(svc, "alice", server, upstream, as_user="up-alice")
        with pytest.raises(AuthorizationFailed, match="unknown, was used already"):
            await svc.complete(params, "alice", "browser-of-alice", server_of)  # replayed
        url = await svc.begin("alice", server, "browser-of-alice")
        state = dict(parse_qsl(urlsplit(url).query))["state"]
        with pytest.raises(AuthorizationFailed, match="another browser"):
            await svc.complete({"state": state, "code": "x"}, "alice", "browser-of-mallory", server_of)
        with pytest.raises(AuthorizationFailed, match="another browser"):
            await svc.complete({"state": state, "code": "x"}, "mallory", "browser-of-alice", server_of)
        # The rightful browser still can finish; a code the upstream does not know is refused.
        with pytest.raises(AuthorizationFailed, match="refused the authorization code"):
            await svc.complete({"state": state, "code": "forged"}, "alice", "browser-of-alice", server_of)
        state = dict(parse_qsl(urlsplit(await svc.begin("bob", server, "b")).query))["state"]
        with pytest.raises(AuthorizationFailed, match="did not authorize: access_denied"):
            await svc.complete({"state": state, "error": "access_denied"}, "bob", "b", server_of)
        assert await svc.store.get_credential("bob", "srv_cb") is None
        # A trip left for more than 10 minutes has expired.
        state = dict(parse_qsl(urlsplit(await svc.begin("bob", server, "b")).query))["state"]
        clock.offset += 601
        with pytest.raises(AuthorizationFailed, match="expired"):
            await svc.complete({"state": state, "code": "x"}, "bob", "b", server_of)

    run(scenario, service(tmp_path / "gw.db", clock))


def test_static_client_from_the_servers_settings(upstream: OAuthUpstream, tmp_path: Path) -> None:
    registered = httpx.post(f"{upstream.issuer}/register", trust_env=False, json={
        "redirect_uris": [f"{PUBLIC_URL}/oauth/upstream/callback"], "client_name": "by the owner",
        "grant_types": ["authorization_code", "refresh_token"], "token_endpoint_auth_method": "client_secret_post",
    }).json()
    box = SecretBox(MASTER)
    server = Srv("srv_static", upstream.mcp_url, upstream_client_id=registered["client_id"],
                 upstream_client_secret_enc=seal_client_secret(box, "srv_static", "", registered["client_secret"]))
    clock = Clock()

    async def scenario(svc: UpstreamAuth) -> None:
        before = upstream.stats()["register"]
        url = await svc.begin("alice", server, "browser-of-alice")
        assert dict(parse_qsl(urlsplit(url).query))["client_id"] == registered["client_id"]
        await connect(svc, "alice", server, upstream, as_user="up-alice")
        clock.offset += DAY  # refresh with the static client too
        assert await whoami(upstream, await svc.get_token("alice", server)) == "up-alice"
        assert upstream.stats()["register"] == before
        assert await svc.store.get_registration("srv_static", upstream.issuer) is None

    run(scenario, service(tmp_path / "gw.db", clock))


def test_a_client_id_metadata_document_when_the_authorization_server_supports_them(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_cimd", upstream.mcp_url)
    storage = SqliteStorage(str(tmp_path / "gw.db"))
    https = UpstreamAuth(storage, SecretBox(MASTER), AddressPolicy(["127.0.0.1/32"]), "https://gw.example")

    async def scenario(svc: UpstreamAuth) -> None:
        before = upstream.stats()["register"]
        upstream.control(cimd=True)
        try:
            url = await svc.begin("alice", server, "b")
        finally:
            upstream.control(cimd=False)
        assert dict(parse_qsl(urlsplit(url).query))["client_id"] == "https://gw.example/oauth/upstream/client.json"
        assert upstream.stats()["register"] == before
        assert await svc.store.get_registration("srv_cimd", upstream.issuer) is None
        assert svc.client_metadata() == {
            "client_id": "https://gw.example/oauth/upstream/client.json", "client_name": "MCP Auth Gateway",
            "redirect_uris": ["https://gw.example/oauth/upstream/callback"],
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }

    run(scenario, https)


def test_resource_can_be_left_out_and_an_audience_added_for_providers_that_need_it(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_aud", upstream.mcp_url, upstream_send_resource=False, upstream_audience="api://tools")

    async def scenario(svc: UpstreamAuth) -> None:
        query = dict(parse_qsl(urlsplit(await svc.begin("alice", server, "b")).query))
        assert "resource" not in query and query["audience"] == "api://tools"
        await connect(svc, "alice", server, upstream, as_user="up-aud")
        exchange = [r for r in upstream.stats()["token_requests"] if r["subject"] == "up-aud"]
        assert [r["resource"] for r in exchange] == [None]

    run(scenario, service(tmp_path / "gw.db"))


# -------------------------------------------------------------------------- refresh


def test_a_due_token_is_refreshed_with_resource_and_the_rotated_refresh_token_kept(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_refresh", upstream.mcp_url)
    clock = Clock()

    async def scenario(svc: UpstreamAuth) -> None:
        await connect(svc, "carol", server, upstream, as_user="up-carol")
        first = await svc.get_token("carol", server)
        assert await svc.get_token("carol", server) == first  # fresh: no refresh
        assert refreshes(upstream, "up-carol") == []
        for round_ in (1, 2):
            clock.offset += DAY
            token = await svc.get_token("carol", server)
            assert token != first and await whoami(upstream, token) == "up-carol"
            done = refreshes(upstream, "up-carol")
            assert len(done) == round_ and done[-1]["resource"] == upstream.mcp_url
            first = token

    run(scenario, service(tmp_path / "gw.db", clock))


def test_refresh_keeps_the_old_refresh_token_when_the_upstream_returns_none(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_norotate", upstream.mcp_url)
    clock = Clock()

    async def scenario(svc: UpstreamAuth) -> None:
        await connect(svc, "dave", server, upstream, as_user="up-dave")
        kept = open_tokens(svc.box, await svc.store.get_credential("dave", "srv_norotate")).refresh_token
        upstream.control(rotate=False)
        try:
            for _ in range(2):
                clock.offset += DAY
                assert await whoami(upstream, await svc.get_token("dave", server)) == "up-dave"
                row = await svc.store.get_credential("dave", "srv_norotate")
                assert open_tokens(svc.box, row).refresh_token == kept
        finally:
            upstream.control(rotate=True)
        assert len(refreshes(upstream, "up-dave")) == 2

    run(scenario, service(tmp_path / "gw.db", clock))


def test_an_access_token_the_upstream_stopped_accepting_is_replaced_without_the_caller_noticing(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    """Real expiry: 2-second upstream tokens and the real clock (the upstream's own clock and
    rounding decide when it stops accepting one, as with any real upstream)."""
    server = Srv("srv_expiry", upstream.mcp_url)

    async def scenario(svc: UpstreamAuth) -> None:
        upstream.control(access_ttl=2)
        try:
            await connect(svc, "erin", server, upstream, as_user="up-erin")
        finally:
            upstream.control(access_ttl=3600)
        old = await svc.get_token("erin", server)
        while httpx.post(upstream.mcp_url, json={}, headers={"Authorization": f"Bearer {old}"},
                         trust_env=False).status_code != 401:  # until the upstream itself refuses it
            await asyncio.sleep(0.2)
        # What the proxy does on the upstream's 401: the refused token is never handed out again.
        token = await svc.get_token("erin", server, rejected=old)
        assert token != old and await whoami(upstream, token) == "up-erin"

    run(scenario, service(tmp_path / "gw.db"))


def test_concurrent_refreshes_on_two_instances_never_mix_users_and_refresh_once_each(
    upstream: OAuthUpstream, stores,
) -> None:
    server = Srv(f"srv_race_{uuid.uuid4().hex[:6]}", upstream.mcp_url)
    clock = Clock()
    tag = uuid.uuid4().hex[:6]  # the AS is shared by the module: subjects of this run only
    users = {"frank": f"up-frank-{tag}", "grace": f"up-grace-{tag}"}

    async def scenario(one: UpstreamAuth, two: UpstreamAuth) -> None:
        for user, as_user in users.items():
            await connect(one, user, server, upstream, as_user=as_user)
        clock.offset += DAY
        calls = [(svc, user) for _ in range(3) for svc in (one, two) for user in users]
        tokens = await asyncio.gather(*(svc.get_token(user, server) for svc, user in calls))
        for (_svc, user), token in zip(calls, tokens, strict=True):
            assert await whoami(upstream, token) == users[user]
        for user, as_user in users.items():
            assert len(refreshes(upstream, as_user)) == 1, user  # one refresh per user, across instances
            assert len({t for (_s, u), t in zip(calls, tokens, strict=True) if u == user}) == 1

    run(scenario, service(stores(), clock), service(stores(), clock))


def test_a_refresh_waits_for_the_lease_holder_and_takes_over_when_it_gives_up(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_lease", upstream.mcp_url)
    clock = Clock()

    async def scenario(svc: UpstreamAuth) -> None:
        await connect(svc, "kim", server, upstream, as_user="up-kim")
        clock.offset += DAY
        # Another instance is refreshing kim's token (and will give up without a result).
        assert await svc.store.take_refresh_lease("kim", "srv_lease", "other-instance", clock() + 15, clock())
        waiting = asyncio.ensure_future(svc.get_token("kim", server))
        await asyncio.sleep(0.5)
        assert not waiting.done() and refreshes(upstream, "up-kim") == []
        await svc.store.release_refresh_lease("kim", "srv_lease", "other-instance")
        assert await whoami(upstream, await waiting) == "up-kim"
        assert len(refreshes(upstream, "up-kim")) == 1

    run(scenario, service(tmp_path / "gw.db", clock))


def test_a_refused_refresh_drops_the_credential_and_asks_to_connect_again(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_refused", upstream.mcp_url)
    clock = Clock()

    async def scenario(svc: UpstreamAuth) -> None:
        await connect(svc, "heidi", server, upstream, as_user="up-heidi")
        upstream.control(revoke_user="up-heidi")
        clock.offset += DAY
        with pytest.raises(ConnectRequired) as refused:
            await svc.get_token("heidi", server)
        assert refused.value.url.endswith("/oauth/upstream/connect/srv_refused")
        assert await svc.store.get_credential("heidi", "srv_refused") is None
        await connect(svc, "heidi", server, upstream, as_user="up-heidi")  # reconnecting works
        assert await whoami(upstream, await svc.get_token("heidi", server)) == "up-heidi"

    run(scenario, service(tmp_path / "gw.db", clock))


def test_disconnect_revokes_at_the_upstream_and_forgets_the_credential(
    upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    server = Srv("srv_disc", upstream.mcp_url)

    async def scenario(svc: UpstreamAuth) -> None:
        await connect(svc, "ivan", server, upstream, as_user="up-ivan")
        token = await svc.get_token("ivan", server)
        before = upstream.stats()["revoke"]
        assert await svc.disconnect("ivan", server) is True
        assert upstream.stats()["revoke"] == before + 2  # refresh and access token
        with pytest.raises(ConnectRequired):
            await svc.get_token("ivan", server)
        refused = httpx.post(upstream.mcp_url, json={}, headers={"Authorization": f"Bearer {token}"}, trust_env=False)
        assert refused.status_code == 401  # revoked at the upstream too
        assert await svc.disconnect("ivan", server) is False

    run(scenario, service(tmp_path / "gw.db"))


def test_a_disconnect_on_another_instance_is_seen_within_the_token_cache_lifetime(
    upstream: OAuthUpstream, stores,
) -> None:
    server = Srv(f"srv_two_{uuid.uuid4().hex[:6]}", upstream.mcp_url)
    clock = Clock()

    async def scenario(one: UpstreamAuth, two: UpstreamAuth) -> None:
        await connect(one, "judy", server, upstream, as_user="up-judy")
        assert await whoami(upstream, await two.get_token("judy", server)) == "up-judy"  # warm on two
        assert await one.disconnect("judy", server) is True
        clock.offset += TOKEN_CACHE_TTL + 0.1  # no longer than this (5 s): two reads storage again
        with pytest.raises(ConnectRequired):
            await two.get_token("judy", server)

    # The token cache runs on the monotonic clock: both instances get the test's clock for it too.
    run(scenario, *(UpstreamAuth(stores(), SecretBox(MASTER), AddressPolicy(["127.0.0.1/32"]), PUBLIC_URL,
                                 now=clock, clock=clock) for _ in range(2)))


def test_an_authorization_server_that_is_down_or_failing_is_temporary_and_keeps_the_token(tmp_path: Path) -> None:
    upstream = OAuthUpstream().wait_ready()  # its own: this test stops its AS
    server = Srv("srv_down", upstream.mcp_url)
    clock = Clock()

    async def scenario(svc: UpstreamAuth) -> None:
        await connect(svc, "judy", server, upstream, as_user="up-judy")
        clock.offset += DAY
        upstream.control(token_status=503)
        with pytest.raises(UpstreamAuthTemporarilyUnavailable, match="HTTP 503"):
            await svc.get_token("judy", server)
        upstream.control(token_status=0)
        kept = await svc.store.get_credential("judy", "srv_down")
        upstream.stop_as()
        with pytest.raises(UpstreamAuthTemporarilyUnavailable, match="unreachable"):
            await svc.get_token("judy", server)
        assert await svc.store.get_credential("judy", "srv_down") == kept
        # The lease was given back: the next try refreshes again (and fails the same way).
        with pytest.raises(UpstreamAuthTemporarilyUnavailable):
            await svc.get_token("judy", server)

    try:
        run(scenario, service(tmp_path / "gw.db", clock))
    finally:
        upstream.stop()


# --------------------------------------------------- metadata the gateway must refuse


class _Documents(tornado.web.RequestHandler):
    """Serves whatever document the test put under the path."""

    def get(self) -> None:
        status, body = self.application.settings["documents"].get(self.request.path, (404, b"{}"))
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.write(body)


async def _serve(documents: dict) -> tuple[tornado.httpserver.HTTPServer, str]:
    sock, port = bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", _Documents)], documents=documents))
    server.add_sockets([sock])
    return server, f"http://127.0.0.1:{port}"


def _prm(base: str, authorization_server: str) -> bytes:
    return json.dumps({"resource": f"{base}/mcp", "authorization_servers": [authorization_server]}).encode()


def test_an_authorization_server_on_a_forbidden_address_is_refused_by_the_ssrf_guard(tmp_path: Path) -> None:
    async def scenario(svc: UpstreamAuth) -> None:
        documents: dict = {}
        http, base = await _serve(documents)
        try:
            for forbidden in ("http://169.254.169.254", "http://10.0.0.1", "http://[::1]:8080"):
                documents["/.well-known/oauth-protected-resource/mcp"] = (200, _prm(base, forbidden))
                with pytest.raises(DiscoveryError, match="refused") as refused:
                    await svc.discover(Srv("srv_ssrf", f"{base}/mcp"), fresh=True)
                assert forbidden.split("//")[1].split(":8080")[0].strip("[]") in str(refused.value)
            # An upstream no administrator approved for internal addresses: public ones only,
            # whatever the allow-list says (its own AS on loopback included).
            documents["/.well-known/oauth-protected-resource/mcp"] = (200, _prm(base, base))
            with pytest.raises(DiscoveryError, match="refused|public"):
                await svc.discover(Srv("srv_ssrf", f"{base}/mcp", internal_upstream=False), fresh=True)
            # A challenge may not point discovery at another host either.
            with pytest.raises(DiscoveryError, match="another origin"):
                await svc.discover(Srv("srv_ssrf", f"{base}/mcp"), fresh=True,
                                   www_authenticate='Bearer resource_metadata="http://127.0.0.2/x"')
        finally:
            http.stop()

    run(scenario, service(tmp_path / "gw.db"))


def test_huge_or_malformed_metadata_is_a_clear_error(tmp_path: Path) -> None:
    async def scenario(svc: UpstreamAuth) -> None:
        documents: dict = {}
        http, base = await _serve(documents)
        prm_path = "/.well-known/oauth-protected-resource/mcp"
        server = Srv("srv_bad", f"{base}/mcp")
        cases = [
            ({prm_path: (200, b"{" + b" " * (2 << 20) + b"}")}, "larger than|more than"),
            ({prm_path: (200, b"<html>not json</html>")}, "not a JSON object"),
            ({prm_path: (200, b"[]")}, "not a JSON object"),
            ({prm_path: (200, b'{"resource": 1}')}, "lacks resource or authorization_servers"),
            ({prm_path: (200, json.dumps({"resource": "https://elsewhere.example/mcp",
                                          "authorization_servers": [base]}).encode())}, "not this upstream"),
            ({}, "publishes no protected resource metadata"),
            ({prm_path: (500, b"{}")}, "HTTP 500"),
            ({prm_path: (200, _prm(base, base))}, "publishes no metadata"),
            ({prm_path: (200, _prm(base, base)),
              "/.well-known/oauth-authorization-server": (200, json.dumps({"issuer": "http://other"}).encode())},
             "is for issuer"),
            ({prm_path: (200, _prm(base, base)),
              "/.well-known/oauth-authorization-server": (200, json.dumps({
                  "issuer": base, "authorization_endpoint": f"{base}/a", "token_endpoint": "javascript:x",
              }).encode())}, "token_endpoint"),
            ({prm_path: (200, _prm(base, base)),
              "/.well-known/oauth-authorization-server": (200, json.dumps({
                  "issuer": base, "authorization_endpoint": f"{base}/a", "token_endpoint": f"{base}/t",
                  "code_challenge_methods_supported": ["plain"],
              }).encode())}, "PKCE S256"),
            ({prm_path: (200, _prm(base, base)),
              "/.well-known/oauth-authorization-server": (200, json.dumps({
                  "issuer": base, "authorization_endpoint": f"{base}/a", "token_endpoint": f"{base}/t",
                  "scopes_supported": ["x"] * 10_000,
              }).encode())}, "at most 50 strings"),
        ]
        try:
            for served, message in cases:
                documents.clear()
                documents.update(served)
                with pytest.raises(DiscoveryError, match=message):
                    await svc.discover(server, fresh=True)
            # Neither CIMD nor DCR nor a static client: the owner is told what to do.
            documents["/.well-known/oauth-authorization-server"] = (200, json.dumps({
                "issuer": base, "authorization_endpoint": f"{base}/a", "token_endpoint": f"{base}/t"}).encode())
            with pytest.raises(DiscoveryError, match="static client id"):
                await svc.begin("alice", server, "b")
        finally:
            http.stop()

    run(scenario, service(tmp_path / "gw.db"))
