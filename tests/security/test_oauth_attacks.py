"""The authorization server attacked at /authorize, /token, /revoke and /register: redirect
URI matching tricks, PKCE downgrades and malformed challenges, code replay (also racing),
codes and resources swapped between requests, state and iss in the response, refresh
tokens used out of place, client authentication confusion and registration metadata an
attacker chooses.

One real gateway process that signs users in at the real OIDC provider process; tokens
come from the real /authorize and /token. Every refusal is checked exactly and so is the
storage: nothing parked, issued or registered by a refused request. Cases already in
tests/test_oauth_endpoints.py are not repeated (it has the basic redirect mismatches,
PKCE verifier forms, single code replay, rotation, reuse, scope narrowing, /revoke of
another client's token, the register scheme/metadata tables)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import secrets
import sqlite3
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess

ALICE = {"sub": "alice-oa", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
REDIRECT = "http://127.0.0.1:9/callback"
WEB_REDIRECT = "https://app.example/cb"
SRV = "srv_oa"  # owner Alice
SRV_TWO = "srv_oa_two"  # owner Alice
SRV_CAROL = "srv_oa_carol"  # owner Carol, not shared with Alice


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gw(idp, tmp_path_factory):
    """Trusts X-Forwarded-For so that each registration comes from its own address and the
    per-address registration limit is never tripped by accident."""
    gateway = GatewayProcess(tmp_path_factory.mktemp("oauth-attacks"), idp=idp,
                             extra_env={"MCPGW_TRUST_FORWARDED": "1"})
    gateway.use_idp_client(idp)
    gateway.start()
    try:
        gateway.add_server("http://127.0.0.1:9/mcp", ALICE["email"], "OAuth attacks", "--id", SRV)
        gateway.add_server("http://127.0.0.1:9/mcp", ALICE["email"], "OAuth attacks two", "--id", SRV_TWO)
        gateway.add_server("http://127.0.0.1:9/mcp", "carol@example.com", "Carol's", "--id", SRV_CAROL)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def http(gw):
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
def app(http):
    """A public client with a loopback and an https redirect URI."""
    return public_client(http, [REDIRECT, WEB_REDIRECT])


# ---------------------------------------------------------------------------- helpers

_addresses = itertools.count(1)


def register(http, body: dict) -> httpx.Response:
    n = next(_addresses)
    return http.post("/register", content=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-Forwarded-For": f"10.77.{n // 200}.{n % 200 + 1}"})


def public_client(http, redirect_uris=(REDIRECT,), **extra) -> dict:
    response = register(http, {"client_name": "Attack app", "redirect_uris": list(redirect_uris),
                               "token_endpoint_auth_method": "none", **extra})
    assert response.status_code == 201, response.text
    return response.json()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, b64url(hashlib.sha256(verifier.encode()).digest())


def authorize_query(client_id: str, redirect_uri: str = REDIRECT, **params) -> tuple[dict, str]:
    verifier, challenge = pkce()
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
             "state": "st-" + secrets.token_hex(6), "code_challenge": challenge, "code_challenge_method": "S256",
             **params}
    return {k: v for k, v in query.items() if v is not None}, verifier


async def _authorize(gw, query: dict, stop_at: str) -> dict:
    async with ScriptedBrowser() as browser:
        return await browser.authorize(f"{gw.url}/authorize?{urlencode(query)}", stop_at=stop_at, idp_login=ALICE)


def code_for(gw, client_id: str, redirect_uri: str = REDIRECT, **params) -> tuple[str, str, dict]:
    """(code, verifier, the whole redirect query) of one approved authorization."""
    query, verifier = authorize_query(client_id, redirect_uri, **params)
    result = asyncio.run(_authorize(gw, query, redirect_uri))
    assert "code" in result, result
    return result["code"], verifier, result


def token(http, data: dict, **kwargs) -> httpx.Response:
    response = http.post("/token", data={k: v for k, v in data.items() if v is not None}, **kwargs)
    assert response.headers.get("cache-control") == "no-store"
    return response


def exchange(http, client_id, code, verifier, redirect_uri=REDIRECT, **extra) -> httpx.Response:
    return token(http, {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                        "redirect_uri": redirect_uri, "client_id": client_id, **extra})


def refresh(http, client_id, refresh_token, **extra) -> httpx.Response:
    return token(http, {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id,
                        **extra})


def error_of(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error_description"), str)
    assert not {"access_token", "refresh_token", "client_secret"} & set(body), body
    return body["error"]


def rows(gw, table: str) -> int:
    with sqlite3.connect(f"file:{gw.state_dir}/gateway.db?mode=ro", uri=True) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def counts(gw) -> dict[str, int]:
    return {t: rows(gw, t) for t in ("pending", "codes", "refresh_families", "refresh_tokens", "clients")}


def mcp_status(http, access_token: str, server_id: str = SRV) -> int:
    return http.post(f"/mcp/{server_id}", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                     headers={"Authorization": f"Bearer {access_token}",
                              "Accept": "application/json, text/event-stream"}).status_code


def assert_shown_not_redirected(response: httpx.Response) -> None:
    assert response.status_code == 400, (response.status_code, response.headers.get("location"))
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")


# ------------------------------------------------------------ redirect URI matching


@pytest.mark.parametrize("redirect_uri", [
    "https://APP.example/cb", "https://app.example/CB", "HTTPS://app.example/cb",
    "https://app.example/cb?x=1", "https://app.example/cb?", "https://app.example/cb#", "https://app.example/cb#x",
    "https://app.example/cb/", "https://app.example/cb/../cb", "https://app.example/./cb", "https://app.example/c%62",
    "https://app.example:443/cb", "https://app.example:8443/cb", "https://user@app.example/cb",
    "https://app.example@evil.example/cb", "https://app.example\\@evil.example/cb", "https://app.example.evil.example/cb",
    "https://evil.example/https://app.example/cb", "https://app.example%2eevil.example/cb", "http://app.example/cb",
    "https://app.example/cb;x", " https://app.example/cb", "https://app.example/cb ", "https://app.example/cb%00",
    "https://app.example/cb\t", "//app.example/cb", "app.example/cb",
], ids=lambda u: u.replace("https://", "").replace("/", "|")[:40])
def test_https_redirect_uri_must_match_exactly(gw, http, app, redirect_uri):
    before = counts(gw)
    query, _ = authorize_query(app["client_id"], redirect_uri)
    assert_shown_not_redirected(http.get("/authorize", params=query))
    assert counts(gw) == before  # nothing parked


@pytest.mark.parametrize("redirect_uri", [
    "http://127.0.0.1:9/callback?x=1", "http://127.0.0.1:9/Callback", "http://127.0.0.1:9/callback/",
    "http://127.0.0.2:9/callback", "http://[::1]:9/callback", "http://127.1:9/callback",
    "http://0x7f000001:9/callback", "http://2130706433:9/callback", "http://127.0.0.1.nip.io:9/callback",
    "https://127.0.0.1:9/callback", "http://127.0.0.1:9@evil.example/callback", "http://evil.example#@127.0.0.1:9/callback",
    "http://127.0.0.1:9/callback#x", "http://127.0.0.1:9\\@evil.example/callback", "http://127.0.0.1:-1/callback",
    "javascript://127.0.0.1:9/callback%0aalert(1)", "data:text/html,127.0.0.1:9/callback",
    "http://localhost.:9/callback", "http://127.0.0.1:9/callback/..%2fother",
], ids=lambda u: u.replace("http://", "").replace("/", "|")[:40])
def test_loopback_redirect_uri_may_vary_only_in_its_port(gw, http, app, redirect_uri):
    before = counts(gw)
    query, _ = authorize_query(app["client_id"], redirect_uri)
    assert_shown_not_redirected(http.get("/authorize", params=query))
    assert counts(gw) == before


def test_localhost_and_127_registrations_do_not_stand_for_each_other(gw, http):
    """A client that registered http://localhost/… may not receive a code at 127.0.0.1 or
    [::1] (other hosts: another program may listen there), and the other way round."""
    by_name = public_client(http, ["http://localhost/cb"])
    by_ip6 = public_client(http, ["http://[::1]/cb"])
    for client, uri in ((by_name, "http://127.0.0.1:4000/cb"), (by_name, "http://[::1]:4000/cb"),
                        (by_ip6, "http://127.0.0.1:4000/cb"), (by_ip6, "http://localhost:4000/cb")):
        query, _ = authorize_query(client["client_id"], uri)
        assert_shown_not_redirected(http.get("/authorize", params=query))
    query, _ = authorize_query(by_name["client_id"], "http://localhost:4000/cb")
    assert http.get("/authorize", params=query).status_code == 302  # the port alone may differ


def test_omitted_redirect_uri_is_refused_when_several_are_registered(gw, http, app):
    query, _ = authorize_query(app["client_id"], None)
    assert_shown_not_redirected(http.get("/authorize", params=query))


# ------------------------------------------------------------------------------ PKCE


@pytest.mark.parametrize("change", [
    {"code_challenge": "a" * 44}, {"code_challenge": "a" * 128}, {"code_challenge": "a" * 42 + "="},
    {"code_challenge": "+" * 43}, {"code_challenge": "/" * 43}, {"code_challenge": "a" * 42 + "."},
    {"code_challenge": ""}, {"code_challenge_method": "s256"}, {"code_challenge_method": "S512"},
    {"code_challenge_method": ""}, {"code_challenge_method": "S256 "},
], ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))[:12]!r}")
def test_malformed_challenges_and_methods_go_back_as_invalid_request(gw, http, app, change):
    before = counts(gw)
    query, _ = authorize_query(app["client_id"], **change)
    response = http.get("/authorize", params=query)
    assert response.status_code == 302 and response.headers["location"].startswith(REDIRECT + "?")
    result = dict(parse_qsl(urlsplit(response.headers["location"]).query))
    assert result["error"] == "invalid_request" and "code" not in result
    assert result["state"] == query["state"] and result["iss"] == gw.url
    assert counts(gw) == before


def test_a_plain_challenge_verifier_pair_does_not_redeem(gw, http, app):
    """The downgrade: the client (or an attacker who saw the challenge) sends the challenge
    itself as the verifier, as `plain` would allow."""
    code, _, _ = code_for(gw, app["client_id"])
    query, _ = authorize_query(app["client_id"])
    challenge = query["code_challenge"]
    before = counts(gw)
    assert error_of(exchange(http, app["client_id"], code, challenge)) == "invalid_grant"
    assert counts(gw)["refresh_families"] == before["refresh_families"]


def test_verifier_boundaries_43_and_128_characters_are_accepted(gw, http, app):
    for verifier in ("A" * 43, "~" * 128):
        challenge = b64url(hashlib.sha256(verifier.encode()).digest())
        query, _ = authorize_query(app["client_id"], code_challenge=challenge)
        result = asyncio.run(_authorize(gw, query, REDIRECT))
        assert exchange(http, app["client_id"], result["code"], verifier).status_code == 200


def test_no_verifier_at_all_issues_nothing_even_for_a_confidential_client(gw, http):
    """PKCE is for every client, not only public ones: a secret does not replace it."""
    body = register(http, {"client_name": "Confidential", "redirect_uris": [REDIRECT]}).json()
    code, _, _ = code_for(gw, body["client_id"])
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    before = counts(gw)
    assert error_of(token(http, data, auth=(body["client_id"], body["client_secret"]))) == "invalid_request"
    assert counts(gw)["refresh_families"] == before["refresh_families"]


# ------------------------------------------------------------------------ codes


def test_concurrent_replays_of_one_code_issue_once_and_revoke_it(gw, http, app):
    """Eight codes, each redeemed by two requests at once: each time exactly one wins, and
    the replays revoke what it got, whichever request won and whenever the replays came."""
    resource = f"{gw.url}/mcp/{SRV}"

    async def codes():
        found = []
        async with ScriptedBrowser() as browser:  # one sign-in, consent remembered
            for _ in range(8):
                query, verifier = authorize_query(app["client_id"], resource=resource)
                result = await browser.authorize(f"{gw.url}/authorize?{urlencode(query)}", stop_at=REDIRECT,
                                                 idp_login=ALICE)
                found.append((result["code"], verifier))
        return found

    async def burst(code, verifier):
        data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                "redirect_uri": REDIRECT, "client_id": app["client_id"]}
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as client:
            return await asyncio.gather(*(client.post("/token", data=data) for _ in range(2)))

    survivors = []
    for code, verifier in asyncio.run(codes()):
        responses = asyncio.run(burst(code, verifier))
        winners = [r for r in responses if r.status_code == 200]
        assert len(winners) == 1, [r.text for r in responses]
        for loser in responses:
            if loser.status_code != 200:
                assert error_of(loser) == "invalid_grant"
        issued = winners[0].json()
        assert mcp_status(http, issued["access_token"]) == 401
        if refresh(http, app["client_id"], issued["refresh_token"]).status_code == 200:
            survivors.append(code[:6])
    assert survivors == [], f"refresh tokens from replayed codes still work: {survivors}"


def test_a_code_replayed_by_another_client_still_revokes_the_tokens(gw, http, app):
    """The thief has the code but is another client: refused, and the legitimate tokens
    from that code go too (the code leaked)."""
    thief = public_client(http)
    code, verifier, _ = code_for(gw, app["client_id"], resource=f"{gw.url}/mcp/{SRV}")
    issued = exchange(http, app["client_id"], code, verifier).json()
    assert error_of(exchange(http, thief["client_id"], code, verifier)) == "invalid_grant"
    assert error_of(refresh(http, app["client_id"], issued["refresh_token"])) == "invalid_grant"
    assert mcp_status(http, issued["access_token"]) == 401


def test_a_code_is_single_use_even_when_its_first_use_failed(gw, http, app):
    """A wrong verifier (a thief guessing) uses the code up: the right one no longer helps
    the thief's later guesses or the victim; nothing is ever issued from it."""
    code, verifier, _ = code_for(gw, app["client_id"])
    before = counts(gw)
    assert error_of(exchange(http, app["client_id"], code, pkce()[0])) == "invalid_grant"
    assert error_of(exchange(http, app["client_id"], code, verifier)) == "invalid_grant"
    assert counts(gw)["refresh_families"] == before["refresh_families"]


