"""The owner dashboard over HTTP, against one real gateway process (local sign-in) and a
real upstream MCP server: pages and /api/ for every rule (sign-in, XSRF, CSP, field
errors, Test connection, sharing, delete, usage, authorizations, admins) and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import quote

import httpx
import pytest

from config import Config
from services import build_services
from services.authserver.signin import dev_subject
from storage.base import Consent, RefreshFamily, RefreshToken, UsageEvent
from tests.support.dashboard_client import api, post, sign_in
from tests.support.gateway import GatewayProcess

ANA, BOB, CAROL, ROOT = "ana@example.com", "bob@example.com", "carol@example.com", "root@example.com"
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2025-11-25"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    # Ana registers the loopback test upstream through the dashboard: internal upstreams are
    # for administrators, so she is one. Bob and Carol are not.
    gateway = GatewayProcess(tmp_path_factory.mktemp("dashboard"), extra_env={"MCPGW_ADMIN_EMAILS": f"{ROOT},{ANA}"})
    gateway.start()
    yield gateway
    gateway.stop()


def field_errors(response: httpx.Response) -> dict[str, str]:
    return dict(re.findall(r'id="([a-z_]+)-error"[^>]*>([^<]*)<', response.text))


def register(client, upstream_url: str, name: str = "Ana's tools") -> str:
    response = post(client, "/dashboard/servers", name=name, upstream_url=upstream_url, headers="")
    assert response.status_code == 302, field_errors(response) or response.text
    return response.headers["location"].split("/")[3].split("?")[0]


def in_process(gw):
    """Services on the gateway's own storage and secret (mint tokens, record usage)."""
    return build_services(Config.from_env(gw.env))


def run(coro):
    return asyncio.run(coro)


async def with_services(gw, job):
    services = in_process(gw)
    await services.start(background=False)
    try:
        return await job(services)
    finally:
        await services.stop()


async def mint(s, email: str, server_id: str, family_id: str, client_id: str = "") -> str:
    user = await s.storage.get_user(dev_subject(email))
    if not client_id:
        client, _ = await s.clients.register({"client_name": "Test app", "redirect_uris": ["http://127.0.0.1:9/cb"],
                                               "token_endpoint_auth_method": "none"})
        client_id = client.client_id
    audience = s.config.server_resource(server_id)
    now = time.time()
    family = RefreshFamily(family_id, client_id, user.sub, audience, "mcp:connect mcp:invoke", now, now + 86400,
                           last_used_at=now)
    await s.storage.create_family(family, RefreshToken("h-" + family_id, family_id, client_id, user.sub, family.scope,
                                                       audience, now, now + 3600, now + 86400))
    await s.storage.put_consent(Consent(user.sub, client_id, audience, family.scope, now))
    return s.tokens.mint_access_token(user, client_id, family.scope, audience, family_id)


def passes_gateway(status: int) -> bool:
    """The gateway let the request through to the upstream (whatever the upstream said)."""
    return status not in (401, 403, 404)


def mcp_ping(gw, server_id: str, token: str) -> int:
    return httpx.post(f"{gw.url}/mcp/{server_id}", json=PING, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
                      timeout=30).status_code


# ------------------------------------------------------------------ sign-in and headers


def test_signed_out_pages_redirect_to_sign_in_and_api_answers_401(gw):
    with httpx.Client(base_url=gw.url, trust_env=False) as anonymous:
        response = anonymous.get("/dashboard/servers/srv_x/usage")
        assert response.status_code == 302
        assert response.headers["location"] == "/login?next=%2Fdashboard%2Fservers%2Fsrv_x%2Fusage"
        response = anonymous.get("/api/servers")
        assert response.status_code == 401 and response.json()["error"] == "not_signed_in"
        response = anonymous.get("/no/such/page")
        assert response.status_code == 404 and "text/html" in response.headers["content-type"]
        assert "Not found" in response.text
        assert anonymous.get("/api/nothing").json()["error"] == "not_found"


def test_pages_have_strict_csp_no_framing_and_safe_cookies(gw):
    client = sign_in(gw, ANA)
    signin_cookie = next(c for c in client.cookies.jar if c.name == "mcpgw_signin")
    assert signin_cookie.has_nonstandard_attr("HttpOnly")
    response = client.get("/dashboard")
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp.replace("https:", "")
    assert response.headers["x-frame-options"] == "DENY"
    assert "<script>" not in response.text and " style=" not in response.text and "onclick" not in response.text
    assert re.search(r'<script src="/static/copy\.js\?v=[^"]+" defer></script>', response.text)
    assert client.get("/static/copy.js").status_code == 200
    assert client.get("/api/me").headers["content-security-policy"].startswith("default-src 'none'")


