"""The dashboard and the authorization pages attacked from a browser: CSRF on every
state-changing route of the route table (found by reading handlers/__init__.py, so a new
route is covered the day it appears), GET and method-override tricks, escaping of every
owner-, user- and client-supplied string on every page that shows it (and formula cells in
the CSV), framing headers on every page, cookie flags (and __Host-/Secure on https),
post-sign-in redirects that must stay on this origin, the consent page's names and
redirect host, and another owner's server through every /api and /dashboard route.

Real gateway processes with local (dev) sign-in; usage rows are written through the
gateway's own storage service, as the proxy's recorder would. Cases already in
tests/test_dashboard_http.py (the XSRF list it spells out, CSP on /dashboard, the non-owner
table, the sign-in cookie's HttpOnly) are not repeated."""

from __future__ import annotations

import asyncio
import importlib
import re
import secrets
import time
from pathlib import Path
from urllib.parse import quote, urlencode, urljoin, urlsplit

import httpx
import pytest

from config import Config
from services import build_services
from storage.base import Client, UsageEvent
from tests.support.browser import ScriptedBrowser
from tests.support.dashboard_client import api, sign_in
from tests.support.dashboard_client import post as form
from tests.support.gateway import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
ANA, BOB, ROOT_ADMIN = "ana@example.com", "bob@example.com", "root@example.com"
# A person whose e-mail (valid by the gateway's rules) is markup; the dev sign-in names
# them after its local part.
MARKUP_USER = "<img/src=x/onerror=alert(1)>@evil.example"
HOSTILE = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>&amp;"
REDIRECT = "http://127.0.0.1:9/callback"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    gateway = GatewayProcess(tmp_path_factory.mktemp("web-attacks"), extra_env={"MCPGW_ADMIN_EMAILS": ROOT_ADMIN})
    gateway.start()
    yield gateway
    gateway.stop()


def run_services(gw, job):
    async def main():
        services = build_services(Config.from_env({k: v for k, v in gw.env.items() if k.startswith("MCPGW_")}))
        await services.start(background=False)
        try:
            return await job(services)
        finally:
            await services.stop()

    return asyncio.run(main())


def new_server(gw, owner: str, name: str = "Plain") -> str:
    return gw.add_server("https://mcp.example/mcp", owner, name)


def server_state(gw, server_id: str) -> dict | None:
    async def read(s):
        server = await s.storage.get_server(server_id)
        grants = await s.storage.grants_for(server_id) if server else []
        return server and {"name": server.name, "upstream": server.upstream_url,
                           "grants": sorted((g.kind, g.value) for g in grants)}

    return run_services(gw, read)


# ----------------------------------------------------------------------------- CSRF


def _routes() -> list[tuple[str, type]]:
    """(pattern, handler class) of every route, read from the route table's source."""
    source = (ROOT / "handlers" / "__init__.py").read_text()
    found = []
    for pattern, module, name in re.findall(r'\(r"([^"]+)",\s*(\w+)\.(\w+)\)', source):
        found.append((pattern, getattr(importlib.import_module(f"handlers.{module}"), name)))
    assert len(found) > 30, found
    return found


def _state_changing() -> list[tuple[str, str, type]]:
    import tornado.web

    from handlers.api import ApiHandler
    from handlers.base import BaseHandler

    cases = []
    for pattern, cls in _routes():
        cookie_borne = issubclass(cls, ApiHandler) or (issubclass(cls, BaseHandler) and cls.is_page is True)
        if not cookie_borne:
            continue  # /register, /token, /revoke, /mcp: no cookies, client or bearer authentication
        for method in ("post", "put", "patch", "delete"):
            if getattr(cls, method) is not getattr(tornado.web.RequestHandler, method):
                cases.append((pattern, method.upper(), cls))
    return cases


STATE_CHANGING = _state_changing()


def _fill(pattern: str, server_id: str) -> str:
    path = pattern.replace(r"\.", ".").rstrip("?").replace("/?", "/")
    path = path.replace("([^/]+)/grants/(email|domain)/([^/]+)", f"{server_id}/grants/email/{quote(BOB)}")
    path = path.replace("([^/]+)", server_id).replace("(.+)", "mcp_some_client")
    assert "(" not in path, path
    return path


