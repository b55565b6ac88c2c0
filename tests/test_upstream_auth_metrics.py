"""Connected accounts on /metrics (issue 11), with real processes on loopback (the gateway, the real
OAuth upstream of tests/support/oauth_upstream.py, the MCP SDK's client): each refresh of a user's
upstream token counts once by outcome, and each answer with the connect link counts once."""

from __future__ import annotations

import httpx
import pytest
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families

from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.inprocess import run
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.upstream_accounts import (  # noqa: F401 (fixtures)
    ALICE_AT_UPSTREAM,
    OWNER,
    alices_client,
    gateway,
    server_id,
    signed_in,
    upstream,
    whoami_text,
)


def counters(process: GatewayProcess) -> dict[str, float]:
    """The refresh outcomes and the connect-required count, as /metrics says (0 when absent)."""
    found = {"ok": 0.0, "rejected": 0.0, "unavailable": 0.0, "connect_required": 0.0}
    text = httpx.get(process.url + "/metrics", trust_env=False, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mcpgw_upstream_token_refreshes_total":
                found[s.labels["outcome"]] = s.value
            elif s.name == "mcpgw_connect_required_total":
                found["connect_required"] = s.value
    return found


def test_refresh_outcomes_and_connect_required_answers_are_counted(
        gateway: GatewayProcess, server_id: str, upstream: OAuthUpstream) -> None:
    @run
    async def scenario() -> None:
        async with ScriptedBrowser() as browser:
            async with alices_client(browser, gateway, server_id, upstream) as (rig, client):
                before = counters(gateway)

                # The upstream stops accepting the token: one refresh, ok.
                upstream.control(expire_access=ALICE_AT_UPSTREAM)
                assert whoami_text(await client.call_tool("whoami", {})) == ALICE_AT_UPSTREAM
                after_ok = counters(gateway)
                assert after_ok == {**before, "ok": before["ok"] + 1}

                # The token endpoint fails: one refresh, unavailable (a 503, the account kept).
                upstream.control(expire_access=ALICE_AT_UPSTREAM, token_status=500)
                try:
                    with pytest.raises(MCPError):
                        await client.call_tool("whoami", {})
                finally:
                    upstream.control(token_status=0)
                after_unavailable = counters(gateway)
                assert after_unavailable == {**after_ok, "unavailable": after_ok["unavailable"] + 1}

                # The grant is revoked at the upstream: one refresh, rejected, and the connect link.
                upstream.control(revoke_user=ALICE_AT_UPSTREAM)
                result = await client.call_tool("whoami", {})
                assert result.is_error and f"/oauth/upstream/connect/{server_id}" in result.content[0].text
                after_rejected = counters(gateway)
                assert after_rejected == {**after_unavailable, "rejected": after_unavailable["rejected"] + 1,
                                          "connect_required": after_unavailable["connect_required"] + 1}

                # No account any more: the link again, no refresh attempted.
                result = await client.call_tool("whoami", {})
                assert result.is_error
                assert counters(gateway) == {**after_rejected,
                                             "connect_required": after_rejected["connect_required"] + 1}

    scenario()