def test_every_state_change_needs_the_xsrf_token(gw, upstream):
    client = sign_in(gw, ANA)
    server_id = register(client, upstream.url)
    for path, data in (
        ("/dashboard/servers", {"name": "x", "upstream_url": upstream.url}),
        (f"/dashboard/servers/{server_id}/edit", {"name": "x"}),
        (f"/dashboard/servers/{server_id}/delete", {}),
        (f"/dashboard/servers/{server_id}/grants", {"kind": "email", "value": BOB}),
        (f"/dashboard/servers/{server_id}/grants/remove", {"kind": "email", "value": BOB}),
        (f"/dashboard/servers/{server_id}/test", {}),
        (f"/dashboard/servers/{server_id}/tools/rule", {"tools_deny": "echo"}),
        (f"/dashboard/servers/{server_id}/grants/tools", {"kind": "email", "value": BOB}),
        (f"/dashboard/servers/{server_id}/tools/approve", {}),
        ("/dashboard/authorizations/revoke", {"client_id": "x"}),
        ("/logout", {}),
    ):
        response = client.post(path, data=data)
        assert response.status_code == 403, path
        assert "text/html" in response.headers["content-type"]
    for method, path in (("POST", "/api/servers"), ("PATCH", f"/api/servers/{server_id}"),
                         ("DELETE", f"/api/servers/{server_id}"), ("POST", f"/api/servers/{server_id}/grants"),
                         ("DELETE", f"/api/servers/{server_id}/grants/email/{BOB}"),
                         ("POST", f"/api/servers/{server_id}/test"), ("DELETE", "/api/authorizations/x"),
                         ("PATCH", f"/api/servers/{server_id}/tools"), ("POST", f"/api/servers/{server_id}/tools/approve"),
                         ("PATCH", f"/api/servers/{server_id}/grants/email/{BOB}")):
        response = client.request(method, path, json={"name": "x"})
        assert response.status_code == 403 and response.json()["error"] == "forbidden", (method, path)
        response = client.request(method, path, json={"name": "x"}, headers={"X-XSRFToken": "2|00|00|1"})
        assert response.status_code == 403, (method, path)
    assert client.get(f"/api/servers/{server_id}").json()["name"] == "Ana's tools"  # nothing changed


# ---------------------------------------------------------------- register and test


def test_register_shows_field_errors(gw):
    client = sign_in(gw, ANA)
    page = client.get("/dashboard/servers/new")
    assert page.status_code == 200 and 'id="server-form"' in page.text and '<label for="upstream_url">' in page.text
    cases = [
        ("ftp://example.com/mcp", "must be an http(s) URL"),
        ("http://127.0.0.1:9/mcp", "Unreachable"),
        ("http://169.254.169.254/latest/meta-data", "address guard"),
        ("http://10.20.30.40/mcp", "address guard"),
    ]
    for url, expected in cases:
        response = post(client, "/dashboard/servers", name="Bad", upstream_url=url, headers="")
        assert response.status_code == 400
        errors = field_errors(response)
        assert expected in errors["upstream_url"], (url, errors)
        assert 'aria-invalid="true"' in response.text and f'value="{url}"' in response.text
    response = post(client, "/dashboard/servers", name="", upstream_url="http://127.0.0.1:9/", headers="nonsense")
    assert {"name", "headers"} <= set(field_errors(response))
    response = api(client, "POST", "/api/servers", {"name": "x", "upstream_url": "gopher://x"})
    assert response.status_code == 400 and "upstream_url" in response.json()["fields"]


