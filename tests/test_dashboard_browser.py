"""The owner dashboard end to end in a real browser: Debian's headless Chromium driven by
Playwright (async API, inside asyncio.run), against a real gateway process that signs people
in at the real IdP process, a real upstream MCP server, and the MCP SDK client through the
proxy. Screenshots of the main pages land in test-artifacts/screenshots/."""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.shared.auth import OAuthClientMetadata
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.support.gateway import GatewayProcess
from tests.support.mcp_oauth import DEFAULT_REDIRECT_URI, InMemoryTokenStorage, OAuthRig, connect

CHROMIUM = Path("/usr/bin/chromium")
# The network here is closed: without the background-networking flags Chromium stalls.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
TIMEOUT_MS = 15_000

OWNER = {"sub": "olga-browser", "email": "olga@example.com", "email_verified": True, "name": "Olga Owner"}
USER = {"sub": "ben-browser", "email": "ben@example.com", "email_verified": True, "name": "Ben User"}
CLIENT_NAME = "Playwright MCP client"
# A sessionless 2026-07-28 request: any MCP client may send it, with or without a session.
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "server/discover"}
DISCOVER = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "token-check", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}}}

# Reports what the gateway's Content-Security-Policy blocked as a console error, so one
# listener catches console errors, uncaught exceptions and CSP violations alike.
CSP_REPORTER = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error("CSP violation: " + e.violatedDirective + " blocked " + (e.blockedURI || "inline"));
});
"""


@pytest.fixture
def chromium() -> Path:
    # No skip: `make test` installs Debian's chromium, so its absence is a broken machine.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (it installs Debian's chromium as root)")
    return CHROMIUM


@dataclass
class Watch:
    """Console errors, page errors and CSP violations seen on the gateway's own pages, plus
    every request that tried to leave loopback (the dashboard must work offline)."""

    gateway_url: str
    problems: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> Page:
        page.on("console", lambda msg: self._console(page, msg))
        page.on("pageerror", lambda exc: self._note(page, f"pageerror: {exc}"))
        return page

    def _console(self, page: Page, msg) -> None:
        if msg.type != "error":
            return
        where = msg.location.get("url", "")
        if msg.text.startswith("Failed to load resource") and where == page.url:
            return  # the document's own status (a form re-shown with 400): not a broken page
        self._note(page, f"console error: {msg.text} at {where}")

    def _note(self, page: Page, what: str) -> None:
        if page.url.startswith(self.gateway_url):
            self.problems.append(f"{page.url}: {what}")

    def on(self, url_prefix: str) -> list[str]:
        return [p for p in self.problems if p.startswith(self.gateway_url + url_prefix)]


@asynccontextmanager
async def chromium_browser(executable: Path):
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_context(browser: Browser, watch: Watch) -> BrowserContext:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    await context.add_init_script(CSP_REPORTER)

    async def offline(route):
        # The IdP's page links a CDN stylesheet; answer it empty instead of waiting on a dead network.
        watch.external.append(route.request.url)
        await route.fulfill(status=200, content_type="text/css", body="")

    await context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), offline)
    context.on("page", watch.attach)
    return context


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def tab_to(page: Page, selector: str, max_tabs: int = 30) -> int:
    """Press Tab until `selector` has the focus; the number of presses."""
    target = page.locator(selector)
    for presses in range(1, max_tabs + 1):
        await page.keyboard.press("Tab")
        if await target.evaluate("el => el === document.activeElement"):
            return presses
    raise AssertionError(f"{selector} is not reachable with Tab")


async def is_focused(page: Page, selector: str) -> bool:
    return await page.locator(selector).evaluate("el => el === document.activeElement")


async def sign_in_at_idp(page: Page, gateway, idp, person: dict, *, keyboard: bool,
                         screenshot: str | None = None) -> None:
    """Open the dashboard signed out: the gateway sends the browser to the IdP's login page."""
    idp.set_user(person["sub"], email=person["email"], email_verified=True, name=person["name"])
    await page.goto(gateway.url + "/dashboard")
    await page.wait_for_url(idp.issuer + "/**")
    sub = page.locator('input[name="sub"]')
    await expect(sub).to_be_visible()
    if screenshot:
        await shot(page, screenshot)
    if keyboard:
        await page.evaluate("document.activeElement && document.activeElement.blur()")
        await tab_to(page, 'input[name="sub"]')
        await page.keyboard.type(person["sub"])
        await page.keyboard.press("Enter")
    else:
        await sub.fill(person["sub"])
        await page.get_by_role("button", name="Authorize").click()
    await page.wait_for_url(gateway.url + "/dashboard")
    await expect(page.get_by_test_id("nav-user")).to_have_text(person["email"])