def test_the_route_table_has_the_state_changes_we_know_of():
    names = {(p, m) for p, m, _ in STATE_CHANGING}
    for expected in ((r"/login", "POST"), (r"/logout", "POST"), (r"/authorize/consent", "POST"),
                     (r"/api/servers/([^/]+)", "PATCH"), (r"/api/authorizations/(.+)", "DELETE")):
        assert expected in names, sorted(names)


@pytest.fixture(scope="module")
def csrf_target(gw):
    client = sign_in(gw, ANA)
    server_id = new_server(gw, ANA, "CSRF target")
    gw.cli("grants", "add", server_id, "--email", BOB)
    return client, server_id, server_state(gw, server_id)


@pytest.mark.parametrize("pattern, method, cls", STATE_CHANGING, ids=[f"{m} {p}" for p, m, _ in STATE_CHANGING])
def test_every_cookie_borne_state_change_needs_the_xsrf_token(gw, csrf_target, pattern, method, cls):
    """Signed in, with the _xsrf cookie in the jar, but the request carries no token, an
    empty one or another valid-looking one: 403, and nothing changed."""
    client, server_id, before = csrf_target
    path = _fill(pattern, server_id)
    data = {"name": "csrf", "upstream_url": "https://evil.example/mcp", "kind": "email", "value": BOB,
            "email": "mallory@example.com", "decision": "approve", "client_id": "x", "req": "x", "next": "/"}
    for token in (None, "", "2|00000000|" + "0" * 32 + "|1700000000"):
        headers = {} if token is None else {"X-XSRFToken": token}
        if method == "POST" and cls.__module__ != "handlers.api":
            body = dict(data) if token is None else {**data, "_xsrf": token}
            response = client.post(path, data=body)
        else:
            response = client.request(method, path, json={"name": "csrf", "kind": "email", "value": BOB},
                                      headers=headers)
        assert response.status_code == 403, (method, path, token, response.status_code, response.text[:200])
        assert "location" not in response.headers
    assert server_state(gw, server_id) == before
    me = client.get("/api/me")
    assert me.status_code == 200 and me.json()["email"] == ANA  # still signed in: no logout either


def test_get_never_changes_state_and_method_override_is_ignored(gw):
    client = sign_in(gw, ANA)
    server_id = new_server(gw, ANA, "GET target")
    gw.cli("grants", "add", server_id, "--email", BOB)
    before = server_state(gw, server_id)
    for path in (f"/dashboard/servers/{server_id}/delete", f"/dashboard/servers/{server_id}/grants/remove",
                 f"/dashboard/servers/{server_id}/edit?name=x", f"/dashboard/servers/{server_id}/grants?kind=email"
                 f"&value=mallory@example.com", "/logout", "/dashboard/authorizations/revoke?client_id=x",
                 f"/api/servers/{server_id}/grants/email/{quote(BOB)}"):
        response = client.get(path)
        assert response.status_code in (200, 302, 404, 405), (path, response.status_code)
    for override in ("DELETE", "PATCH", "POST"):
        for header in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
            client.get(f"/api/servers/{server_id}", headers={header: override})
            client.post(f"/api/servers/{server_id}?_method={override}", json={"name": "x"},
                        headers={header: override})
    assert server_state(gw, server_id) == before
    assert client.get("/api/me").json()["email"] == ANA


def test_the_api_refuses_form_and_text_bodies_even_with_the_token(gw):
    """A cross-site form can send text/plain or urlencoded bodies without a preflight; the
    API takes JSON only, so such a body changes nothing even if a token leaked."""
    client = sign_in(gw, ANA)
    server_id = new_server(gw, ANA, "Content type target")
    before = server_state(gw, server_id)
    client.get("/api/me")
    token = client.cookies["_xsrf"]
    for content_type, body in (("text/plain", '{"name": "x"}'), ("application/x-www-form-urlencoded", "name=x"),
                               ("multipart/form-data; boundary=b", '--b\r\nContent-Disposition: form-data; '
                                'name="name"\r\n\r\nx\r\n--b--\r\n')):
        response = client.patch(f"/api/servers/{server_id}", content=body,
                                headers={"Content-Type": content_type, "X-XSRFToken": token})
        assert response.status_code == 400 and response.json()["error"] == "invalid_request", response.text
    assert server_state(gw, server_id) == before


