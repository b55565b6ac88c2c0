"""Security events of the authorization server and the server registry (issue 9): one line
each on the `mcpgw.security` logger, with the standard fields and never a token or secret,
and the tokens_total{event} metrics. Services run in this process on a real SQLite file."""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from services.authserver.clients import ClientRegistry
from services.authserver.signin import secret_digest
from services.authserver.tokens import GRACE
from services.common.errors import OAuthError, PageError
from services.proxy.upstream.fetch import fetch_small
from services.proxy.upstream.policy import AddressPolicy
from storage.base import Pending
from tests.support.inprocess import run
from tests.test_cimd import DocumentServer, client_document, self_signed_certificate
from tests.test_services_tokens import ALICE, BOB, REDIRECT, WallClock, issue, world

# The attributes every LogRecord has: anything else on a record is a field of the event.
STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime"}


@pytest.fixture
def security(caplog):
    caplog.set_level(logging.INFO, logger="mcpgw.security")
    return caplog


def events(caplog, name: str, level: int = logging.WARNING, **match) -> list[logging.LogRecord]:
    found = [r for r in caplog.records if r.name == "mcpgw.security" and getattr(r, "event", None) == name
             and all(getattr(r, k, None) == v for k, v in match.items())]
    assert all(r.levelno == level for r in found), [(r.levelname, r.getMessage()) for r in found]
    return found


def fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in STANDARD}


def assert_no_secret(caplog, *values: str) -> None:
    """No security line (message or any field) carries any of these values."""
    for record in caplog.records:
        if record.name == "mcpgw.security":
            line = record.getMessage() + " " + repr(fields(record))
            for value in values:
                assert value not in line, (record.getMessage(), fields(record))


async def alice_tokens(s) -> tuple[str, str, dict]:
    """A code for Alice (srv_t), its verifier, and what exchanging it gives."""
    code, verifier = await issue(s, user=ALICE)
    return code, verifier, await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)


def tokens_total(s, event: str) -> float:
    return s.metrics.value("tokens_total", event=event)


# ----------------------------------------------------------------------- tokens


def test_refresh_reuse_revokes_the_family_with_one_event_and_the_token_counters(tmp_path, security):
    @run
    async def main():
        clock = WallClock()
        async with world(tmp_path, clock) as s:
            code, verifier, first = await alice_tokens(s)
            assert tokens_total(s, "issued") == 1
            second = await s.tokens.refresh(s.client, first["refresh_token"], None, None)
            assert tokens_total(s, "refreshed") == 1
            assert events(security, "refresh_reuse") == []
            clock.now += GRACE + 1  # past the lost-response grace: this reuse is theft
            with pytest.raises(OAuthError):
                await s.tokens.refresh(s.client, first["refresh_token"], None, None)
            (event,) = events(security, "refresh_reuse")
            assert fields(event) | {"user_sub": ALICE.sub, "client_id": s.client.client_id,
                                    "server_id": "srv_t"} == fields(event)
            assert tokens_total(s, "refresh_reuse") == 1 and tokens_total(s, "revoked") == 1
            assert tokens_total(s, "refreshed") == 1
            assert_no_secret(security, code, verifier, first["refresh_token"], first["access_token"],
                             second["refresh_token"], second["access_token"])
    main()


def test_a_replayed_code_revokes_what_it_issued_with_an_event(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            code, verifier, body = await alice_tokens(s)
            with pytest.raises(OAuthError):
                await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)
            (event,) = events(security, "code_reuse")
            assert event.user_sub == ALICE.sub and event.client_id == s.client.client_id
            assert tokens_total(s, "revoked") == 1 and tokens_total(s, "issued") == 1
            assert_no_secret(security, code, verifier, body["refresh_token"], body["access_token"])
    main()