@dataclass
class ConsentInBrowser:
    """The MCP SDK's redirect/callback handlers, played by a real (signed-in) browser page:
    it opens the authorization URL, looks at the consent page, presses Allow and catches the
    redirect to the client's loopback redirect URI."""

    page: Page
    watch: Watch
    redirect_uri: str = DEFAULT_REDIRECT_URI
    results: list[dict[str, str]] = field(default_factory=list)

    async def redirect_handler(self, authorization_url: str) -> None:
        page = self.page
        landed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def catch(route):
            if not landed.done():
                landed.set_result(route.request.url)
            await route.fulfill(status=200, content_type="text/html", body="<p>Done: back to the application.</p>")

        await page.route(lambda url: url.startswith(self.redirect_uri), catch)
        await page.goto(authorization_url)
        await page.wait_for_url(re.compile(r".*/authorize/consent\?"))
        heading = page.get_by_role("heading", level=1)
        await expect(heading).to_contain_text(CLIENT_NAME)
        await expect(heading).to_contain_text("Shared tools")
        buttons = page.locator("form.consent button")
        await expect(buttons.first).to_have_text("Allow")  # the approve button comes first
        await expect(page.locator("dl.facts")).to_contain_text(USER["email"])
        await shot(page, "consent")
        assert self.watch.on("/authorize") == [], self.watch.problems
        await page.get_by_role("button", name="Allow").click()
        final = await asyncio.wait_for(landed, TIMEOUT_MS / 1000)
        self.results.append(dict(parse_qsl(urlsplit(final).query)))

    async def callback_handler(self) -> AuthorizationCodeResult:
        result = self.results[-1]
        assert "code" in result, result
        return AuthorizationCodeResult(code=result["code"], state=result.get("state"), iss=result.get("iss"))


def browser_rig(server_url: str, consent: ConsentInBrowser) -> OAuthRig:
    storage = InMemoryTokenStorage()
    provider = OAuthClientProvider(
        server_url=server_url,
        client_metadata=OAuthClientMetadata.model_validate(
            {"redirect_uris": [consent.redirect_uri], "client_name": CLIENT_NAME}
        ),
        storage=storage,
        redirect_handler=consent.redirect_handler,
        callback_handler=consent.callback_handler,
    )
    return OAuthRig(server_url=server_url, provider=provider, storage=storage, authorizer=consent)  # type: ignore[arg-type]


async def proxy_status(gateway_url: str, server_id: str, token: str) -> int:
    async with httpx.AsyncClient(timeout=15, trust_env=False) as http:
        response = await http.post(f"{gateway_url}/mcp/{server_id}", headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
                                   json=DISCOVER)
        return response.status_code


# ---------------------------------------------------------------------------- the tests


def test_owner_registers_shares_user_connects_usage_and_revocation(chromium, idp, gateway_factory, upstream):
    # The owner registers the loopback test upstream, which only administrators may.
    gateway = gateway_factory(extra_env={"MCPGW_ADMIN_EMAILS": OWNER["email"]})
    asyncio.run(_owner_to_revocation(chromium, idp, gateway, upstream))