def test_api_answers_carry_no_cors_grant_for_a_foreign_origin(gw):
    client = sign_in(gw, ANA)
    for path in ("/api/me", "/api/servers", "/api/authorizations"):
        response = client.get(path, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers, path
        assert "access-control-allow-credentials" not in response.headers, path
        preflight = client.options(path, headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "DELETE",
                                                  "Access-Control-Request-Headers": "x-xsrftoken"})
        assert "access-control-allow-origin" not in preflight.headers, path


# -------------------------------------------------------------------------- escaping


def _assert_escaped(text: str, raw: str, where: str) -> None:
    assert raw not in text, f"{where}: {raw!r} appears unescaped"
    for dangerous in ("<script>alert(1)", "<img src=x onerror", "<img/src=x/onerror"):
        assert dangerous not in text, f"{where}: {dangerous!r}"


def test_owner_user_and_client_strings_are_escaped_on_every_page(gw):
    ana, root = sign_in(gw, ANA), sign_in(gw, ROOT_ADMIN)
    server_id = new_server(gw, ANA, HOSTILE[:100])
    assert form(ana, f"/dashboard/servers/{server_id}/grants", kind="email", value=MARKUP_USER).status_code == 302
    grantee = sign_in(gw, MARKUP_USER)  # now a known user: the sharing list names them

    now = time.time()
    tool = "<svg onload=alert(3)>" + HOSTILE

    async def record(s):
        await s.storage.usage.record_usage([UsageEvent(now - 30 - i, server_id, "sub-m", MARKUP_USER, "c", "tools/call",
                                                 tool[:200], "ok", 10.0, 1, 1, "2025") for i in range(3)])

    run_services(gw, record)
    pages = {
        "owner overview": ana.get("/dashboard"),
        "server": ana.get(f"/dashboard/servers/{server_id}"),
        "edit": ana.get(f"/dashboard/servers/{server_id}/edit"),
        "delete": ana.get(f"/dashboard/servers/{server_id}/delete"),
        "usage": ana.get(f"/dashboard/servers/{server_id}/usage?range=7d"),
        "admin overview": root.get("/dashboard"),
        "grantee overview": grantee.get("/dashboard"),
        "grantee server": grantee.get(f"/dashboard/servers/{server_id}"),
        "grantee authorizations": grantee.get("/dashboard/authorizations"),
    }
    for where, page in pages.items():
        assert page.status_code == 200, (where, page.status_code)
        assert page.headers["content-type"].startswith("text/html")
        _assert_escaped(page.text, HOSTILE, where)
        _assert_escaped(page.text, MARKUP_USER, where)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages["server"].text
    assert "&lt;img/src=x/onerror=alert(1)&gt;" in pages["server"].text  # the grant value, escaped
    assert "&lt;svg onload=alert(3)&gt;" in pages["usage"].text
    # JSON is JSON: never sniffed as HTML.
    for path in (f"/api/servers/{server_id}", f"/api/servers/{server_id}/grants",
                 f"/api/servers/{server_id}/usage?range=7d"):
        response = api(ana, "GET", path)
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("tool", ["=HYPERLINK(\"https://evil.example\",\"x\")", "+1+1", "-1+1", "@SUM(1)",
                                  "\t=1", "\r=1"])
def test_usage_csv_neutralises_formula_cells(gw, tool):
    ana = sign_in(gw, ANA)
    server_id = new_server(gw, ANA, "CSV")
    email = "=cmd|' /C calc'!A0@evil.example"[:60]

    async def record(s):
        await s.storage.usage.record_usage([UsageEvent(time.time() - 30, server_id, "+sub", email, "c", "tools/call",
                                                 tool, "ok", 10.0, 1, 1, "2025")])

    run_services(gw, record)
    for response in (ana.get(f"/dashboard/servers/{server_id}/usage.csv?range=7d"),
                     api(ana, "GET", f"/api/servers/{server_id}/usage.csv?range=7d")):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        import csv
        import io

        rows = list(csv.reader(io.StringIO(response.text)))
        cells = [cell for row in rows[1:] for cell in row]
        assert cells, response.text
        for cell in cells:
            assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r") or re.fullmatch(r"-?[0-9.]+", cell), (cell, rows)


# ---------------------------------------------------------------------------- framing


