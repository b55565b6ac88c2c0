"""ProxyGate (services/proxy/gate.py) in this process on a real SQLite file: the bearer token
is checked before the server is looked up, so requests without a valid token for random
server ids never reach storage and never grow the access policy's cache (issue 8)."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

import pytest

from services import build_services
from services.proxy.gate import Refused
from storage.base import User
from tests.support.inprocess import make_config, run

ALICE = User(sub="u-alice", email="alice@example.com", email_verified=True, name="Alice")
BOB = User(sub="u-bob", email="bob@example.com", email_verified=True, name="Bob")


@asynccontextmanager
async def world(tmp_path):
    services = build_services(make_config(tmp_path, MCPGW_UPSTREAM_ALLOW="127.0.0.0/8"))
    await services.start(background=False)
    try:
        for user in (ALICE, BOB):
            await services.storage.upsert_user(user)
        await services.servers.add(name="T", upstream_url="http://127.0.0.1:9/mcp", owner_email=ALICE.email,
                                   server_id="srv_t", owner_sub=ALICE.sub, internal_allowed=True)
        yield services
    finally:
        await services.stop()


def count_server_reads(services) -> list[str]:
    """Every server id the storage is asked for from now on."""
    asked: list[str] = []
    get_server = services.storage.get_server

    async def counting(server_id, *args, **kwargs):
        asked.append(server_id)
        return await get_server(server_id, *args, **kwargs)

    services.storage.get_server = counting
    return asked


def token(services, user: User, audience: str, scope: str = "mcp:connect mcp:invoke") -> str:
    return services.tokens.mint_access_token(user, "client-x", scope, audience, "fam-" + secrets.token_hex(4))


async def refusal(gate, authorization: str, server_id: str) -> Refused:
    with pytest.raises(Refused) as caught:
        await gate.admit(authorization, server_id)
    return caught.value


@run
async def test_unauthenticated_requests_for_random_servers_do_not_touch_the_server_cache(tmp_path):
    async with world(tmp_path) as s:
        base = s.config.base_resource
        other_server = token(s, ALICE, s.config.server_resource("srv_elsewhere"))
        foreign = token(s, ALICE, "https://other.example/mcp/")
        cache_before = len(s.access._cache)
        asked = count_server_reads(s)
        authorizations = ["", "Bearer", "Bearer   ", "Basic abc", "Bearer not-a-jwt",
                          "Bearer " + base, "Bearer " + other_server, "Bearer " + foreign]
        for i in range(500):
            server_id = "srv_" + secrets.token_hex(8)
            refused = await refusal(s.gate, authorizations[i % len(authorizations)], server_id)
            assert refused.status == 401, (refused.status, refused.body)
            assert refused.www_authenticate.startswith(
                f'Bearer resource_metadata="{s.config.public_url}/.well-known/oauth-protected-resource/mcp/{server_id}"'
            ), refused.www_authenticate
            assert refused.body["error"]["code"] == -32001
        assert asked == []
        assert len(s.access._cache) == cache_before


@run
async def test_a_valid_token_is_what_makes_the_gate_look_the_server_up(tmp_path):
    async with world(tmp_path) as s:
        asked = count_server_reads(s)
        alice = "Bearer " + token(s, ALICE, s.config.base_resource)
        missing = await refusal(s.gate, alice, "srv_nothing_here")
        assert missing.status == 404 and missing.body["error"] == "not_found" and not missing.jsonrpc
        assert missing.www_authenticate is None
        assert asked == ["srv_nothing_here"]
        call = await s.gate.admit(alice, "srv_t")
        assert call.server.server_id == "srv_t" and call.claims["sub"] == ALICE.sub and call.session is None
        denied = await refusal(s.gate, "Bearer " + token(s, BOB, s.config.base_resource), "srv_t")
        assert denied.status == 403 and denied.body["error"]["code"] == -32003
        assert denied.body["error"]["message"].startswith("access denied: ")
        # Scopes come after the sharing decision, as before.
        connect_only = await s.gate.admit("Bearer " + token(s, ALICE, s.config.base_resource, "mcp:connect"), "srv_t")
        with pytest.raises(Refused) as step_up:
            s.gate.require_invoke(connect_only)
        assert step_up.value.status == 403 and 'error="insufficient_scope"' in step_up.value.www_authenticate
