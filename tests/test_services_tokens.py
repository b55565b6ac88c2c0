"""Service-level rules of the authorization server on a real SqliteStorage file: codes,
refresh rotation (grace window, single flight, theft), revocation, access-token
verification, the key ring, client registration/authentication and redirect-URI policy.

Two "instances" are two Services on the same database file, each with its own
connection and caches, the way two gateway processes share SQLite."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import secrets
import sqlite3
import time
from contextlib import asynccontextmanager

import jwt
import pytest
from cryptography.exceptions import InvalidTag

from services import build_services
from services.authserver.claims import InvalidToken, parse_scope
from services.authserver.keys import SecretBox
from services.authserver.redirect_uris import check_redirect_uri, redirect_uri_matches
from services.authserver.tokens import GRACE
from services.common.errors import OAuthError
from storage.base import AuthCode, User
from tests.support.inprocess import make_config, run

REDIRECT = "http://127.0.0.1:9/callback"
ALICE = User(sub="u-alice", email="alice@example.com", email_verified=True, name="Alice")
BOB = User(sub="u-bob", email="bob@example.com", email_verified=True, name="Bob")






class WallClock:
    """The services' wall clock, moved by the test instead of waiting for an expiry."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def instance(tmp_path, now=time.time, **env):
    services = build_services(make_config(tmp_path, MCPGW_UPSTREAM_ALLOW="127.0.0.0/8", **env), now=now)
    await services.start(background=False)
    try:
        yield services
    finally:
        await services.stop()


@asynccontextmanager
async def world(tmp_path, now=time.time, **env):
    """One instance with Alice (owner of srv_t), Bob (no access) and a public client."""
    async with instance(tmp_path, now, **env) as s:
        for user in (ALICE, BOB):
            await s.storage.upsert_user(user)
        await s.servers.add(name="T", upstream_url="http://127.0.0.1:9/mcp", owner_email=ALICE.email,
                            server_id="srv_t", owner_sub=ALICE.sub, internal_allowed=True)
        s.client, _ = await s.clients.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
        yield s


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


async def issue(s, client=None, *, user=ALICE, scope="mcp:connect mcp:invoke", audience=None) -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    code = await s.tokens.issue_code(
        client_id=(client or s.client).client_id, redirect_uri=REDIRECT, code_challenge=s256(verifier),
        user_sub=user.sub, scope=scope, audience=audience or s.config.server_resource("srv_t"),
    )
    return code, verifier


async def tokens(s, client=None, **kwargs) -> dict:
    code, verifier = await issue(s, client, **kwargs)
    return await s.tokens.exchange_code(client or s.client, code, REDIRECT, verifier, None)


async def oauth_error(awaitable) -> str:
    with pytest.raises(OAuthError) as caught:
        await awaitable
    return caught.value.error


def sql(tmp_path, statement: str, *args) -> int:
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        return conn.execute(statement, args).rowcount


def token_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# ------------------------------------------------------------------------------ codes


@run
async def test_code_exchange_gives_a_token_bound_to_user_client_scope_and_audience(tmp_path):
    async with world(tmp_path) as s:
        body = await tokens(s, scope="mcp:connect")
        claims = await s.tokens.verify_access_token(body["access_token"])
        assert claims["iss"] == s.config.issuer
        assert claims["sub"] == ALICE.sub and claims["email"] == ALICE.email
        assert claims["aud"] == s.config.server_resource("srv_t")
        assert claims["client_id"] == s.client.client_id
        assert claims["scope"] == "mcp:connect" and body["scope"] == "mcp:connect"
        assert claims["exp"] - claims["iat"] == s.config.access_token_ttl
        assert body["refresh_token"] and body["token_type"] == "Bearer"


@run
async def test_expired_code_is_invalid_grant_and_issues_nothing(tmp_path):
    async with world(tmp_path) as s:
        verifier = secrets.token_urlsafe(48)
        code = secrets.token_urlsafe(32)
        await s.storage.put_code(AuthCode(
            code_hash=token_hash(code), client_id=s.client.client_id, redirect_uri=REDIRECT,
            code_challenge=s256(verifier), user_sub=ALICE.sub, scope="mcp:connect",
            audience=s.config.server_resource("srv_t"), expires_at=time.time() - 1, family_id="fam-expired",
        ))
        with pytest.raises(OAuthError) as caught:
            await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)
        assert caught.value.error == "invalid_grant" and "expired" in caught.value.description
        assert await s.storage.families_of_user(ALICE.sub) == []