def test_revocation_by_the_client_and_from_the_dashboard_are_events(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            code, verifier, one = await alice_tokens(s)
            await s.tokens.revoke(s.client, one["refresh_token"], None)
            code, verifier, two = await alice_tokens(s)
            await s.tokens.revoke(s.client, two["access_token"], "access_token")
            by_client = events(security, "token_revoked")
            assert len(by_client) == 2
            assert all(e.user_sub == ALICE.sub and e.client_id == s.client.client_id and e.server_id == "srv_t"
                       and e.reason == "client" for e in by_client)
            code, verifier, three = await alice_tokens(s)
            actor = await s.dashboard.actor({"sub": ALICE.sub})
            assert await s.dashboard.revoke_authorization(actor, s.client.client_id) == 2  # two and three
            from_dashboard = events(security, "token_revoked")[2:]
            assert len(from_dashboard) == 2
            assert all(e.user_sub == ALICE.sub and e.client_id == s.client.client_id and e.server_id == "srv_t"
                       and e.reason == "user_or_admin" for e in from_dashboard)
            assert tokens_total(s, "revoked") == 4
            assert_no_secret(security, one["refresh_token"], one["access_token"], two["refresh_token"], two["access_token"],
                             three["refresh_token"], three["access_token"])
    main()


def test_key_rotation_is_an_event_naming_the_new_kid_only(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            old = {k.kid for k in s.keyring.records()}
            new = await s.keyring.rotate()
            (event,) = events(security, "key_rotated")
            assert event.kid == new.kid and event.retiring == len(old)
            assert_no_secret(security, new.private_key_enc, "PRIVATE KEY")
    main()


# ----------------------------------------------------------------------- clients


def test_dynamic_registration_is_an_event_without_the_secret(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            client, secret = await s.clients.register(
                {"redirect_uris": ["https://app.example/cb?x=1"], "client_name": "Confidential app"})
            assert secret
            registered = [e for e in events(security, "client_registered") if e.client_id == client.client_id]
            (event,) = registered
            assert event.kind == "dcr" and event.redirect_hosts == ["app.example"]
            assert_no_secret(security, secret, client.secret_hash)
    main()


def test_a_metadata_document_client_is_registered_at_first_use_at_info(tmp_path, security):
    cert, key = self_signed_certificate(tmp_path)
    documents = DocumentServer(cert, key)
    try:
        @run
        async def main():
            async with world(tmp_path) as s:
                trust = ssl.create_default_context(cafile=cert)
                policy = AddressPolicy(["127.0.0.0/8"])

                async def fetch(url):
                    response = await fetch_small(url, policy=policy, max_bytes=5120, timeout=5.0,
                                                 ssl_context=trust)
                    return response.status, response.headers, response.body

                registry = ClientRegistry(s.storage, fetch)
                url = documents.publish("/client.json", client_document(documents.base + "/client.json"))
                assert (await registry.get(url)).kind == "cimd"
                (event,) = events(security, "client_registered", level=logging.INFO, kind="cimd")
                assert event.client_id == url and event.kind == "cimd"
                await registry.get(url)  # cached
                assert len(events(security, "client_registered", level=logging.INFO, kind="cimd")) == 1
                other = ClientRegistry(s.storage, fetch)  # another instance: fetched, already stored
                await other.get(url)
                assert len(events(security, "client_registered", level=logging.INFO, kind="cimd")) == 1
        main()
    finally:
        documents.stop()


# ----------------------------------------------------------------------- sign-in


def test_sign_out_everywhere_is_an_event_without_the_session_id(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            session = await s.accounts.start_session(ALICE.sub)
            await s.accounts.end_all_sessions(ALICE.sub)
            (event,) = events(security, "signout_all")
            assert event.user_sub == ALICE.sub
            assert not await s.accounts.session_is_live(session.sid, ALICE.sub)
            assert_no_secret(security, session.sid, secret_digest(session.sid))
    main()


def test_a_callback_from_another_browser_is_a_refused_sign_in(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            state, mine, theirs = (secrets.token_urlsafe(32) for _ in range(3))
            await s.storage.put_pending(Pending("login", state, {"nonce": "n", "verifier": "v", "next": "/",
                                                                 "browser": secret_digest(mine)}, time.time() + 600))
            with pytest.raises(PageError) as refused:
                await s.accounts.finish(state, "idp-code", None, browser_key=theirs)
            assert refused.value.status == 403
            (event,) = events(security, "signin_refused")
            assert event.reason == "browser_mismatch"
            assert_no_secret(security, state, mine, theirs, "idp-code")
    main()


def test_a_user_the_sharing_rules_refuse_at_authorization_is_an_event(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            params = {"client_id": s.client.client_id, "redirect_uri": REDIRECT, "response_type": "code",
                      "code_challenge": "A" * 43, "code_challenge_method": "S256", "scope": "mcp:connect",
                      "resource": s.config.server_resource("srv_t"), "state": "st-secretish"}
            bob = {"sub": BOB.sub, "auth_time": time.time()}
            consent = await s.authorizations.start(params, bob)
            key = parse_qs(urlsplit(consent.url).query)["req"][0]
            outcome = await s.authorizations.review(key, bob, consent.url)
            assert type(outcome).__name__ == "Denied"
            (event,) = events(security, "signin_refused")
            assert (event.user_sub, event.client_id, event.server_id) == (BOB.sub, s.client.client_id, "srv_t")
            assert_no_secret(security, key, "st-secretish")
    main()


# ----------------------------------------------------------------------- sharing


def test_grants_ownership_binding_and_removal_are_events(tmp_path, security):
    @run
    async def main():
        async with world(tmp_path) as s:
            await s.servers.add(name="Carol's", upstream_url="http://127.0.0.1:9/mcp",
                                owner_email="carol@example.com", server_id="srv_carol", internal_allowed=True)
            await s.servers.add_grant("srv_carol", "email", "Dan@Example.com")
            await s.servers.add_grant("srv_carol", "domain", "corp.example")
            added = events(security, "grant_added")
            assert [(e.server_id, e.kind, e.value) for e in added] == [
                ("srv_carol", "email", "dan@example.com"), ("srv_carol", "domain", "corp.example")]
            await s.servers.remove_grant("srv_carol", "email", "dan@example.com")
            (removed,) = events(security, "grant_removed")
            assert (removed.server_id, removed.kind, removed.value) == ("srv_carol", "email", "dan@example.com")
            carol = await s.accounts.dev_sign_in("carol@example.com")
            (bound,) = events(security, "owner_bound")
            assert bound.user_sub == carol.sub and bound.servers == 1
            await s.accounts.dev_sign_in("carol@example.com")  # nothing left to bind: no event
            assert len(events(security, "owner_bound")) == 1
            await s.servers.remove("srv_carol")
            (gone,) = events(security, "server_removed")
            assert gone.server_id == "srv_carol"
    main()