def _page_urls(gw, ana: httpx.Client) -> dict[str, tuple[httpx.Client | None, str]]:
    server_id = new_server(gw, ANA, "Framing")
    return {
        "home": (None, "/"), "login": (None, "/login"), "login with next": (None, "/login?next=/dashboard"),
        "not found": (None, "/no/such/page"), "bad authorize": (None, "/authorize?client_id=nope"),
        "expired consent": (None, "/authorize/consent?req=x"), "callback error": (None, "/oauth/callback?state=x"),
        "dashboard": (ana, "/dashboard"), "new": (ana, "/dashboard/servers/new"),
        "server": (ana, f"/dashboard/servers/{server_id}"), "edit": (ana, f"/dashboard/servers/{server_id}/edit"),
        "delete": (ana, f"/dashboard/servers/{server_id}/delete"),
        "usage": (ana, f"/dashboard/servers/{server_id}/usage"), "authorizations": (ana, "/dashboard/authorizations"),
        "other's server": (ana, "/dashboard/servers/srv_nobody_here"),
    }


def test_every_page_refuses_to_be_framed(gw):
    ana = sign_in(gw, ANA)
    anonymous = httpx.Client(base_url=gw.url, trust_env=False, timeout=30)
    for where, (client, path) in _page_urls(gw, ana).items():
        response = (client or anonymous).get(path)
        assert response.headers.get("x-frame-options") == "DENY", (where, response.status_code)
        assert "frame-ancestors 'none'" in response.headers.get("content-security-policy", ""), where
        assert response.headers.get("x-content-type-options") == "nosniff", where
    # The error page of a failed POST as well (XSRF refusal) and the dev sign-in error.
    refused = ana.post("/dashboard/servers", data={"name": "x"})
    assert refused.status_code == 403 and refused.headers.get("x-frame-options") == "DENY"
    bad_login = anonymous.get("/login")
    failed = anonymous.post("/login", data={"email": "not an address", "_xsrf": anonymous.cookies["_xsrf"]})
    assert bad_login.status_code == 200 and failed.status_code == 400
    assert failed.headers.get("x-frame-options") == "DENY"


# ---------------------------------------------------------------------------- cookies


def _set_cookies(response: httpx.Response) -> dict[str, list[str]]:
    found = {}
    for line in response.headers.get_list("set-cookie"):
        name = line.split("=", 1)[0]
        found[name] = [part.strip().lower() for part in line.split(";")[1:]]
    return found


def test_xsrf_cookie_is_httponly_and_samesite(gw):
    response = httpx.get(gw.url + "/login", trust_env=False)
    attributes = _set_cookies(response)["_xsrf"]
    assert "httponly" in attributes and "samesite=lax" in attributes


def test_on_https_cookies_are_secure_and_host_bound(tmp_path):
    """With an https public URL the sign-in cookie is __Host-: Secure, Path=/, no Domain,
    and the XSRF cookie is Secure too. (Requests reach the loopback listener over http here;
    the cookies are carried by hand, as a TLS-terminating proxy's browser would.)"""
    gateway = GatewayProcess(tmp_path / "https", extra_env={})
    gateway.env["MCPGW_PUBLIC_URL"] = f"https://localhost:{gateway.port}"
    gateway.start()
    try:
        with httpx.Client(base_url=gateway.listen_url, trust_env=False, timeout=30) as client:
            first = client.get("/login")
            xsrf_line = next(c for c in first.headers.get_list("set-cookie") if c.startswith("_xsrf="))
            xsrf = xsrf_line.split(";")[0].split("=", 1)[1]
            assert "secure" in _set_cookies(first)["_xsrf"]
            signed = client.post("/login", data={"email": ANA, "next": "/dashboard", "_xsrf": xsrf},
                                 headers={"Cookie": f"_xsrf={xsrf}"})
            assert signed.status_code == 302, signed.text
            cookies = _set_cookies(signed)
            assert "mcpgw_signin" not in cookies
            attributes = cookies["__Host-mcpgw_signin"]
            assert {"secure", "httponly", "path=/", "samesite=lax"} <= set(attributes), attributes
            assert not any(a.startswith("domain=") for a in attributes)
    finally:
        gateway.stop()


# --------------------------------------------------------------------------- redirects