@run
async def test_code_is_bound_to_client_redirect_uri_and_verifier(tmp_path):
    async with world(tmp_path) as s:
        other, _ = await s.clients.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
        code, verifier = await issue(s)
        assert await oauth_error(s.tokens.exchange_code(other, code, REDIRECT, verifier, None)) == "invalid_grant"
        code, verifier = await issue(s)
        assert await oauth_error(s.tokens.exchange_code(s.client, code, REDIRECT + "/", verifier, None)) == "invalid_grant"
        code, _ = await issue(s)
        wrong = secrets.token_urlsafe(48)
        assert await oauth_error(s.tokens.exchange_code(s.client, code, REDIRECT, wrong, None)) == "invalid_grant"
        # A malformed verifier is refused before the code is touched.
        code, verifier = await issue(s)
        assert await oauth_error(s.tokens.exchange_code(s.client, code, REDIRECT, "x" * 42, None)) == "invalid_request"
        assert (await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None))["refresh_token"]
        # Failed exchanges left no refresh family behind: only the last one made one.
        assert len(await s.storage.families_of_user(ALICE.sub)) == 1


@run
async def test_code_exchange_rechecks_access(tmp_path):
    async with world(tmp_path) as s:
        code, verifier = await issue(s, user=BOB)
        assert await oauth_error(s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)) == "invalid_grant"
        assert await s.storage.families_of_user(BOB.sub) == []


@run
async def test_replayed_code_revokes_what_it_issued_on_every_instance(tmp_path):
    async with world(tmp_path) as s, instance(tmp_path) as other:
        code, verifier = await issue(s)
        body = await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)
        await other.tokens.verify_access_token(body["access_token"])  # cached as valid there
        assert await oauth_error(s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)) == "invalid_grant"
        assert await oauth_error(s.tokens.refresh(s.client, body["refresh_token"], None, None)) == "invalid_grant"
        with pytest.raises(InvalidToken):
            await s.tokens.verify_access_token(body["access_token"])
        await other.tokens.refresh_revocations()  # what the background job does every few seconds
        with pytest.raises(InvalidToken):
            await other.tokens.verify_access_token(body["access_token"])


@run
async def test_replay_can_come_from_another_instance(tmp_path):
    async with world(tmp_path) as s, instance(tmp_path) as other:
        code, verifier = await issue(s)
        body = await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)
        assert await oauth_error(other.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)) == "invalid_grant"
        assert await oauth_error(s.tokens.refresh(s.client, body["refresh_token"], None, None)) == "invalid_grant"


@pytest.fixture(params=["sqlite", "dynamodb"])
def backend(request, tmp_path, monkeypatch) -> dict:
    """Config overrides for one store shared by the instances of a test, on each backend."""
    if request.param == "sqlite":
        return {}
    endpoint = request.getfixturevalue("dynamodb_endpoint")
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    table = f"gw-{secrets.token_hex(8)}"
    return {"MCPGW_STORAGE": f"dynamodb://{table}?region=us-east-1&endpoint={endpoint}"}


@pytest.mark.parametrize("replay_on", ["same", "other"])
@run
async def test_a_replay_racing_the_first_redemption_still_revokes_what_it_issued(tmp_path, backend, replay_on):
    """The replay lands after the winner marked the code used but before it wrote the
    refresh family, so the replay's revoke_family finds no row: the family the winner
    then writes is revoked all the same (one 200, dead on arrival), on every instance."""
    async with world(tmp_path, **backend) as s, instance(tmp_path, **backend) as other:
        replayer = s if replay_on == "same" else other
        code, verifier = await issue(s)
        create_family = s.storage.create_family
        replays = []

        async def create_after_a_replay(family, first):
            assert await s.storage.get_family(family.family_id) is None
            replays.append(await oauth_error(replayer.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)))
            await create_family(family, first)

        s.storage.create_family = create_after_a_replay
        body = await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)
        assert replays == ["invalid_grant"]
        (family,) = await s.storage.families_of_user(ALICE.sub)
        assert family.revoked_at, "the family of a replayed code is live"
        for each in (s, other):
            assert await oauth_error(each.tokens.refresh(s.client, body["refresh_token"], None, None)) == "invalid_grant"
            await each.tokens.refresh_revocations()
            with pytest.raises(InvalidToken):
                await each.tokens.verify_access_token(body["access_token"])


