"""A refused tool call on the owner's usage page in a real browser (issue 10): Debian's headless
Chromium against a real gateway, the real MCP tool upstream and the Python SDK client; the
owner sees who was refused, which tool and why, counted as denied and not as an error."""

from __future__ import annotations

import asyncio
import re

from playwright.async_api import expect

from tests.support.gateway import GatewayProcess
from tests.support.tool_upstream import ToolUpstream
from tests.test_dashboard_browser import Watch, chromium, chromium_browser, new_context, shot  # noqa: F401 (fixture)
from tests.test_tool_denied_usage import OWNER, READER, SRV, dev_token, refused


def test_owner_sees_the_refused_call_with_user_tool_and_reason(chromium, tmp_path):
    upstream = ToolUpstream()
    gateway = GatewayProcess(tmp_path / "gw").start()
    try:
        gateway.add_server(upstream.url, OWNER, "Docs", "--id", SRV)
        gateway.cli("grants", "add", SRV, "--email", READER, "--read-only")
        token = asyncio.run(dev_token(gateway, READER))
        error = refused(gateway, token, "write_doc", {"path": "a", "text": "b"})
        assert (error.code, error.message) == (-32602, "tool not available")
        assert upstream.calls().get("write_doc", 0) == 0  # it never reached the upstream
        asyncio.run(_usage_in_browser(chromium, gateway))
    finally:
        gateway.stop()
        upstream.stop()


async def _usage_in_browser(chromium, gateway):
    watch = Watch(gateway.url)
    usage_url = f"{gateway.url}/dashboard/servers/{SRV}/usage?range=24h"
    async with chromium_browser(chromium) as browser:
        context = await new_context(browser, watch)
        page = await context.new_page()
        await page.goto(usage_url)
        await page.wait_for_url(re.compile(r".*/login\?next="))
        await page.locator("#email").fill(OWNER)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(re.compile(r".*/usage"))

        # Usage is recorded off the request path: reload until the refused call has landed.
        denied = page.locator('[data-testid="recent-row"]', has=page.locator('[data-testid="recent-tool"]',
                                                                              has_text="write_doc"))
        for _ in range(50):
            if await denied.count():
                break
            await page.wait_for_timeout(200)
            await page.reload()
        await expect(denied).to_have_count(1)
        await expect(denied.get_by_test_id("recent-user")).to_have_text(READER)
        await expect(denied.get_by_test_id("recent-tool")).to_have_text("write_doc")
        await expect(denied.get_by_test_id("recent-outcome")).to_have_text("denied:read_only")

        row = page.locator(f'[data-testid="user-tool-row"][data-user="{READER}"][data-tool="write_doc"]')
        await expect(row.get_by_test_id("denied")).to_have_text("1")
        await expect(page.get_by_test_id("stat-denied")).to_have_text("1")
        await expect(page.get_by_test_id("stat-errors")).to_have_text("0")
        await shot(page, "tool-denied-usage")
        await context.close()
    assert watch.problems == [], watch.problems
    assert watch.external == [], watch.external