def _where_a_browser_goes(base: str, location: str) -> tuple[str, str]:
    """The WHATWG URL parser's view: tabs and newlines dropped, backslash is a slash."""
    cleaned = re.sub(r"[\t\n\r]", "", location).replace("\\", "/")
    target = urlsplit(urljoin(base + "/", cleaned))
    return target.scheme, target.netloc


@pytest.mark.parametrize("next_path", [
    "//evil.example/", "/\\evil.example/", "\\\\evil.example/", "https://evil.example/", "/%09/evil.example/",
    "/\t/evil.example/", "/\n/evil.example/", "/\r\n/evil.example/", "javascript:alert(1)", "/ /evil.example",
    "http:/evil.example", "https:evil.example", "/%2F%2Fevil.example", "/.//evil.example", "\x00//evil.example",
    "/\u3000/evil.example", "/dashboard\r\nSet-Cookie: pwned=1", "evil.example",
], ids=lambda n: repr(n)[1:25])
def test_after_sign_in_the_browser_stays_on_this_origin(gw, next_path):
    client = httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30, trust_env=False)
    client.get("/login")
    response = client.post("/login", data={"email": ANA, "next": next_path, "_xsrf": client.cookies["_xsrf"]})
    assert response.status_code == 302, (response.status_code, response.text[:300])
    location = response.headers["location"]
    gateway = urlsplit(gw.url)
    assert _where_a_browser_goes(gw.url, location) == (gateway.scheme, gateway.netloc), location
    assert "pwned" not in response.headers.get("set-cookie", "")
    # The sign-in page carries `next` into its form: what it carries leads home too.
    page = client.get("/login", params={"next": next_path})
    assert page.status_code == 200
    (carried,) = re.findall(r'name="next" value="([^"]*)"', page.text)
    carried = carried.replace("&amp;", "&").replace("&#34;", '"').replace("&#39;", "'")
    assert _where_a_browser_goes(gw.url, carried) == (gateway.scheme, gateway.netloc), carried


# ----------------------------------------------------------------------------- consent


async def _consent_page(gw, client_id: str, redirect_uri: str, email: str = ANA, **params):
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": "s",
             "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "code_challenge_method": "S256",
             **params}
    async with ScriptedBrowser() as browser:
        page = await browser.follow(f"{gw.url}/authorize?{urlencode(query)}", stop_at=redirect_uri)
        page = await browser.submit(page, "email", {"email": email}, stop_at=redirect_uri)
        return page


def _register(gw, name: str, uris: list[str]) -> str:
    response = httpx.post(gw.url + "/register", json={"client_name": name, "redirect_uris": uris,
                                                      "token_endpoint_auth_method": "none"}, trust_env=False)
    assert response.status_code == 201, response.text
    return response.json()["client_id"]


def test_consent_names_the_real_redirect_host_whatever_the_client_calls_itself(gw):
    server_id = new_server(gw, ANA, HOSTILE[:100])
    client_id = _register(gw, "Claude (by Anthropic) <b>claude.ai</b>", ["https://claude.ai.evil.example/cb"])
    page = asyncio.run(_consent_page(gw, client_id, "https://claude.ai.evil.example/cb",
                                     resource=f"{gw.url}/mcp/{server_id}"))
    assert page.status == 200 and page.url.startswith(gw.url + "/authorize/consent"), page.text[:300]
    assert "<strong>claude.ai.evil.example</strong>" in page.text
    _assert_escaped(page.text, HOSTILE, "consent")
    assert "&lt;b&gt;claude.ai&lt;/b&gt;" in page.text
    custom = _register(gw, "Native", ["com.example.app:/oauth2redirect"])
    page = asyncio.run(_consent_page(gw, custom, "com.example.app:/oauth2redirect"))
    assert "com.example.app:" in page.text and "installed on your device" in page.text