def test_register_test_connection_and_install_panel(gw, upstream):
    client = sign_in(gw, ANA)
    response = post(client, "/dashboard/servers", name="Ana <tools>", upstream_url=upstream.url,
                    headers="X-Api-Key: s3cret", forward_identity="1")
    assert response.status_code == 302
    server_id = response.headers["location"].split("/")[3].split("?")[0]
    page = client.get(response.headers["location"])
    assert "The server is registered" in page.text
    assert "Ana &lt;tools&gt;" in page.text and "Ana <tools>" not in page.text  # autoescape
    assert "X-Api-Key" in page.text and "s3cret" not in page.text
    mcp_url = f"{gw.url}/mcp/{server_id}"
    assert f'id="install-url" data-testid="install-url" type="text" readonly value="{mcp_url}"' in page.text
    for testid in ("install-cursor", "install-vscode", "install-claude", "install-json", "install-inspector",
                   "sharing", "test-connection", "delete-server", "edit-server"):
        assert f'data-testid="{testid}"' in page.text, testid
    assert "cursor://anysphere.cursor-deeplink/mcp/install?name=ana-tools&amp;config=" in page.text
    assert f"claude mcp add --transport http ana-tools {mcp_url}" in page.text

    result = post(client, f"/dashboard/servers/{server_id}/test")
    assert result.status_code == 200 and 'data-ok="true"' in result.text
    assert ">upstream-under-test<" in result.text and "2026-07-28" in result.text
    assert "<code>echo</code>" in result.text and "<code>fail</code>" in result.text
    probe = api(client, "POST", f"/api/servers/{server_id}/test").json()
    assert probe["ok"] and "echo" in probe["tools"] and probe["server_name"] == "upstream-under-test"

    # Pointed somewhere dead (through the CLI), the test shows the exact error.
    gw.cli("servers", "edit", server_id, "--upstream", "http://127.0.0.1:9/mcp")
    result = post(client, f"/dashboard/servers/{server_id}/test")
    assert 'data-ok="false"' in result.text and "127.0.0.1:9" in result.text


def test_edit_by_page_and_api(gw, upstream):
    client = sign_in(gw, ANA)
    server_id = register(client, upstream.url)
    form = client.get(f"/dashboard/servers/{server_id}/edit")
    assert form.status_code == 200 and "Ana&#39;s tools" in form.text
    response = post(client, f"/dashboard/servers/{server_id}/edit", name="Renamed", upstream_url=upstream.url,
                    headers="X-New: 1", forward_identity="1")
    assert response.status_code == 302 and response.headers["location"].endswith("?notice=saved")
    view = api(client, "GET", f"/api/servers/{server_id}").json()
    assert (view["name"], view["upstream_headers"], view["forward_identity"]) == ("Renamed", ["X-New"], True)
    response = post(client, f"/dashboard/servers/{server_id}/edit", name="", upstream_url="http://127.0.0.1:9/")
    assert response.status_code == 400 and {"name", "upstream_url"} <= set(field_errors(response))
    view = api(client, "PATCH", f"/api/servers/{server_id}", {"forward_identity": False, "headers": None}).json()
    assert view["forward_identity"] is False and view["upstream_headers"] == ["X-New"]


# ------------------------------------------------------------- who may do what


def test_non_owner_cannot_read_edit_share_or_delete_whatever_they_send(gw, upstream):
    ana, bob = sign_in(gw, ANA), sign_in(gw, BOB)
    server_id = register(ana, upstream.url)
    base = f"/dashboard/servers/{server_id}"
    for path in (base, base + "/edit", base + "/delete", base + "/usage", base + "/usage.csv?range=30d"):
        response = bob.get(path)
        assert response.status_code == 404 and "text/html" in response.headers["content-type"], path
    for path, data in ((base + "/edit", {"name": "Bob's now", "upstream_url": upstream.url}),
                       (base + "/delete", {}), (base + "/grants", {"kind": "email", "value": BOB}),
                       (base + "/grants/remove", {"kind": "email", "value": ANA}), (base + "/test", {})):
        assert post(bob, path, **data).status_code == 404, path
    for method, path, body in (("GET", f"/api/servers/{server_id}", None),
                               ("PATCH", f"/api/servers/{server_id}", {"name": "Bob's"}),
                               ("DELETE", f"/api/servers/{server_id}", None),
                               ("GET", f"/api/servers/{server_id}/grants", None),
                               ("POST", f"/api/servers/{server_id}/grants", {"kind": "email", "value": BOB}),
                               ("GET", f"/api/servers/{server_id}/usage?range=30d", None),
                               ("GET", f"/api/servers/{server_id}/usage.csv", None),
                               ("POST", f"/api/servers/{server_id}/test", None)):
        response = api(bob, method, path, body)
        assert response.status_code == 404 and response.json()["error"] == "not_found", (method, path)
    assert api(ana, "GET", f"/api/servers/{server_id}").json()["name"] == "Ana's tools"
    assert api(ana, "GET", f"/api/servers/{server_id}/grants").json() == {"grants": []}


