"""Connected accounts in the browser (issue 11), with real processes on loopback: a gateway
(tests/support/gateway.py, dev sign-in) whose server has upstream_auth=oauth, the real OAuth
upstream (tests/support/oauth_upstream.py: an AS process and an SDK MCP resource server), the
SDK's OAuth client and a scripted browser. The sign-in trip detours through the upstream's sign-in
before the MCP client gets its code; connect, callback, Connections and Disconnect."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from tests.support.browser import Page, ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import run
from tests.support.mcp_oauth import DEFAULT_REDIRECT_URI, connect, make_oauth_rig
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.tokens import pkce
from tests.support.upstream_accounts import (  # noqa: F401 (fixtures)
    ALICE_AT_UPSTREAM,
    OWNER,
    credential,
    gateway,
    owners_trip,
    sign_in,
    to_callback,
    token_requests,
    upstream,
    upstream_user,
)


@pytest.fixture
def server_id(gateway: GatewayProcess, upstream: OAuthUpstream) -> str:
    return gateway.add_server(upstream.mcp_url, OWNER, "Upstream with accounts", "--upstream-auth", "oauth")


# ------------------------------------------------------------------ helpers


async def connection_status(browser: ScriptedBrowser, gateway: GatewayProcess, server_id: str) -> str:
    page = await browser.follow(f"{gateway.url}/dashboard/connections")
    assert page.status == 200, page.text
    marker = f'data-server-id="{server_id}" data-status="'
    assert marker in page.text, page.text
    return page.text.split(marker, 1)[1].split('"', 1)[0]


def code_exchanges(upstream: OAuthUpstream, subject: str) -> int:
    return token_requests(upstream, "authorization_code", subject)


async def register_client(gateway: GatewayProcess) -> str:
    async with httpx.AsyncClient(trust_env=False) as http:
        answer = await http.post(f"{gateway.url}/register", json={
            "redirect_uris": [DEFAULT_REDIRECT_URI], "client_name": "Test app",
            "token_endpoint_auth_method": "none"})
    assert answer.status_code == 201, answer.text
    return answer.json()["client_id"]


def authorize_url(gateway: GatewayProcess, client_id: str, server_id: str, challenge: str) -> str:
    return f"{gateway.url}/authorize?" + urlencode({
        "response_type": "code", "client_id": client_id, "redirect_uri": DEFAULT_REDIRECT_URI,
        "state": "client-state", "code_challenge": challenge, "code_challenge_method": "S256",
        "scope": "mcp:connect mcp:invoke", "resource": f"{gateway.url}/mcp/{server_id}"})


async def to_consent(browser: ScriptedBrowser, gateway: GatewayProcess, server_id: str, email: str) -> Page:
    """A registered client's /authorize, signed in as `email`, up to the consent page."""
    _, challenge = pkce()
    page = await browser.follow(authorize_url(gateway, await register_client(gateway), server_id, challenge))
    if page.forms and any(form.has_input("email") for form in page.forms):
        page = await browser.submit(page, "email", {"email": email})
    assert page.status == 200 and "decision" in page.text, page.text
    return page


# ------------------------------------------------------------- the sign-in trip


def test_the_sdk_clients_sign_in_goes_through_the_upstream_sign_in_before_it_gets_its_code(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            await upstream_user(browser, upstream, ALICE_AT_UPSTREAM)
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, email=OWNER)
            try:
                async with connect(rig) as client:
                    # Reached only once the proxy injects the upstream token (wired separately).
                    result = await client.call_tool("whoami", {})
                    assert result.content[0].text == ALICE_AT_UPSTREAM  # type: ignore[union-attr]
            except Exception:
                if rig.tokens is None:
                    raise
            # The client got its code, and only after the upstream trip came back to the gateway.
            assert rig.tokens is not None and rig.tokens.access_token
            assert "code" in rig.authorizer.results[0]
            visited = [url for _, url, _ in browser.history]
            consent = max(i for i, url in enumerate(visited) if url.startswith(f"{gateway.url}/authorize/consent"))
            at_as = next(i for i, url in enumerate(visited) if url.startswith(f"{upstream.issuer}/authorize?"))
            back = next(i for i, url in enumerate(visited) if url.startswith(f"{gateway.url}/oauth/upstream/callback?"))
            resumed = next(i for i, url in enumerate(visited) if url.startswith(f"{gateway.url}/authorize/continue?"))
            assert consent < at_as < back < resumed
            # The account is stored for this user and is the upstream identity that signed in.
            assert await credential(gateway, OWNER, server_id) is not None
            assert code_exchanges(upstream, ALICE_AT_UPSTREAM) == 1
            assert await connection_status(browser, gateway, server_id) == "connected"

    scenario()


