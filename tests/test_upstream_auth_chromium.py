"""The sign-in trip through an upstream's own sign-in in a real browser (issue 11): Debian's
headless Chromium (Playwright), a real gateway process and the real OAuth upstream. Consent says
where the account is connected; Allow goes to the upstream AS, back to the gateway, and only then
to the MCP client's redirect URI with a code that the client exchanges; Connections shows it."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from playwright.async_api import expect

from tests.support.gateway import GatewayProcess
from tests.support.mcp_oauth import DEFAULT_REDIRECT_URI
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.tokens import pkce
from tests.test_dashboard_browser import (  # noqa: F401 (fixture)
    TIMEOUT_MS,
    Watch,
    chromium,
    chromium_browser,
    new_context,
    shot,
)

OWNER = "olga@example.com"
AT_UPSTREAM = "olga-at-upstream"


def test_consent_goes_through_the_upstream_sign_in_and_back_to_the_client(chromium, tmp_path):
    upstream = OAuthUpstream().wait_ready()
    gateway = GatewayProcess(tmp_path / "gw").start()
    try:
        server_id = gateway.add_server(upstream.mcp_url, OWNER, "Tracker", "--upstream-auth", "oauth")
        asyncio.run(_sign_in_trip(chromium, gateway, upstream, server_id))
    finally:
        gateway.stop()
        upstream.stop()


async def _sign_in_trip(chromium, gateway: GatewayProcess, upstream: OAuthUpstream, server_id: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=15) as http:
        registered = await http.post("/register", json={"client_name": "Chromium app", "redirect_uris": [
            DEFAULT_REDIRECT_URI], "token_endpoint_auth_method": "none"})
        client_id = registered.json()["client_id"]
        verifier, challenge = pkce()
        resource = f"{gateway.url}/mcp/{server_id}"
        authorize = f"{gateway.url}/authorize?" + urlencode({
            "response_type": "code", "client_id": client_id, "redirect_uri": DEFAULT_REDIRECT_URI,
            "state": "st-1", "code_challenge": challenge, "code_challenge_method": "S256", "resource": resource})

        watch = Watch(gateway.url)
        async with chromium_browser(chromium) as browser:
            context = await new_context(browser, watch)
            page = await context.new_page()
            visited: list[str] = []
            page.on("request", lambda request: visited.append(request.url) if request.is_navigation_request()
                    else None)
            landed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            async def catch(route):
                if not landed.done():
                    landed.set_result(route.request.url)
                await route.fulfill(status=200, content_type="text/html", body="<p>Back to the application.</p>")

            await page.route(lambda url: url.startswith(DEFAULT_REDIRECT_URI), catch)
            await page.goto(f"{upstream.issuer}/signin?user={AT_UPSTREAM}")  # who the upstream AS signs in

            await page.goto(authorize)
            await page.wait_for_url(re.compile(r".*/login\?next="))
            await page.locator("#email").fill(OWNER)
            await page.get_by_role("button", name="Sign in").click()
            await page.wait_for_url(re.compile(r".*/authorize/consent\?"))
            note = page.get_by_test_id("consent-connect")
            await expect(note).to_be_visible()
            await expect(note).to_contain_text(urlsplit(upstream.issuer).netloc)
            await expect(note).to_contain_text("Tracker")
            await shot(page, "consent-connect-account")
            await page.get_by_role("button", name="Allow").click()
            final = await asyncio.wait_for(landed, TIMEOUT_MS / 1000)
            # The route answered; let that navigation finish before the next goto interrupts it.
            await page.wait_for_url(lambda url: url.startswith(DEFAULT_REDIRECT_URI))

            query = dict(parse_qsl(urlsplit(final).query))
            assert query["state"] == "st-1" and query.get("code"), query
            trip = [url.split("?")[0] for url in visited]
            at_as = trip.index(f"{upstream.issuer}/authorize")
            assert trip[at_as + 1:at_as + 3] == [f"{gateway.url}/oauth/upstream/callback",
                                                 f"{gateway.url}/authorize/continue"], trip

            token = await http.post("/token", data={
                "grant_type": "authorization_code", "code": query["code"], "redirect_uri": DEFAULT_REDIRECT_URI,
                "client_id": client_id, "code_verifier": verifier, "resource": resource})
            assert token.status_code == 200 and token.json()["access_token"], token.text

            await page.goto(f"{gateway.url}/dashboard")
            await page.get_by_test_id("nav-connections").click()
            row = page.locator(f'[data-testid="connection-row"][data-server-id="{server_id}"]')
            await expect(row.get_by_test_id("connection-status")).to_contain_text("Connected")
            await expect(row.get_by_test_id("disconnect-button")).to_be_visible()
            await shot(page, "connections")
            assert watch.problems == [], watch.problems
            assert [r for r in upstream.stats()["token_requests"] if r["subject"] == AT_UPSTREAM]