@run
async def test_a_replay_after_the_first_redemption_revokes_on_both_backends(tmp_path, backend):
    async with world(tmp_path, **backend) as s, instance(tmp_path, **backend) as other:
        code, verifier = await issue(s)
        body = await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)
        assert await oauth_error(other.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)) == "invalid_grant"
        assert await oauth_error(s.tokens.refresh(s.client, body["refresh_token"], None, None)) == "invalid_grant"
        assert (await s.storage.families_of_user(ALICE.sub))[0].revoked_at


# --------------------------------------------------------------------- refresh tokens


@run
async def test_refresh_rotates_and_a_retry_within_grace_returns_the_same_successor(tmp_path):
    async with world(tmp_path) as s:
        rt0 = (await tokens(s))["refresh_token"]
        first = await s.tokens.refresh(s.client, rt0, None, None)
        retry = await s.tokens.refresh(s.client, rt0, None, None)
        assert first["refresh_token"] != rt0
        assert retry["refresh_token"] == first["refresh_token"]
        assert retry["access_token"] != first["access_token"]  # a fresh access token each time
        # The successor is stored hashed; the grace copy only as ciphertext.
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("gateway.db*"))
        assert first["refresh_token"].encode() not in stored and rt0.encode() not in stored
        assert token_hash(first["refresh_token"]).encode() in stored


@run
async def test_reuse_after_the_grace_window_is_theft_and_revokes_the_family(tmp_path):
    async with world(tmp_path) as s:
        rt0 = (await tokens(s))["refresh_token"]
        rotated = await s.tokens.refresh(s.client, rt0, None, None)
        # The rotation happened longer ago than the grace window.
        assert sql(tmp_path, "UPDATE refresh_tokens SET used_at = used_at - ? WHERE token_hash = ?",
                   GRACE + 1, token_hash(rt0)) == 1
        assert await oauth_error(s.tokens.refresh(s.client, rt0, None, None)) == "invalid_grant"
        assert await oauth_error(s.tokens.refresh(s.client, rotated["refresh_token"], None, None)) == "invalid_grant"
        with pytest.raises(InvalidToken):
            await s.tokens.verify_access_token(rotated["access_token"])
        (family,) = await s.storage.families_of_user(ALICE.sub)
        assert family.revoked_at > 0


@run
async def test_reuse_after_the_successor_was_used_revokes_the_family(tmp_path):
    async with world(tmp_path) as s:
        rt0 = (await tokens(s))["refresh_token"]
        rt1 = (await s.tokens.refresh(s.client, rt0, None, None))["refresh_token"]
        rt2 = (await s.tokens.refresh(s.client, rt1, None, None))["refresh_token"]
        assert await oauth_error(s.tokens.refresh(s.client, rt0, None, None)) == "invalid_grant"
        assert await oauth_error(s.tokens.refresh(s.client, rt2, None, None)) == "invalid_grant"


@run
async def test_concurrent_refreshes_in_one_instance_share_one_successor(tmp_path):
    async with world(tmp_path) as s:
        rt0 = (await tokens(s))["refresh_token"]
        results = await asyncio.gather(*(s.tokens.refresh(s.client, rt0, None, None) for _ in range(4)))
        assert len({r["refresh_token"] for r in results}) == 1
        assert await s.tokens.refresh(s.client, results[0]["refresh_token"], None, None)


@run
async def test_concurrent_refreshes_across_instances_share_one_successor(tmp_path):
    async with world(tmp_path) as s, instance(tmp_path) as other:
        rt0 = (await tokens(s))["refresh_token"]
        client = s.client
        results = await asyncio.gather(
            *(svc.tokens.refresh(client, rt0, None, None) for svc in (s, other, s, other, other, s))
        )
        assert len({r["refresh_token"] for r in results}) == 1