@pytest.mark.parametrize("value", ["", "x", "a" * 5000, "code with spaces", "%00", "😀"])
def test_garbage_codes_are_invalid_grant_or_request(gw, http, app, value):
    response = exchange(http, app["client_id"], value, pkce()[0])
    assert error_of(response) in ("invalid_request", "invalid_grant")


def test_refresh_token_and_access_token_are_not_codes(gw, http, app):
    code, verifier, _ = code_for(gw, app["client_id"])
    issued = exchange(http, app["client_id"], code, verifier).json()
    for value in (issued["refresh_token"], issued["access_token"]):
        assert error_of(exchange(http, app["client_id"], value, verifier)) == "invalid_grant"
    assert error_of(refresh(http, app["client_id"], issued["access_token"])) == "invalid_grant"
    # ...nor is a refresh token an access token.
    assert mcp_status(http, issued["refresh_token"]) == 401
    assert refresh(http, app["client_id"], issued["refresh_token"]).status_code == 200  # unharmed


# -------------------------------------------------------------------------- resources


@pytest.mark.parametrize("authorized, requested, error", [
    (SRV, SRV_TWO, "invalid_target"),  # another server of the same owner
    (SRV, "", "invalid_target"),  # widening a server grant to the base resource
    (SRV, "https://evil.example/mcp/" + SRV, "invalid_target"),
    (None, SRV_CAROL, "invalid_grant"),  # narrowing a base grant to a server she may not use
    (None, "srv_oa_nothing", "invalid_target"),
])
def test_the_token_request_cannot_move_the_audience(gw, http, app, authorized, requested, error):
    resource = f"{gw.url}/mcp/{authorized}" if authorized else None
    code, verifier, _ = code_for(gw, app["client_id"], resource=resource)
    if not requested.startswith("https://"):
        requested = f"{gw.url}/mcp/{requested}"
    before = counts(gw)
    assert error_of(exchange(http, app["client_id"], code, verifier, resource=requested)) == error
    assert counts(gw)["refresh_families"] == before["refresh_families"]