async def _owner_to_revocation(chromium, idp, gateway, upstream):
    watch = Watch(gateway.url)
    async with chromium_browser(chromium) as browser:
        owner_ctx = await new_context(browser, watch)
        owner = await owner_ctx.new_page()

        # Sign in with the keyboard alone, at the IdP's real login page.
        await sign_in_at_idp(owner, gateway, idp, OWNER, keyboard=True, screenshot="sign-in-idp")
        await expect(owner.get_by_test_id("no-servers")).to_be_visible()
        assert watch.on("/dashboard") == [], watch.problems

        # Register: the form is walked with Tab; a bad scheme comes back as a field error.
        await owner.get_by_test_id("register-server").click()
        await owner.wait_for_url(gateway.url + "/dashboard/servers/new")
        await tab_to(owner, "#name")
        await owner.keyboard.type("Shared tools")
        await owner.keyboard.press("Tab")
        assert await is_focused(owner, "#upstream_url"), "Tab from Name must reach Upstream URL"
        await owner.keyboard.type("ftp://example.com/mcp")
        await tab_to(owner, "#save-server")
        await owner.keyboard.press("Enter")
        await expect(owner.get_by_test_id("upstream_url-error")).to_contain_text("must be an http(s) URL")
        await expect(owner.get_by_test_id("form-errors")).to_be_visible()
        await expect(owner.locator("#upstream_url")).to_have_attribute("aria-invalid", "true")
        await expect(owner.locator("#name")).to_have_value("Shared tools")
        await shot(owner, "register-field-errors")
        await owner.locator("#upstream_url").fill(upstream.url)
        await owner.get_by_test_id("save-server").click()
        await owner.wait_for_url(re.compile(r".*/dashboard/servers/srv_[^/?]+\?notice=registered"))
        await expect(owner.get_by_test_id("notice")).to_contain_text("registered")
        server_id = await owner.get_by_test_id("server").get_attribute("data-server-id")
        mcp_url = f"{gateway.url}/mcp/{server_id}"

        # Test connection: who answered, in which era, with which tools.
        await owner.get_by_test_id("test-connection").click()
        probe = owner.get_by_test_id("probe-result")
        await expect(probe).to_have_attribute("data-ok", "true")
        await expect(owner.get_by_test_id("probe-server-name")).to_have_text("upstream-under-test")
        await expect(owner.get_by_test_id("probe-era")).to_contain_text("2026-07-28")
        tools = await owner.get_by_test_id("probe-tools").locator("code").all_inner_texts()
        assert {"echo", "count", "fail"} <= set(tools), tools
        await shot(owner, "server-test-connection")

        # Share with the second user by e-mail.
        await owner.get_by_test_id("grant-value").fill(USER["email"])
        await owner.get_by_test_id("add-grant").click()
        await expect(owner.get_by_test_id("notice")).to_contain_text("sharing rule is added")
        await expect(owner.locator(f'[data-testid="grant-row"][data-value="{USER["email"]}"]')).to_be_visible()
        await expect(owner.get_by_test_id("install-url")).to_have_value(mcp_url)
        await shot(owner, "server-owner")
        await owner.goto(gateway.url + "/dashboard")
        await expect(owner.locator(f'[data-testid="server-row"][data-server-id="{server_id}"]')).to_be_visible()
        await shot(owner, "dashboard-owner")
        assert watch.on("/dashboard") == [], watch.problems

        # The second user, in a browser of their own, finds it under "Shared with me".
        user_ctx = await new_context(browser, watch)
        user = await user_ctx.new_page()
        await sign_in_at_idp(user, gateway, idp, USER, keyboard=False)
        shared_row = user.locator(f'[data-testid="shared-row"][data-server-id="{server_id}"]')
        await expect(shared_row).to_contain_text("Shared tools")
        await expect(shared_row).to_contain_text("your e-mail address")
        await expect(user.get_by_test_id("no-servers")).to_be_visible()
        await shot(user, "dashboard-shared-with-me")
        await shared_row.get_by_test_id("shared-link").click()
        await expect(user.get_by_test_id("server-role")).to_have_text("shared with you")
        await expect(user.get_by_test_id("install-panel")).to_be_visible()
        await expect(user.get_by_test_id("install-url")).to_have_value(mcp_url)
        await expect(user.get_by_test_id("install-claude")).to_have_value(re.compile(re.escape(mcp_url)))
        await expect(user.get_by_test_id("install-url-copy")).to_be_visible()  # copy.js ran
        await expect(user.get_by_test_id("test-connection")).to_have_count(0)
        await expect(user.get_by_test_id("sharing")).to_have_count(0)
        await shot(user, "server-shared-install-panel")
        assert watch.on("/dashboard") == [], watch.problems

        # The MCP SDK client connects as the user; the consent happens in the user's browser.
        consent = ConsentInBrowser(await user_ctx.new_page(), watch)
        rig = browser_rig(mcp_url, consent)
        async with connect(rig, mode="legacy") as client:
            assert {"echo", "fail"} <= {t.name for t in (await client.list_tools()).tools}
            for text in ("one", "two", "three"):
                assert (await client.call_tool("echo", {"text": text})).content[0].text == f"echo: {text}"
            assert (await client.call_tool("fail", {})).is_error
        assert len(consent.results) == 1
        access_token = rig.storage.tokens.access_token
        assert (await proxy_status(gateway.url, server_id, access_token)) == 200

        # The owner sees the calls on the usage page once the 1 s batch is flushed.
        usage_url = f"{gateway.url}/dashboard/servers/{server_id}/usage"
        echo_row = owner.locator(f'[data-testid="user-tool-row"][data-user="{USER["email"]}"][data-tool="echo"]')
        fail_row = owner.locator(f'[data-testid="user-tool-row"][data-user="{USER["email"]}"][data-tool="fail"]')

        async def echo_calls() -> str:
            return await echo_row.locator("td.num").first.inner_text() if await echo_row.count() else "0"

        await owner.goto(usage_url)
        deadline = time.monotonic() + 10
        while await echo_calls() != "3" or await fail_row.count() == 0:
            assert time.monotonic() < deadline, f"the calls never all reached the usage page ({await echo_calls()})"
            await asyncio.sleep(0.5)
            await owner.reload()
        await expect(fail_row.locator("td.num").nth(1)).to_have_text("1")  # its error
        await expect(owner.get_by_test_id("top-tools")).to_contain_text("echo")
        assert await owner.locator("#usage-chart svg").count() == 1
        assert await owner.get_by_test_id("chart-bar").count() >= 1
        assert int(await owner.get_by_test_id("stat-calls").inner_text()) >= 4
        await expect(owner.get_by_test_id("recent-calls")).to_contain_text(USER["email"])
        await shot(owner, "usage")
        assert watch.on("/dashboard") == [], watch.problems

        # The user revokes the client on "My authorizations": its access token stops working.
        await user.get_by_test_id("nav-authorizations").click()
        row = user.locator('[data-testid="authorization-row"]').filter(has_text=CLIENT_NAME)
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text(server_id)
        await shot(user, "authorizations")
        await row.get_by_test_id("revoke-authorization").click()
        await expect(user.get_by_test_id("notice")).to_contain_text("access is revoked")
        await expect(user.get_by_test_id("no-authorizations")).to_be_visible()
        deadline = time.monotonic() + 5  # revocations reach the proxy within 3 s
        while (status := await proxy_status(gateway.url, server_id, access_token)) != 401:
            assert status not in (403, 404), status
            assert time.monotonic() < deadline, f"the revoked client still gets {status}"
            await asyncio.sleep(0.2)
        assert watch.on("/dashboard") == [], watch.problems

        await owner_ctx.close()
        await user_ctx.close()

    assert watch.problems == [], watch.problems
    # Only the IdP's own page reached outside (its CDN stylesheet); never the gateway's.
    assert {urlsplit(u).hostname for u in watch.external} <= {"cdn.jsdelivr.net"}, watch.external