@run
async def test_single_flight_never_hands_a_result_to_another_client(tmp_path):
    async with world(tmp_path) as s:
        thief, _ = await s.clients.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
        rt0 = (await tokens(s))["refresh_token"]
        mine, theirs = await asyncio.gather(
            s.tokens.refresh(s.client, rt0, None, None),
            s.tokens.refresh(thief, rt0, None, None),
            return_exceptions=True,
        )
        assert isinstance(mine, dict) and mine["refresh_token"]
        assert isinstance(theirs, OAuthError) and theirs.error == "invalid_grant"


@run
async def test_refresh_scope_only_narrows(tmp_path):
    async with world(tmp_path) as s:
        rt0 = (await tokens(s))["refresh_token"]
        narrowed = await s.tokens.refresh(s.client, rt0, "mcp:connect", None)
        assert narrowed["scope"] == "mcp:connect"
        assert (await s.tokens.verify_access_token(narrowed["access_token"]))["scope"] == "mcp:connect"
        # The grant itself keeps its scope: the next refresh may ask for all of it again.
        full = await s.tokens.refresh(s.client, narrowed["refresh_token"], "mcp:connect mcp:invoke", None)
        assert full["scope"] == "mcp:connect mcp:invoke"
        narrow_rt = (await tokens(s, scope="mcp:connect"))["refresh_token"]
        assert await oauth_error(s.tokens.refresh(s.client, narrow_rt, "mcp:connect mcp:invoke", None)) == "invalid_scope"
        # Narrowing to no MCP scope at all would mint a token no MCP request accepts.
        offline_rt = (await tokens(s, scope="mcp:connect offline_access"))["refresh_token"]
        assert await oauth_error(s.tokens.refresh(s.client, offline_rt, "offline_access", None)) == "invalid_scope"
        # The refused request did not use the token up.
        assert (await s.tokens.refresh(s.client, offline_rt, None, None))["scope"] == "mcp:connect offline_access"


@run
async def test_refresh_rechecks_sharing_rules(tmp_path):
    async with world(tmp_path) as s:
        await s.servers.add_grant("srv_t", "email", BOB.email)
        rt = (await tokens(s, user=BOB))["refresh_token"]
        rt = (await s.tokens.refresh(s.client, rt, None, None))["refresh_token"]
        await s.servers.remove_grant("srv_t", "email", BOB.email)
        assert await oauth_error(s.tokens.refresh(s.client, rt, None, None)) == "invalid_grant"


@run
async def test_refresh_with_a_resource_may_name_the_same_audience_only(tmp_path):
    async with world(tmp_path) as s:
        await s.servers.add(name="U", upstream_url="http://127.0.0.1:9/mcp", owner_email=ALICE.email,
                            server_id="srv_u", owner_sub=ALICE.sub, internal_allowed=True)
        rt = (await tokens(s))["refresh_token"]
        other = s.config.server_resource("srv_u")
        assert await oauth_error(s.tokens.refresh(s.client, rt, None, other)) == "invalid_target"
        same = await s.tokens.refresh(s.client, rt, None, s.config.server_resource("srv_t"))
        assert (await s.tokens.verify_access_token(same["access_token"]))["aud"] == s.config.server_resource("srv_t")
        # A base-resource grant may be narrowed to one server.
        base_rt = (await tokens(s, audience=s.config.base_resource))["refresh_token"]
        narrowed = await s.tokens.refresh(s.client, base_rt, None, other)
        assert (await s.tokens.verify_access_token(narrowed["access_token"]))["aud"] == other


# ------------------------------------------------------------------------- revocation


@run
async def test_revoking_an_access_token_applies_here_at_once_and_elsewhere_after_a_refresh(tmp_path):
    async with world(tmp_path) as s, instance(tmp_path) as other:
        body = await tokens(s)
        await other.tokens.verify_access_token(body["access_token"])
        await s.tokens.revoke(s.client, body["access_token"], "access_token")
        with pytest.raises(InvalidToken):
            await s.tokens.verify_access_token(body["access_token"])
        await other.tokens.refresh_revocations()
        with pytest.raises(InvalidToken):
            await other.tokens.verify_access_token(body["access_token"])
        # Only that token: its refresh token still works.
        assert await s.tokens.refresh(s.client, body["refresh_token"], None, None)