def test_sharing_shared_with_me_and_removal_within_three_seconds(gw, upstream):
    ana, carol = sign_in(gw, ANA), sign_in(gw, CAROL)
    server_id = register(ana, upstream.url, name="Shared tools")
    response = post(ana, f"/dashboard/servers/{server_id}/grants", kind="email", value="not-an-address")
    assert response.status_code == 400 and "not an e-mail address" in field_errors(response)["value"]
    response = post(ana, f"/dashboard/servers/{server_id}/grants", kind="email", value=CAROL.upper())
    assert response.status_code == 302
    assert api(ana, "POST", f"/api/servers/{server_id}/grants", {"kind": "domain", "value": "corp.example"}).status_code == 201

    overview = carol.get("/dashboard")
    assert 'data-testid="shared-row" data-server-id="' + server_id + '"' in overview.text
    assert server_id in [s["server_id"] for s in api(carol, "GET", "/api/servers").json()["shared"]]
    page = carol.get(f"/dashboard/servers/{server_id}")
    assert page.status_code == 200 and 'data-testid="install-panel"' in page.text
    assert 'data-testid="sharing"' not in page.text and upstream.url not in page.text
    assert carol.get(f"/dashboard/servers/{server_id}/usage").status_code == 403
    assert post(carol, f"/dashboard/servers/{server_id}/delete").status_code == 403
    assert api(carol, "GET", f"/api/servers/{server_id}").json()["role"] == "email"

    token = run(with_services(gw, lambda s: mint(s, CAROL, server_id, "fam-carol-share")))
    assert passes_gateway(mcp_ping(gw, server_id, token))
    grants = api(ana, "GET", f"/api/servers/{server_id}/grants").json()["grants"]
    carol_rule = next(g for g in grants if g["value"] == CAROL)
    assert [u["email"] for u in carol_rule["users"]] == [CAROL]
    assert CAROL in ana.get(f"/dashboard/servers/{server_id}").text

    removed = post(ana, f"/dashboard/servers/{server_id}/grants/remove", kind="email", value=CAROL)
    assert removed.status_code == 302
    deadline = time.monotonic() + 3.5
    while passes_gateway(mcp_ping(gw, server_id, token)):
        assert time.monotonic() < deadline, "the removed grant still works after 3 s"
        time.sleep(0.2)
    assert mcp_ping(gw, server_id, token) == 403
    assert carol.get(f"/dashboard/servers/{server_id}").status_code == 404
    response = api(ana, "DELETE", f"/api/servers/{server_id}/grants/domain/corp.example")
    assert response.status_code == 200
    assert api(ana, "DELETE", f"/api/servers/{server_id}/grants/domain/corp.example").status_code == 404


def test_delete_with_confirmation_stops_its_tokens(gw, upstream):
    ana = sign_in(gw, ANA)
    server_id = register(ana, upstream.url, name="Doomed")
    token = run(with_services(gw, lambda s: mint(s, ANA, server_id, "fam-doomed")))
    assert passes_gateway(mcp_ping(gw, server_id, token))
    confirm = ana.get(f"/dashboard/servers/{server_id}/delete")
    assert confirm.status_code == 200 and 'data-testid="confirm-delete"' in confirm.text
    response = post(ana, f"/dashboard/servers/{server_id}/delete")
    assert response.status_code == 302 and response.headers["location"] == "/dashboard?notice=deleted"
    assert mcp_ping(gw, server_id, token) == 404
    assert ana.get(f"/dashboard/servers/{server_id}").status_code == 404
    assert server_id not in ana.get("/dashboard").text

    other = register(ana, upstream.url, name="Doomed by API")
    assert api(ana, "DELETE", f"/api/servers/{other}").json() == {"deleted": other}
    assert api(ana, "GET", f"/api/servers/{other}").status_code == 404


def test_admin_sees_and_manages_all_servers(gw, upstream):
    # Bob is no administrator, so his loopback server comes from the operator's CLI.
    bob, root = sign_in(gw, BOB), sign_in(gw, ROOT)
    server_id = gw.add_server(upstream.url, BOB, "Watched")
    overview = root.get("/dashboard")
    assert 'data-testid="all-servers"' in overview.text and server_id in overview.text
    assert 'data-testid="all-servers"' not in bob.get("/dashboard").text
    assert root.get(f"/dashboard/servers/{server_id}/usage").status_code == 200
    assert post(root, f"/dashboard/servers/{server_id}/edit", name="Renamed by admin",
                upstream_url=upstream.url).status_code == 302
    assert api(bob, "GET", f"/api/servers/{server_id}").json()["name"] == "Renamed by admin"
    # The owner may still rename it (its internal URL unchanged), not point it elsewhere inside.
    assert api(bob, "PATCH", f"/api/servers/{server_id}", {"name": "Bob's", "upstream_url": upstream.url}).status_code == 200
    assert api(root, "DELETE", f"/api/servers/{server_id}").status_code == 200


