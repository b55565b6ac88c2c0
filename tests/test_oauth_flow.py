"""End to end: the MCP SDK's own OAuth client against a real gateway process that signs
users in at a real OIDC provider process (discovery → DCR → authorize → IdP → consent →
token → refresh)."""

from __future__ import annotations

import asyncio

import httpx
import httpx2
import jwt
import pytest

from tests.support.browser import BrowserError, ScriptedBrowser
from tests.support.mcp_oauth import make_oauth_rig, refresh_now

ALICE = {"sub": "alice-sub-1", "email": "alice@example.com", "email_verified": True, "name": "Alice"}


def verify_with_gateway_jwks(gateway, token: str) -> dict:
    jwks = httpx.get(gateway.url + "/jwks.json").json()
    header = jwt.get_unverified_header(token)
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    return jwt.decode(
        token, jwt.PyJWK(key).key, algorithms=["RS256"], issuer=gateway.url, options={"verify_aud": False}
    )


async def run_flow(gateway, server_id: str, who: dict, **rig_kwargs):
    async with ScriptedBrowser() as browser:
        rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=who, **rig_kwargs)
        async with httpx2.AsyncClient(auth=rig.provider, timeout=30) as http:
            response = await http.post(
                rig.server_url,
                json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                headers={"Accept": "application/json, text/event-stream"},
            )
        return rig, response


def test_sdk_client_gets_server_bound_token_and_refreshes(gateway):
    server_id = gateway.add_server("http://127.0.0.1:9/mcp", ALICE["email"])

    async def main():
        rig, response = await run_flow(gateway, server_id, ALICE)
        # The flow completed: the retried request carried a token the proxy accepted.
        assert response.status_code != 401
        tokens = rig.storage.tokens
        claims = verify_with_gateway_jwks(gateway, tokens.access_token)
        assert claims["sub"] == ALICE["sub"]
        assert claims["aud"] == f"{gateway.url}/mcp/{server_id}"
        assert claims["email"] == ALICE["email"]
        assert claims["client_id"] == rig.client_info.client_id
        assert set(claims["scope"].split()) == {"mcp:connect", "mcp:invoke"}
        assert claims["exp"] - claims["iat"] == 3600
        assert tokens.refresh_token
        # The consent page was shown once and approved; the redirect carried iss.
        assert rig.authorizer.results[-1]["iss"] == gateway.url

        old_refresh = tokens.refresh_token
        refreshed = await refresh_now(rig)
        assert refreshed.status_code == 200, refreshed.text
        assert refreshed.headers["cache-control"] == "no-store"
        assert rig.storage.tokens.refresh_token not in (None, old_refresh)
        new_claims = verify_with_gateway_jwks(gateway, rig.storage.tokens.access_token)
        assert new_claims["aud"] == claims["aud"] and new_claims["jti"] != claims["jti"]

    asyncio.run(main())


def assert_refused_page(error: BrowserError) -> None:
    """The walk ended on the friendly refusal page, whose link hands access_denied back."""
    page = error.page
    assert page.status == 403
    assert "have access to this server" in page.text
    assert "error=access_denied" in page.text


def test_user_without_access_is_refused_with_access_denied(gateway):
    server_id = gateway.add_server("http://127.0.0.1:9/mcp", "owner@example.com")

    async def main():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE)
            async with httpx2.AsyncClient(auth=rig.provider, timeout=30) as http:
                with pytest.raises(BrowserError) as caught:
                    await http.post(rig.server_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert rig.storage.tokens is None
        return caught.value

    assert_refused_page(asyncio.run(main()))


def test_domain_grant_uses_hd_claim_not_email_suffix(gateway):
    server_id = gateway.add_server("http://127.0.0.1:9/mcp", "owner@example.com")
    gateway.cli("grants", "add", server_id, "--domain", "corp.example")
    member = {"sub": "bob-1", "email": "bob@corp.example", "email_verified": True, "hd": "corp.example"}
    impostor = {"sub": "eve-1", "email": "eve@corp.example", "email_verified": True}

    async def main():
        rig, response = await run_flow(gateway, server_id, member)
        assert rig.storage.tokens is not None and response.status_code != 401
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=impostor)
            async with httpx2.AsyncClient(auth=rig.provider, timeout=30) as http:
                with pytest.raises(BrowserError) as caught:
                    await http.post(rig.server_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert rig.storage.tokens is None
        assert_refused_page(caught.value)

    asyncio.run(main())


def test_dev_sign_in_flow_of_make_run(tmp_path):
    """`make run` mode: no IdP, the local sign-in form; the SDK flow still ends in tokens."""
    from tests.support.gateway import GatewayProcess

    gateway = GatewayProcess(tmp_path / "dev").start()
    try:
        server_id = gateway.add_server("http://127.0.0.1:9/mcp", "dev@example.com")
        page = httpx.get(gateway.url + "/login")
        assert page.status_code == 200 and "Local development sign-in is ON" in page.text

        async def main():
            async with ScriptedBrowser() as browser:
                rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, email="dev@example.com")
                async with httpx2.AsyncClient(auth=rig.provider, timeout=30) as http:
                    response = await http.post(rig.server_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
                assert response.status_code != 401
                claims = verify_with_gateway_jwks(gateway, rig.storage.tokens.access_token)
                assert claims["email"] == "dev@example.com"
                assert claims["aud"] == f"{gateway.url}/mcp/{server_id}"

        asyncio.run(main())
    finally:
        gateway.stop()


def test_dev_sign_in_is_refused_off_loopback():
    from config import Config, ConfigError

    with pytest.raises(ConfigError, match="MCPGW_DEV_LOGIN"):
        Config.from_env({"MCPGW_DEV_LOGIN": "1", "MCPGW_LISTEN": "0.0.0.0:8080", "MCPGW_SECRET_KEY": "x" * 40})