@run
async def test_revocation_by_another_client_is_ignored(tmp_path):
    async with world(tmp_path) as s:
        other, _ = await s.clients.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
        body = await tokens(s)
        await s.tokens.revoke(other, body["access_token"], None)
        await s.tokens.revoke(other, body["refresh_token"], None)
        await s.tokens.verify_access_token(body["access_token"])
        assert await s.tokens.refresh(s.client, body["refresh_token"], None, None)


@run
async def test_revoking_a_refresh_token_ignores_a_wrong_hint(tmp_path):
    async with world(tmp_path) as s:
        body = await tokens(s)
        await s.tokens.revoke(s.client, body["refresh_token"], "access_token")
        assert await oauth_error(s.tokens.refresh(s.client, body["refresh_token"], None, None)) == "invalid_grant"
        with pytest.raises(InvalidToken):
            await s.tokens.verify_access_token(body["access_token"])


# ------------------------------------------------------------ access-token verification


def base_claims(s, **changes) -> dict:
    now = int(time.time())
    claims = {"iss": s.config.issuer, "sub": ALICE.sub, "aud": s.config.base_resource, "scope": "mcp:connect",
              "client_id": "c", "iat": now, "exp": now + 600, "jti": secrets.token_urlsafe(8)}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@run
async def test_verify_refuses_expired_foreign_and_malformed_tokens(tmp_path):
    async with world(tmp_path) as s:
        good = s.keyring.sign(base_claims(s))
        assert (await s.tokens.verify_access_token(good))["sub"] == ALICE.sub
        for typ in ("AT+JWT", "application/at+jwt"):
            await s.tokens.verify_access_token(s.keyring.sign(base_claims(s), typ=typ))
        now = int(time.time())
        refused = [
            s.keyring.sign(base_claims(s, iat=now - 700, exp=now - 100)),  # expired
            s.keyring.sign(base_claims(s, iss="https://other-issuer.example")),
            s.keyring.sign(base_claims(s, jti=None)),
            s.keyring.sign(base_claims(s, sub=None)),
            s.keyring.sign(base_claims(s, aud=["a", "b"])),
            s.keyring.sign(base_claims(s), typ="JWT"),  # an identity assertion, not an access token
            s.keyring.sign(base_claims(s, exp=str(now + 600))),
            s.keyring.sign(base_claims(s, iat=str(now))),
            s.keyring.sign(base_claims(s, scope=["mcp:connect"])),
            s.keyring.sign(base_claims(s, fid=5)),
            s.keyring.sign(base_claims(s, email=["alice@example.com"])),
            s.keyring.sign(base_claims(s, hd=5)),
            jwt.encode(base_claims(s), key=None, algorithm="none", headers={"kid": s.keyring.records()[0].kid}),
            jwt.encode(base_claims(s), "k" * 32, algorithm="HS256", headers={"kid": s.keyring.records()[0].kid}),
            "a.b.c",
            "",
        ]
        for token in refused:
            with pytest.raises(InvalidToken):
                await s.tokens.verify_access_token(token)


@run
async def test_a_verified_token_stops_verifying_when_it_expires(tmp_path):
    clock = WallClock()
    async with world(tmp_path, clock) as s:
        expires = math.ceil(clock.now + 600)
        token = s.keyring.sign(base_claims(s, exp=expires))
        await s.tokens.verify_access_token(token)  # now in the verified-token cache
        clock.now = expires - 0.001
        assert (await s.tokens.verify_access_token(token))["exp"] == expires
        clock.now = expires
        with pytest.raises(InvalidToken, match="expired"):
            await s.tokens.verify_access_token(token)
        clock.now = expires - 1  # once dropped from the cache, it is verified afresh
        assert (await s.tokens.verify_access_token(token))["exp"] == expires