def test_the_consent_page_says_where_the_account_is_connected_and_a_connected_user_has_no_detour(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            await upstream_user(browser, upstream, ALICE_AT_UPSTREAM)
            page = await to_consent(browser, gateway, server_id, OWNER)
            assert 'data-testid="consent-connect"' in page.text
            assert urlsplit(upstream.issuer).netloc in page.text  # the AS's host
            result = await browser.submit(page, "req", button=("decision", "approve"), stop_at=DEFAULT_REDIRECT_URI)
            assert "code" in result.redirect_query and result.redirect_query["state"] == "client-state"
            assert await credential(gateway, OWNER, server_id) is not None

            # Connected now: the next authorization shows no detour and goes straight back.
            page = await to_consent(browser, gateway, server_id, OWNER)
            assert 'data-testid="consent-connect"' not in page.text
            before = code_exchanges(upstream, ALICE_AT_UPSTREAM)
            result = await browser.submit(page, "req", button=("decision", "approve"), stop_at=DEFAULT_REDIRECT_URI)
            assert "code" in result.redirect_query
            assert not any(url.startswith(upstream.issuer) for _, url, _ in browser.history[-3:])
            assert code_exchanges(upstream, ALICE_AT_UPSTREAM) == before

    scenario()


def test_the_held_authorization_is_single_use_and_bound_to_the_browser_session(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser, ScriptedBrowser() as other:
            await upstream_user(browser, upstream, ALICE_AT_UPSTREAM)
            page = await to_consent(browser, gateway, server_id, OWNER)
            stopped = await browser.submit(page, "req", button=("decision", "approve"),
                                           stop_at=f"{gateway.url}/authorize/continue")
            resume = stopped.stopped_at
            assert resume
            # Another browser session of the same person cannot take the code.
            await sign_in(other, gateway, OWNER)
            refused = await other.follow(resume)
            assert refused.status == 403 and "another browser" in refused.text.lower()
            assert refused.location is None
            # This browser can, once.
            done = await browser.follow(resume, stop_at=DEFAULT_REDIRECT_URI)
            assert "code" in done.redirect_query
            again = await browser.follow(resume)
            assert again.status == 400 and "expired" in again.text

    scenario()


# --------------------------------------------------------- connect and callback


def test_connect_is_a_post_form_and_the_callback_stores_the_account(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            await sign_in(browser, gateway, OWNER)
            await upstream_user(browser, upstream, ALICE_AT_UPSTREAM)
            assert await connection_status(browser, gateway, server_id) == "not_connected"
            # A POST without the XSRF token starts nothing.
            forged = await browser.request("POST", f"{gateway.url}/oauth/upstream/connect/{server_id}",
                                           data=[("return_to", "/dashboard")])
            assert forged.status == 403 and forged.location is None
            callback = await to_callback(browser, gateway, server_id)
            page = await browser.follow(callback)
            assert page.status == 200 and "Your account is connected" in page.text
            assert 'data-status="connected"' in page.text
            assert await credential(gateway, OWNER, server_id) is not None

    scenario()


def test_a_tampered_or_reused_state_gets_a_clear_page_and_stores_nothing(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            callback = await owners_trip(browser, gateway, server_id, upstream)
            query = dict(parse_qsl(urlsplit(callback).query))
            tampered = f"{gateway.url}/oauth/upstream/callback?" + urlencode({**query, "state": query["state"] + "x"})
            page = await browser.follow(tampered)
            assert page.status == 400 and page.is_html and "start again" in page.text
            assert await credential(gateway, OWNER, server_id) is None
            no_state = await browser.follow(f"{gateway.url}/oauth/upstream/callback?code=abc")
            assert no_state.status == 400 and await credential(gateway, OWNER, server_id) is None

            assert (await browser.follow(callback)).status == 200  # the real one still works, once
            stored = await credential(gateway, OWNER, server_id)
            assert stored is not None
            reused = await browser.follow(callback)
            assert reused.status == 400 and "start again" in reused.text
            assert await credential(gateway, OWNER, server_id) == stored  # unchanged

    scenario()


def test_an_error_from_the_upstream_authorization_server_is_a_clear_page(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            callback = await owners_trip(browser, gateway, server_id, upstream)
            state = dict(parse_qsl(urlsplit(callback).query))["state"]
            denied = f"{gateway.url}/oauth/upstream/callback?" + urlencode({"state": state, "error": "access_denied"})
            page = await browser.follow(denied)
            assert page.status == 400 and "did not authorize" in page.text and "access_denied" in page.text
            assert await credential(gateway, OWNER, server_id) is None

    scenario()


def test_a_callback_in_another_browser_or_without_a_sign_in_is_refused(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser, ScriptedBrowser() as other, ScriptedBrowser() as stranger:
            callback = await owners_trip(browser, gateway, server_id, upstream)
            await sign_in(other, gateway, OWNER)  # the same person, another browser session
            refused = await other.follow(callback)
            assert refused.status == 400 and "another browser" in refused.text
            anonymous = await stranger.follow(callback)
            assert anonymous.status == 400 and "not signed in" in anonymous.text
            assert await credential(gateway, OWNER, server_id) is None
            # Neither used the state up: the browser that started the trip finishes it.
            assert (await browser.follow(callback)).status == 200
            assert await credential(gateway, OWNER, server_id) is not None

    scenario()


def test_connect_asks_for_a_sign_in_and_someone_the_server_is_not_shared_with_cannot_connect(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            # The link a client shows (PUBLIC_URL/oauth/upstream/connect/ID) asks for a sign-in first.
            first = await browser.follow(f"{gateway.url}/oauth/upstream/connect/{server_id}")
            assert first.status == 200 and urlsplit(first.url).path == "/login"
            assert any(form.has_input("email") for form in first.forms)
            await sign_in(browser, gateway, "bob@example.com")
            page = await browser.follow(f"{gateway.url}/oauth/upstream/connect/{server_id}")
            assert page.status == 404 and page.is_html
            connections = await browser.follow(f"{gateway.url}/dashboard/connections")
            assert 'data-testid="no-connections"' in connections.text and server_id not in connections.text

    scenario()


def test_disconnect_forgets_the_account_and_revokes_it_at_the_upstream(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            await sign_in(browser, gateway, OWNER)
            await upstream_user(browser, upstream, ALICE_AT_UPSTREAM)
            await browser.follow(await to_callback(browser, gateway, server_id))
            assert await credential(gateway, OWNER, server_id) is not None
            revocations = upstream.stats()["revoke"]
            page = await browser.follow(f"{gateway.url}/dashboard/connections")
            forged = await browser.request("POST", f"{gateway.url}/dashboard/connections/disconnect",
                                           data=[("server_id", server_id)])
            assert forged.status == 403 and await credential(gateway, OWNER, server_id) is not None
            page = await browser.submit(page, "server_id")
            assert page.status == 200 and "disconnected" in page.text
            assert 'data-status="not_connected"' in page.text
            assert await credential(gateway, OWNER, server_id) is None
            assert upstream.stats()["revoke"] == revocations + 2  # refresh and access token

    scenario()


# --------------------------------------------------------------- client.json


def test_the_client_id_metadata_document_is_served_only_for_an_https_public_url(
        tmp_path: Path, gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/oauth/upstream/client.json", trust_env=False).status_code == 404
    https = GatewayProcess(tmp_path / "https", extra_env={
        "MCPGW_PUBLIC_URL": "https://gw.example", "MCPGW_DEV_LOGIN": "0",
        "MCPGW_OIDC_CLIENT_ID": "gateway", "MCPGW_OIDC_CLIENT_SECRET": "not-used-here"}).start()
    try:
        answer = httpx.get(f"{https.listen_url}/oauth/upstream/client.json", trust_env=False)
    finally:
        https.stop()
    assert answer.status_code == 200
    document = answer.json()
    assert document["client_id"] == "https://gw.example/oauth/upstream/client.json"
    assert document["redirect_uris"] == ["https://gw.example/oauth/upstream/callback"]


def test_a_remembered_consent_still_detours_when_the_account_is_gone_and_prompt_none_is_refused(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            await upstream_user(browser, upstream, ALICE_AT_UPSTREAM)
            client_id = await register_client(gateway)
            _, challenge = pkce()
            url = authorize_url(gateway, client_id, server_id, challenge)
            first = await browser.authorize(url, stop_at=DEFAULT_REDIRECT_URI, email=OWNER)
            assert "code" in first
            page = await browser.follow(f"{gateway.url}/dashboard/connections")
            await browser.submit(page, "server_id")  # Disconnect
            assert await credential(gateway, OWNER, server_id) is None

            # prompt=none may show no page, and the upstream's sign-in is one.
            silent = await browser.follow(url + "&prompt=none", stop_at=DEFAULT_REDIRECT_URI)
            assert silent.redirect_query["error"] == "interaction_required"
            assert await credential(gateway, OWNER, server_id) is None

            # The consent is remembered (no page), yet the trip goes through the upstream again.
            mark = len(browser.history)
            again = await browser.follow(url, stop_at=DEFAULT_REDIRECT_URI)
            assert "code" in again.redirect_query
            visited = [u for _, u, _ in browser.history[mark:]]
            assert any(u.startswith(f"{upstream.issuer}/authorize?") for u in visited)
            assert await credential(gateway, OWNER, server_id) is not None

    scenario()


def test_an_upstream_authorization_server_that_is_down_is_a_clear_page_and_connecting_works_after(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    own = OAuthUpstream().wait_ready()  # its own AS, stopped here: the module's stays up
    try:
        server_id = gateway.add_server(own.mcp_url, OWNER, "Flaky", "--upstream-auth", "oauth")
        own.stop_as()

        @run
        async def scenario() -> None:
            async with ScriptedBrowser() as browser:
                await sign_in(browser, gateway, OWNER)
                page = await browser.follow(f"{gateway.url}/oauth/upstream/connect/{server_id}")
                assert page.status == 200 and "the server's sign-in page" in page.text  # the host is unknown now
                failed = await browser.submit(page, "return_to")
                assert failed.status in (502, 503) and failed.is_html and failed.location is None
                assert "Traceback" not in failed.text and "sign-in" in failed.text
                assert await credential(gateway, OWNER, server_id) is None

                own.start_as()
                own.wait_ready()
                await upstream_user(browser, own, ALICE_AT_UPSTREAM)
                callback = await to_callback(browser, gateway, server_id)
                assert (await browser.follow(callback)).status == 200
                assert await credential(gateway, OWNER, server_id) is not None

        scenario()
    finally:
        own.stop()