def test_consent_shows_a_look_alike_redirect_host_as_punycode(gw):
    """A look-alike (IDN) redirect host ('\u0430pp.example', a Cyrillic a) is refused at
    registration, naming the A-label to use; a client that holds one from before that rule
    gets a consent page showing what the browser will go to, xn--pp-6kc.example (the A-label
    of '\u0430pp.example'), never the Unicode that reads as app.example."""
    uri = "https://\u0430pp.example/cb"
    refused = httpx.post(gw.url + "/register", json={"client_name": "Look-alike", "redirect_uris": [uri],
                                                     "token_endpoint_auth_method": "none"}, trust_env=False)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_redirect_uri", refused.text
    assert "xn--pp-6kc.example" in refused.json()["error_description"] and refused.text.isascii()
    client_id = "mcp_legacy_" + secrets.token_hex(8)
    run_services(gw, lambda s: s.storage.create_client(Client(client_id=client_id, client_name="Look-alike",
                                                              redirect_uris=(uri,), created_at=time.time())))
    page = asyncio.run(_consent_page(gw, client_id, uri))
    assert page.status == 200 and page.url.startswith(gw.url + "/authorize/consent"), page.text[:300]
    assert "\u0430pp.example" not in page.text and "<strong>xn--pp-6kc.example</strong>" in page.text


# ----------------------------------------------------------------- another owner's server


# Dashboard GETs of form targets: they only send the browser to the server page.
REDIRECT_ONLY_GETS = ("/test", "/grants", "/grants/tools", "/tools/rule", "/tools/approve")


def test_another_owners_server_through_every_route(gw):
    """Bob (no role, not shared) and Carol (shared by e-mail: may use, not manage) against
    Ana's server, through every /api and /dashboard route of the table; and the answer for
    a server that does not exist is the same as for one that is not yours (no oracle)."""
    ana, bob = sign_in(gw, ANA), sign_in(gw, BOB)
    carol_email = f"carol-{secrets.token_hex(3)}@example.com"
    server_id = new_server(gw, ANA, "Ana's private")
    gw.cli("grants", "add", server_id, "--email", carol_email)
    carol = sign_in(gw, carol_email)
    before = server_state(gw, server_id)
    refusals = {}
    for pattern, cls in _routes():
        if not (pattern.startswith("/api/servers/") or pattern.startswith("/dashboard/servers/")) or \
                "([^/]+)" not in pattern:
            continue
        for method in ("GET", "POST", "PATCH", "DELETE"):
            if getattr(cls, method.lower()) is getattr(__import__("tornado.web").web.RequestHandler, method.lower()):
                continue
            for who, client in (("bob", bob), ("carol", carol)):
                for target in (server_id, "srv_does_not_exist"):
                    path = _fill(pattern, target)
                    if pattern.startswith("/api/"):
                        response = api(client, method, path, {"name": "x", "kind": "email", "value": BOB})
                    elif method == "GET":
                        response = client.get(path)
                    else:
                        response = form(client, path, name="x", upstream_url="https://evil.example/mcp",
                                        kind="email", value=BOB)
                    refusals[(who, method, pattern, target == server_id)] = response
    for (who, method, pattern, real), response in refusals.items():
        status = response.status_code
        if who == "carol" and real and method == "GET" and pattern in (r"/dashboard/servers/([^/]+)",
                                                                        r"/api/servers/([^/]+)",
                                                                        r"/api/servers/([^/]+)/tools",
                                                                        r"/dashboard/servers/([^/]+)/test",
                                                                        r"/dashboard/servers/([^/]+)/grants",
                                                                        r"/dashboard/servers/([^/]+)/grants/tools",
                                                                        r"/dashboard/servers/([^/]+)/tools/rule",
                                                                        r"/dashboard/servers/([^/]+)/tools/approve"):
            assert status in (200, 302), (who, method, pattern, status)  # she may see what she may use
            assert "upstream" not in response.text.lower() or "mcp.example" not in response.text
            continue
        if method == "GET" and pattern.endswith(REDIRECT_ONLY_GETS) and pattern.startswith("/dashboard/"):
            # These GETs only send the browser to the server page, which answers for itself.
            assert status == 302 and response.headers["location"].startswith("/dashboard/servers/"), status
            continue
        expected = (403, 404) if who == "carol" and real else (404,)
        assert status in expected, (who, method, pattern, real, status, response.text[:200])
        if who == "bob":
            twin = refusals[(who, method, pattern, not real)]
            assert twin.status_code == status, (method, pattern)
    assert server_state(gw, server_id) == before
    listed = api(bob, "GET", "/api/servers").json()
    assert server_id not in str(listed)
    assert server_id not in bob.get("/dashboard").text
    assert api(ana, "GET", f"/api/servers/{server_id}").status_code == 200