@run
async def test_issued_at_a_little_ahead_of_this_clock_verifies_far_ahead_does_not(tmp_path):
    """Another instance's clock a few seconds ahead (or the same second, before this clock
    ticks) must not make its tokens "not valid yet" here; a minute and more still does."""
    clock = WallClock()
    async with world(tmp_path, clock) as s:
        now = int(clock.now)
        ahead = s.keyring.sign(base_claims(s, iat=now + 30, nbf=now + 30, exp=now + 600))
        assert (await s.tokens.verify_access_token(ahead))["iat"] == now + 30
        for claim in ("iat", "nbf"):
            early = s.keyring.sign(base_claims(s, **{claim: now + 120}, exp=now + 600))
            with pytest.raises(InvalidToken, match="not valid yet"):
                await s.tokens.verify_access_token(early)


@run
async def test_code_expiry_and_token_lifetimes_follow_the_services_clock(tmp_path):
    clock = WallClock()
    clock.now += 10 * 86400  # a clock far from the real one: every time comes from it
    async with world(tmp_path, clock) as s:
        code, verifier = await issue(s)
        body = await s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)
        claims = await s.tokens.verify_access_token(body["access_token"])
        assert claims["iat"] == int(clock.now)
        assert claims["exp"] == int(clock.now) + s.config.access_token_ttl
        (family,) = await s.storage.families_of_user(ALICE.sub)
        assert family.created_at == clock.now
        code, verifier = await issue(s)
        clock.now += 61  # codes live 60 s
        assert await oauth_error(s.tokens.exchange_code(s.client, code, REDIRECT, verifier, None)) == "invalid_grant"


# ---------------------------------------------------------------------------- keys


@run
async def test_key_rotation_keeps_old_tokens_and_signs_with_the_new_kid(tmp_path):
    async with world(tmp_path) as s, instance(tmp_path) as other:
        old_token = s.keyring.sign(base_claims(s))
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        new = await s.keyring.rotate()
        new_token = s.keyring.sign(base_claims(s))
        assert jwt.get_unverified_header(new_token)["kid"] == new.kid != old_kid
        assert {k["kid"] for k in s.keyring.jwks()["keys"]} == {old_kid, new.kid}
        await s.tokens.verify_access_token(old_token)
        # An instance that loaded before the rotation learns the new kid on first sight.
        await other.tokens.verify_access_token(new_token)
        await other.tokens.verify_access_token(old_token)
        statuses = {k.kid: k.status for k in await s.storage.list_signing_keys()}
        assert statuses == {old_kid: "retiring", new.kid: "active"}


@run
async def test_a_retired_key_leaves_the_jwks_and_its_tokens_stop_verifying(tmp_path):
    async with instance(tmp_path) as s:
        old_token = s.keyring.sign(base_claims(s))
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        await s.keyring.rotate()
        sql(tmp_path, "UPDATE signing_keys SET retire_at = ? WHERE kid = ?", time.time() - 1, old_kid)
    async with instance(tmp_path) as s:  # a later start sees the key past its retirement
        assert old_kid not in {k["kid"] for k in s.keyring.jwks()["keys"]}
        with pytest.raises(InvalidToken):
            await s.tokens.verify_access_token(old_token)


def counting_key_reads(services) -> list[float]:
    """Every read of the signing-key set by this instance's storage, as it happens."""
    reads: list[float] = []
    original = services.storage.list_signing_keys

    async def counted():
        reads.append(time.monotonic())
        return await original()

    services.storage.list_signing_keys = counted
    return reads


def with_kid(s, kid: str) -> str:
    """A token signed by the active key whose header names `kid`."""
    return jwt.encode(base_claims(s), s.keyring._active.private_key, algorithm="RS256",
                      headers={"kid": kid, "typ": "at+jwt"})


@run
async def test_made_up_kids_do_not_delay_a_rotation_made_elsewhere(tmp_path):
    """Someone sends tokens with unknown kids of the gateway's own format all the time:
    the instance still learns a kid rotated in on another instance on first sight."""
    async with world(tmp_path) as s, instance(tmp_path) as other:
        for _ in range(3):
            with pytest.raises(InvalidToken):
                await other.tokens.verify_access_token(with_kid(s, secrets.token_urlsafe(12)))
        await s.keyring.rotate()
        await other.tokens.verify_access_token(s.keyring.sign(base_claims(s)))