def test_refresh_cannot_move_the_audience_either(gw, http, app):
    code, verifier, _ = code_for(gw, app["client_id"], resource=f"{gw.url}/mcp/{SRV}")
    issued = exchange(http, app["client_id"], code, verifier).json()
    for requested in (f"{gw.url}/mcp/{SRV_TWO}", f"{gw.url}/mcp/", f"{gw.url}/mcp/{SRV_CAROL}"):
        assert error_of(refresh(http, app["client_id"], issued["refresh_token"], resource=requested)) == "invalid_target"
    assert refresh(http, app["client_id"], issued["refresh_token"]).status_code == 200  # unharmed


def test_authorize_for_a_server_the_user_may_not_use_issues_no_code(gw, http, app):
    before = counts(gw)
    query, _ = authorize_query(app["client_id"], resource=f"{gw.url}/mcp/{SRV_CAROL}")

    async def walk():
        async with ScriptedBrowser() as browser:
            try:
                return await browser.authorize(f"{gw.url}/authorize?{urlencode(query)}", stop_at=REDIRECT,
                                               idp_login=ALICE)
            except Exception as exc:  # the refusal page: no form to go on with
                return getattr(exc, "page", None)

    page = asyncio.run(walk())
    assert page is not None and not isinstance(page, dict), page
    assert page.status == 403 and "error=access_denied" in page.text
    assert counts(gw)["codes"] == before["codes"]