def test_internal_upstreams_are_for_administrators(gw, upstream):
    """Finding 20: a signed-in user with no role cannot point a server at an allow-listed
    internal address (and read it through the proxy); an administrator can."""
    bob, ana = sign_in(gw, BOB), sign_in(gw, ANA)
    before = {s.server_id for s in run(with_services(gw, lambda s: s.storage.list_servers()))}
    loopback_names = upstream.url.replace("127.0.0.1", "localhost")
    for url in (upstream.url, loopback_names, "http://127.0.0.1:9/mcp"):
        response = post(bob, "/dashboard/servers", name="Inside", upstream_url=url, headers="")
        assert response.status_code == 400, url
        assert "only administrators" in field_errors(response)["upstream_url"].lower(), url
        response = api(bob, "POST", "/api/servers", {"name": "Inside", "upstream_url": url})
        assert response.status_code == 400, url
        assert "only administrators" in response.json()["fields"]["upstream_url"].lower(), url
    assert {s.server_id for s in run(with_services(gw, lambda s: s.storage.list_servers()))} == before

    # Bob's server on a public address (registered by the operator) cannot be turned inward.
    server_id = gw.add_server("https://mcp.example/mcp", BOB, "Public")
    response = api(bob, "PATCH", f"/api/servers/{server_id}", {"upstream_url": upstream.url})
    assert response.status_code == 400 and "only administrators" in response.json()["fields"]["upstream_url"].lower()
    response = post(bob, f"/dashboard/servers/{server_id}/edit", name="Public", upstream_url=upstream.url)
    assert response.status_code == 400 and "only administrators" in field_errors(response)["upstream_url"].lower()
    assert gw.cli_json("servers", "show", server_id)["upstream_url"] == "https://mcp.example/mcp"

    assert api(ana, "POST", "/api/servers", {"name": "Inside", "upstream_url": upstream.url}).status_code == 201
    assert register(ana, upstream.url, name="Inside by page")


# ------------------------------------------------------------------------ usage


def test_usage_page_api_csv_and_cli(gw, upstream):
    ana = sign_in(gw, ANA)
    server_id = register(ana, upstream.url, name="Busy")
    now = time.time()

    async def record(s):
        events = [UsageEvent(now - 86400 * 2 - i, server_id, "sub-x", "x@example.com", "c", "tools/call", "search",
                             "ok", 120.0, 1, 1, "2025") for i in range(30)]
        events += [UsageEvent(now - 60 - i, server_id, "sub-y", "y@example.com", "c", "tools/call", "<b>echo</b>",
                              "-32603" if i < 5 else "ok", 15.0, 1, 1, "2026") for i in range(70)]
        await s.storage.usage.record_usage(events)

    run(with_services(gw, record))
    page = ana.get(f"/dashboard/servers/{server_id}/usage?range=7d")
    assert page.status_code == 200
    assert re.search(r'data-testid="stat-calls">100<', page.text)
    assert re.search(r'data-testid="stat-errors">5<', page.text)
    assert re.search(r'data-testid="stat-error-rate">5\.0 %<', page.text)
    assert page.text.count('data-testid="chart-bar"') == 7 and "<svg" in page.text
    assert "&lt;b&gt;echo&lt;/b&gt;" in page.text and "<b>echo</b>" not in page.text
    assert 'data-testid="user-tool-row" data-user="x@example.com" data-tool="search"' in page.text
    assert page.text.count('data-testid="recent-row"') == 50 and 'data-testid="older-calls"' in page.text
    older = re.search(r'href="\?range=7d&amp;before=([0-9.]+)" id="older-calls"', page.text).group(1)
    page2 = ana.get(f"/dashboard/servers/{server_id}/usage?range=7d&before={older}")
    assert page2.text.count('data-testid="recent-row"') == 50
    day = ana.get(f"/dashboard/servers/{server_id}/usage?range=24h")
    assert re.search(r'data-testid="stat-calls">70<', day.text)
    assert ana.get(f"/dashboard/servers/{server_id}/usage?range=nonsense").status_code == 400

    report = api(ana, "GET", f"/api/servers/{server_id}/usage?range=30d").json()
    assert (report["calls"], report["errors"]) == (100, 5)
    search = next(r for r in report["users_tools"] if r["tool"] == "search")
    assert search["user_email"] == "x@example.com" and 60 < search["p50_ms"] <= 120 and search["p95_ms"] <= 120

    csv_response = ana.get(f"/dashboard/servers/{server_id}/usage.csv?range=30d")
    assert csv_response.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_response.headers["content-disposition"]
    assert csv_response.text.splitlines()[0].startswith("range,user_email,user_sub,tool,calls")
    assert len(csv_response.text.splitlines()) == 3

    cli = gw.cli_json("usage", server_id, "--days", "30")
    assert (cli["calls"], cli["errors"]) == (100, 5)
    human = gw.cli("usage", server_id, "--days", "1").stdout
    assert "70 calls" in human
    failed = gw.cli("usage", server_id, "--days", "0", check=False)
    assert failed.returncode != 0 and failed.stderr.count("\n") == 1