@run
async def test_kids_not_of_the_gateways_format_never_reach_storage(tmp_path):
    async with world(tmp_path) as s:
        reads = counting_key_reads(s)
        for kid in ("unknown-kid", "", "../../etc/passwd", "k" * 4000, "a" * 15, "a" * 17, "a+b/c=d" * 2 + "xx"):
            with pytest.raises(InvalidToken):
                await s.tokens.verify_access_token(with_kid(s, kid))
        assert reads == []


@run
async def test_an_unknown_kid_is_looked_up_once_and_a_flood_of_them_shares_spaced_reads(tmp_path):
    async with world(tmp_path) as s:
        reads = counting_key_reads(s)
        repeated = with_kid(s, secrets.token_urlsafe(12))
        for _ in range(5):
            with pytest.raises(InvalidToken):
                await s.tokens.verify_access_token(repeated)
        assert len(reads) == 1  # the miss is remembered for this kid
        reads.clear()
        started = time.monotonic()
        flood = [s.tokens.verify_access_token(with_kid(s, secrets.token_urlsafe(12))) for _ in range(50)]
        results = await asyncio.gather(*flood, return_exceptions=True)
        assert all(isinstance(r, InvalidToken) for r in results)
        assert 1 <= len(reads) <= 3, reads  # shared: not one read per made-up kid
        assert all(b - a >= 0.45 for a, b in zip(reads, reads[1:], strict=False)), reads
        assert time.monotonic() - started < 3
        assert (await s.tokens.verify_access_token(s.keyring.sign(base_claims(s))))["sub"] == ALICE.sub


@run
async def test_racing_first_starts_create_exactly_one_active_key(tmp_path):
    configs = [make_config(tmp_path) for _ in range(4)]
    services = [build_services(c) for c in configs]
    await asyncio.gather(*(svc.start(background=False) for svc in services))
    try:
        keys = await services[0].storage.list_signing_keys()
        assert len([k for k in keys if k.status == "active"]) == 1
        kids = {jwt.get_unverified_header(svc.keyring.sign(base_claims(svc)))["kid"] for svc in services}
        assert kids == {keys[0].kid}
    finally:
        await asyncio.gather(*(svc.stop() for svc in services))


def test_secret_box_binds_ciphertext_to_its_context():
    box = SecretBox(b"m" * 40)
    sealed = box.seal(b"refresh token", "refresh:abc")
    assert box.open(sealed, "refresh:abc") == b"refresh token"
    with pytest.raises(InvalidTag):
        box.open(sealed, "refresh:other")
    with pytest.raises(InvalidTag):
        SecretBox(b"n" * 40).open(sealed, "refresh:abc")
    assert b"refresh token" not in sealed.encode()


# ------------------------------------------------------------------------- clients


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


@run
async def test_confidential_client_secret_is_hashed_and_authenticates_by_basic_or_post(tmp_path):
    async with instance(tmp_path) as s:
        client, secret = await s.clients.register({"redirect_uris": ["https://app.example/cb"]})
        assert client.token_endpoint_auth_method == "client_secret_basic"
        stored = await s.storage.get_client(client.client_id)
        assert stored.secret_hash and stored.secret_hash != secret and secret not in repr(stored)
        assert (await s.clients.authenticate(None, None, basic(client.client_id, secret))).client_id == client.client_id
        assert (await s.clients.authenticate(client.client_id, secret, None)).client_id == client.client_id
        refusals = [
            (client.client_id, "wrong", None, "invalid_client"),
            (client.client_id, None, None, "invalid_client"),
            (None, None, basic(client.client_id, "wrong"), "invalid_client"),
            (None, None, "Basic !!!not-base64", "invalid_client"),
            ("mcp_unknown", None, None, "invalid_client"),
            (None, None, None, "invalid_client"),
            ("someone-else", None, basic(client.client_id, secret), "invalid_request"),
            (None, secret, basic(client.client_id, secret), "invalid_request"),
        ]
        for form_id, form_secret, header, error in refusals:
            with pytest.raises(OAuthError) as caught:
                await s.clients.authenticate(form_id, form_secret, header)
            assert caught.value.error == error, (form_id, form_secret, header)
            assert caught.value.status == (401 if error == "invalid_client" else 400)