# ----------------------------------------------------------------------- state and iss


@pytest.mark.parametrize("state", [
    "a&code=injected&iss=https://evil.example", "x#frag", "ü ñ 😀", "+/=%20", "<script>alert(1)</script>",
    "s" * 2000, "a\"b'c", "=",
])
def test_state_comes_back_exactly_and_cannot_inject_parameters(gw, http, app, state):
    code, _, result = code_for(gw, app["client_id"], state=state)
    assert result["state"] == state
    assert result["iss"] == gw.url and result["code"] == code
    # Nothing in state became a parameter of its own.
    query, _ = authorize_query(app["client_id"], state=state)
    response = http.get("/authorize", params={**query, "response_type": "token"})
    pairs = parse_qsl(urlsplit(response.headers["location"]).query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    assert sorted(names) == sorted(set(names)) and "code" not in names, pairs
    assert dict(pairs)["state"] == state and dict(pairs)["iss"] == gw.url


def test_state_too_long_is_refused_and_not_parked(gw, http, app):
    before = counts(gw)
    query, _ = authorize_query(app["client_id"], state="s" * 2001)
    response = http.get("/authorize", params=query)
    result = dict(parse_qsl(urlsplit(response.headers["location"]).query))
    assert result["error"] == "invalid_request" and result["iss"] == gw.url
    assert counts(gw) == before


# ------------------------------------------------------------------- client auth


def test_client_authentication_confusions_are_refused(gw, http):
    conf = register(http, {"client_name": "Conf", "redirect_uris": [REDIRECT]}).json()
    other = register(http, {"client_name": "Other", "redirect_uris": [REDIRECT]}).json()
    code, verifier, _ = code_for(gw, conf["client_id"])
    data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": REDIRECT}
    cases = [
        # another client's secret under this client's id
        (dict(data, client_id=conf["client_id"], client_secret=other["client_secret"]), None, 401, "invalid_client"),
        (data, (conf["client_id"], other["client_secret"]), 401, "invalid_client"),
        # Basic names one client, the body another
        (dict(data, client_id=other["client_id"]), (conf["client_id"], conf["client_secret"]), 400, "invalid_request"),
        # two methods at once
        (dict(data, client_secret=conf["client_secret"]), (conf["client_id"], conf["client_secret"]), 400,
         "invalid_request"),
        # the secret's hash, an empty secret, a prefix of the secret
        (dict(data, client_id=conf["client_id"], client_secret=hashlib.sha256(conf["client_secret"].encode())
              .hexdigest()), None, 401, "invalid_client"),
        (dict(data, client_id=conf["client_id"], client_secret=""), None, 401, "invalid_client"),
        (dict(data, client_id=conf["client_id"], client_secret=conf["client_secret"][:-1]), None, 401,
         "invalid_client"),
    ]
    before = counts(gw)
    for form, auth, status, error in cases:
        assert error_of(token(http, form, auth=auth), status) == error, (form, auth)
    for header in ("Basic !!!not-base64", "Basic " + base64.b64encode(b"no-colon-at-all").decode(),
                   "Basic " + base64.b64encode(b"\xff\xfe:x").decode()):
        response = token(http, data, headers={"Authorization": header})
        assert error_of(response, 401) == "invalid_client"
    assert counts(gw)["refresh_families"] == before["refresh_families"]
    # None of that used the code up: the real client still redeems it.
    assert token(http, data, auth=(conf["client_id"], conf["client_secret"])).status_code == 200


# ------------------------------------------------------------------------ /register


@pytest.mark.parametrize("body, error", [
    ({"redirect_uris": [f"http://127.0.0.1:{i}/cb" for i in range(21)]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["https://app.example/" + "a" * 2100]}, "invalid_redirect_uri"),
    ({"redirect_uris": [REDIRECT], "grant_types": ["authorization_code", "implicit"]}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "grant_types": ["authorization_code", "password"]}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "grant_types": ["refresh_token"]}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "grant_types": ["urn:ietf:params:oauth:grant-type:jwt-bearer",
                                                    "authorization_code"]}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "grant_types": []}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "response_types": ["code", "token"]}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "response_types": ["code id_token"]}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_jwt"}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "tls_client_auth"}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "NONE"}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": ""}, "invalid_client_metadata"),
    ({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": None}, "invalid_client_metadata"),
    ({"redirect_uris": ["HTTP://app.example/cb"]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["http://127.0.0.1.evil.example/cb"]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["http://0x7f000001/cb"]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["JAVASCRIPT:alert(1)"]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["java\tscript:alert(1)"]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["https://app.example/cb\r\nSet-Cookie: x=1"]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["https://app.example/\u202ecb"]}, "invalid_redirect_uri"),
    ({"redirect_uris": ["https://\u0430pp.example/cb"]}, "invalid_redirect_uri"),
    ({"redirect_uris": [REDIRECT], "client_name": "x" * 100_000}, "invalid_client_metadata"),
], ids=itertools.count())
def test_register_refuses_what_an_attacker_would_register(gw, http, body, error):
    before = counts(gw)["clients"]
    response = register(http, {"token_endpoint_auth_method": "none", **body} if "token_endpoint_auth_method"
                        not in body else body)
    status = 413 if len(json.dumps(body)) > 64 * 1024 else 400
    assert error_of(response, status) == error
    assert counts(gw)["clients"] == before


def test_register_ignores_identifiers_and_secrets_the_client_chose(gw, http, app):
    """client_id, client_secret and their dates are the server's to choose: a client that
    sends another client's id gets its own, and the other client is untouched."""
    chosen_secret = "attacker-chosen-secret-" + secrets.token_hex(8)
    response = register(http, {
        "client_name": "Squatter", "redirect_uris": ["https://evil.example/cb"], "client_id": app["client_id"],
        "client_secret": chosen_secret, "client_id_issued_at": 1, "client_secret_expires_at": 1,
    })
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["client_id"] != app["client_id"]
    assert body["client_secret"] != chosen_secret and body["client_secret_expires_at"] == 0
    assert body["client_id_issued_at"] > 1
    # The chosen secret authenticates nothing; the victim's redirect URIs are unchanged.
    assert error_of(token(http, {"grant_type": "refresh_token", "refresh_token": "x", "client_id": body["client_id"],
                                 "client_secret": chosen_secret}), 401) == "invalid_client"
    query, _ = authorize_query(app["client_id"], "https://evil.example/cb")
    assert_shown_not_redirected(http.get("/authorize", params=query))