# --------------------------------------------------------------- authorizations


def test_my_authorizations_list_and_revoke(gw, upstream):
    ana, bob = sign_in(gw, ANA), sign_in(gw, BOB)
    server_id = register(ana, upstream.url, name="Authorized")

    async def grant(s):
        client, _ = await s.clients.register({"client_name": "Cursor <IDE>", "redirect_uris": ["http://127.0.0.1:9/cb"],
                                               "token_endpoint_auth_method": "none"})
        return client.client_id, await mint(s, ANA, server_id, "fam-auth-1", client.client_id)

    client_id, token = run(with_services(gw, grant))
    assert passes_gateway(mcp_ping(gw, server_id, token))
    page = ana.get("/dashboard/authorizations")
    assert f'data-client-id="{client_id}"' in page.text and "Cursor &lt;IDE&gt;" in page.text
    listed = api(ana, "GET", "/api/authorizations").json()["authorizations"]
    assert [a["client_id"] for a in listed if a["client_id"] == client_id] == [client_id]
    assert api(bob, "GET", "/api/authorizations").json() == {"authorizations": []}
    assert post(bob, "/dashboard/authorizations/revoke", client_id=client_id).status_code == 404
    assert passes_gateway(mcp_ping(gw, server_id, token))

    response = post(ana, "/dashboard/authorizations/revoke", client_id=client_id)
    assert response.status_code == 302 and response.headers["location"].endswith("notice=revoked")
    deadline = time.monotonic() + 5
    while passes_gateway(mcp_ping(gw, server_id, token)):  # revocations reach the proxy within 3 s
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert f'data-client-id="{client_id}"' not in ana.get("/dashboard/authorizations").text
    assert api(ana, "DELETE", f"/api/authorizations/{quote(client_id, safe='')}").status_code == 404


def test_cli_edit_test_and_authorizations(gw, upstream):
    ana = sign_in(gw, ANA)
    server_id = register(ana, upstream.url, name="CLI")
    edited = gw.cli_json("servers", "edit", server_id, "--name", "CLI renamed", "--header", "X-K: v",
                         "--forward-identity")
    assert (edited["name"], edited["upstream_headers"], edited["forward_identity"]) == ("CLI renamed", ["X-K"], True)
    cleared = gw.cli_json("servers", "edit", server_id, "--clear-headers", "--no-forward-identity")
    assert (cleared["upstream_headers"], cleared["forward_identity"]) == ([], False)
    probe = gw.cli_json("servers", "test", server_id)
    assert probe["ok"] and "echo" in probe["tools"]
    bad = gw.cli("servers", "edit", server_id, "--upstream", "ftp://x", check=False)
    assert bad.returncode == 1 and "http(s)" in bad.stderr

    async def grant(s):
        client, _ = await s.clients.register({"client_name": "CLI app", "redirect_uris": ["http://127.0.0.1:9/cb"],
                                               "token_endpoint_auth_method": "none"})
        await mint(s, ANA, server_id, "fam-cli-1", client.client_id)
        return client.client_id

    client_id = run(with_services(gw, grant))
    listed = gw.cli_json("authorizations", "list", "--user", ANA)
    assert client_id in [a["client_id"] for a in listed]
    revoked = gw.cli_json("authorizations", "revoke", "--user", ANA, "--client", client_id)
    assert revoked == {"revoked": client_id, "families": 1}
    again = gw.cli("authorizations", "revoke", "--user", ANA, "--client", client_id, check=False)
    assert again.returncode == 1 and "holds no authorization" in again.stderr
    assert json.loads(gw.cli("--json", "authorizations", "list", "--user", ANA).stdout) is not None