@run
async def test_public_client_must_not_send_a_secret(tmp_path):
    async with instance(tmp_path) as s:
        client, secret = await s.clients.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
        assert secret is None
        assert (await s.clients.authenticate(client.client_id, None, None)).client_id == client.client_id
        with pytest.raises(OAuthError) as caught:
            await s.clients.authenticate(client.client_id, "invented", None)
        assert caught.value.error == "invalid_client" and caught.value.status == 401


@pytest.mark.parametrize("registered, requested, matches", [
    ((REDIRECT,), REDIRECT, True),
    (("http://127.0.0.1:9/callback",), "http://127.0.0.1:61000/callback", True),
    (("http://127.0.0.1/callback",), "http://127.0.0.1:61000/callback", True),  # port-less registration
    (("http://[::1]:80/cb",), "http://[::1]:5000/cb", True),
    (("http://localhost:3000/cb",), "http://localhost:4000/cb", True),
    (("http://localhost:3000/cb",), "http://127.0.0.1:3000/cb", False),  # another host
    ((REDIRECT,), REDIRECT + "/", False),
    ((REDIRECT,), "http://127.0.0.1:9/callback?x=1", False),
    ((REDIRECT,), REDIRECT + "#frag", False),
    ((REDIRECT,), "http://user@127.0.0.1:9/callback", False),
    ((REDIRECT,), "http://127.0.0.1:99999/callback", False),
    ((REDIRECT,), "http://[::1/callback", False),
    (("https://app.example/cb",), "https://app.example:8443/cb", False),  # only loopback ignores the port
    (("https://app.example/cb",), "https://APP.example/cb", False),
    (("cursor://anysphere.cursor-mcp/oauth/callback",), "cursor://anysphere.cursor-mcp/oauth/callback", True),
])
def test_redirect_uri_matching(registered, requested, matches):
    assert redirect_uri_matches(registered, requested) is matches


@pytest.mark.parametrize("uri", [
    "javascript:alert(1)", "data:,x", "file:///etc/passwd", "vbscript:x", "about:blank", "blob:https://a.example/x",
    "http://example.com/cb", "https://a.example/cb#f", "http://[::1/cb", "https://a.example:70000/cb",
    "https://u@a.example/cb", "no-scheme", 42, None, "x" * 2001,
])
def test_check_redirect_uri_refuses(uri):
    with pytest.raises(OAuthError) as caught:
        check_redirect_uri(uri)
    assert caught.value.error == "invalid_redirect_uri"


# ------------------------------------------------------------------ scopes, audiences


@pytest.mark.parametrize("requested, granted", [
    (None, "mcp:connect mcp:invoke"),
    ("", "mcp:connect mcp:invoke"),
    ("offline_access", "mcp:connect mcp:invoke offline_access"),
    ("mcp:invoke mcp:connect", "mcp:connect mcp:invoke"),
    ("mcp:connect something-else", "mcp:connect"),
])
def test_parse_scope(requested, granted):
    assert parse_scope(requested) == granted


def test_parse_scope_refuses_forbidden_characters():
    with pytest.raises(OAuthError) as caught:
        parse_scope('mcp:connect "x')
    assert caught.value.error == "invalid_scope"


@run
async def test_resolve_audience(tmp_path):
    async with world(tmp_path) as s:
        base, server = s.config.base_resource, s.config.server_resource("srv_t")
        upper = s.config.public_url.replace("http://", "HTTP://")
        for resource, expected in [(None, base), ("", base), (base, base), (base.rstrip("/"), base),
                                   (server, server), (server + "/", server), (upper + "/mcp/srv_t", server)]:
            assert (await s.tokens.resolve_audience(resource)).value == expected, resource
        for resource in (s.config.public_url + "/mcp/srv_none", server + "?x=1", server + "#f",
                         "https://elsewhere.example/mcp/srv_t", s.config.public_url + "/mcp/srv_t/extra",
                         "http://[::1/mcp/", "not a url"):
            assert await oauth_error(s.tokens.resolve_audience(resource)) == "invalid_target", resource