def test_local_sign_in_by_keyboard(chromium, tmp_path):
    """The gateway's own sign-in page (local development mode): reachable and usable with the
    keyboard alone, calm, and without console errors."""
    gateway = GatewayProcess(tmp_path / "dev").start()
    try:
        asyncio.run(_local_sign_in(chromium, gateway))
    finally:
        gateway.stop()


async def _local_sign_in(chromium, gateway):
    watch = Watch(gateway.url)
    async with chromium_browser(chromium) as browser:
        context = await new_context(browser, watch)
        page = await context.new_page()
        await page.goto(gateway.url + "/dashboard")
        await page.wait_for_url(re.compile(r".*/login\?next="))
        await expect(page.get_by_role("heading", level=1)).to_contain_text("Sign in")
        await shot(page, "sign-in")
        await page.evaluate("document.activeElement && document.activeElement.blur()")
        await tab_to(page, "#email")
        await page.keyboard.type("kim@example.com")
        await page.keyboard.press("Tab")
        assert await is_focused(page, 'form[action="/login"] button[type="submit"]')
        await page.keyboard.press("Enter")
        await page.wait_for_url(gateway.url + "/dashboard")
        await expect(page.get_by_test_id("nav-user")).to_have_text("kim@example.com")
        await context.close()
    assert watch.problems == [], watch.problems
    assert watch.external == [], watch.external
