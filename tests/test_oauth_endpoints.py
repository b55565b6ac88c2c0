"""HTTP-level rules of the authorization server, against one real gateway process that
signs users in at a real OIDC provider process: discovery documents, /register,
/authorize and consent, the sign-in cookie, /token (codes, client authentication,
refresh rotation), /revoke, the bearer check at /mcp/{id} and signing-key rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import re
import secrets
import sqlite3
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess

ALICE = {"sub": "alice-ep-1", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
BOB = {"sub": "bob-ep-1", "email": "bob@example.com", "email_verified": True, "name": "Bob"}
# Port 9 (discard): nothing listens; the browser stops at the redirect without requesting it.
REDIRECT = "http://127.0.0.1:9/callback"
SERVER = "srv_ep"  # owned by Alice
CURSOR_URIS = [
    "cursor://anysphere.cursor-mcp/oauth/callback",
    "https://www.cursor.com/oauth/callback",
    "http://localhost:43117/callback",
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gw(idp, tmp_path_factory):
    """One gateway for the module. It trusts X-Forwarded-For (as behind a reverse proxy)
    so that each registration can come from its own address: the per-address rate limit
    is tested on purpose, not tripped by accident."""
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("endpoints"), idp=idp, extra_env={"MCPGW_TRUST_FORWARDED": "1"}
    )
    gateway.use_idp_client(idp)
    gateway.start()
    try:
        gateway.add_server("http://127.0.0.1:9/mcp", ALICE["email"], "Endpoint tests", "--id", SERVER)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def http(gw):
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
def app(http):
    """A public client (token_endpoint_auth_method none) registered once."""
    return public_client(http, client_name="Shared test app")


# ---------------------------------------------------------------------------- helpers

_addresses = itertools.count(1)


def register(http, body=None, *, content: bytes | None = None, content_type="application/json",
             address: str | None = None) -> httpx.Response:
    n = next(_addresses)
    headers = {"Content-Type": content_type, "X-Forwarded-For": address or f"10.9.{n // 200}.{n % 200 + 1}"}
    if body is not None:
        content = json.dumps(body).encode()
    return http.post("/register", content=content, headers=headers)


def public_client(http, redirect_uris=(REDIRECT,), **extra) -> dict:
    body = {"client_name": "Test app", "redirect_uris": list(redirect_uris), "token_endpoint_auth_method": "none"}
    response = register(http, {**body, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, b64url(hashlib.sha256(verifier.encode()).digest())


def server_resource(gw, server_id: str = SERVER) -> str:
    return f"{gw.url}/mcp/{server_id}"


def authorize_params(client_id: str, redirect_uri: str = REDIRECT, **params) -> tuple[dict, str]:
    verifier, challenge = pkce()
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "state": "st-" + secrets.token_hex(6),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **params,
    }
    return {k: v for k, v in query.items() if v is not None}, verifier


async def walk(gw, browser: ScriptedBrowser, client_id: str, *, who=ALICE, redirect_uri=REDIRECT,
               consent="approve", **params) -> tuple[dict, str, dict, list]:
    """Run one authorization in `browser`: (redirect query, verifier, request, requests made)."""
    query, verifier = authorize_params(client_id, redirect_uri, **params)
    before = len(browser.history)
    result = await browser.authorize(
        f"{gw.url}/authorize?{urlencode(query)}", stop_at=redirect_uri, idp_login=who, consent=consent
    )
    return result, verifier, query, browser.history[before:]


def code_for(gw, client_id: str, **kwargs) -> tuple[str, str]:
    """A fresh browser signs in and approves; returns (code, verifier)."""

    async def main():
        async with ScriptedBrowser() as browser:
            return await walk(gw, browser, client_id, **kwargs)

    result, verifier, query, _ = asyncio.run(main())
    assert "code" in result, result
    assert result["state"] == query["state"] and result["iss"] == gw.url
    return result["code"], verifier


def token(http, data, *, auth=None, headers=None, content=None) -> httpx.Response:
    """POST /token; every answer of the token endpoint, success or error, is no-store."""
    if content is not None:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        response = http.post("/token", content=content, headers=headers, auth=auth)
    else:
        response = http.post("/token", data=data, headers=headers, auth=auth)
    assert response.headers.get("cache-control") == "no-store", (response.status_code, response.text)
    return response


def exchange(http, client_id, code, verifier, redirect_uri=REDIRECT, **extra) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
            "redirect_uri": redirect_uri, "client_id": client_id, **extra}
    return token(http, {k: v for k, v in data.items() if v is not None})


def refresh(http, client_id, refresh_token, **extra) -> httpx.Response:
    return token(http, {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id, **extra})


def tokens_for(gw, http, client_id: str | None = None, *, who=ALICE, server_id=SERVER, **params) -> tuple[str, dict]:
    client_id = client_id or public_client(http)["client_id"]
    code, verifier = code_for(gw, client_id, who=who, resource=server_resource(gw, server_id), **params)
    response = exchange(http, client_id, code, verifier)
    assert response.status_code == 200, response.text
    return client_id, response.json()


def error_of(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error_description"), str)
    return body["error"]


def mcp_call(http, access_token: str, server_id: str = SERVER) -> httpx.Response:
    return http.post(
        f"/mcp/{server_id}",
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json, text/event-stream"},
    )


def assert_invalid_token(gw, response: httpx.Response, server_id: str = SERVER) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{gw.url}/.well-known/oauth-protected-resource/mcp/{server_id}"' in challenge
    assert 'error="invalid_token"' in challenge


def assert_accepted(response: httpx.Response) -> None:
    """The bearer check passed (whatever the upstream then did)."""
    assert response.status_code not in (401, 403), (response.status_code, response.text)


def jwks_keys(http) -> dict[str, dict]:
    return {key["kid"]: key for key in http.get("/jwks.json").json()["keys"]}


def verify_with_jwks(gw, http, access_token: str) -> dict:
    key = jwks_keys(http)[jwt.get_unverified_header(access_token)["kid"]]
    return jwt.decode(access_token, jwt.PyJWK(key).key, algorithms=["RS256"], issuer=gw.url,
                      options={"verify_aud": False})


def redirect_query(response: httpx.Response) -> dict:
    assert response.status_code == 302, (response.status_code, response.text[:300])
    return dict(parse_qsl(urlsplit(response.headers["location"]).query))


def client_rows(gw) -> int:
    with sqlite3.connect(f"file:{gw.state_dir}/gateway.db?mode=ro", uri=True) as conn:
        return conn.execute("SELECT count(*) FROM clients").fetchone()[0]


# -------------------------------------------------------------------------- discovery


def test_prm_per_server_names_its_exact_resource(gw, http):
    response = http.get(f"/.well-known/oauth-protected-resource/mcp/{SERVER}")
    assert response.status_code == 200
    document = response.json()
    assert document["resource"] == f"{gw.url}/mcp/{SERVER}"
    assert document["authorization_servers"] == [gw.url]
    assert set(document["scopes_supported"]) == {"mcp:connect", "mcp:invoke"}
    assert document["resource_name"] == "Endpoint tests"
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp/"])
def test_root_prm_names_the_base_resource(gw, http, path):
    response = http.get(path)
    assert response.status_code == 200
    assert response.json()["resource"] == f"{gw.url}/mcp/"
    assert response.json()["authorization_servers"] == [gw.url]


def test_prm_of_unknown_server_is_a_404_json_error(http):
    response = http.get("/.well-known/oauth-protected-resource/mcp/srv_nothing_here")
    assert error_of(response, 404) == "not_found"


def test_as_metadata_is_the_same_at_both_paths_and_names_the_prm_issuer(gw, http):
    oauth = http.get("/.well-known/oauth-authorization-server")
    oidc = http.get("/.well-known/openid-configuration")
    assert oauth.status_code == oidc.status_code == 200
    assert oauth.json() == oidc.json()
    metadata = oauth.json()
    prm = http.get(f"/.well-known/oauth-protected-resource/mcp/{SERVER}").json()
    assert metadata["issuer"] == prm["authorization_servers"][0] == gw.url
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["response_types_supported"] == ["code"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    for name, path in [("authorization_endpoint", "/authorize"), ("token_endpoint", "/token"),
                       ("registration_endpoint", "/register"), ("revocation_endpoint", "/revoke"),
                       ("jwks_uri", "/jwks.json")]:
        assert metadata[name] == gw.url + path
    for response in (oauth, oidc):
        assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("path", ["/register", "/token", "/revoke", "/.well-known/oauth-authorization-server",
                                  f"/.well-known/oauth-protected-resource/mcp/{SERVER}", "/jwks.json"])
def test_cors_preflight_needs_no_authentication(http, path):
    response = http.options(path, headers={
        "Origin": "http://localhost:6274",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_jwks_publishes_rs256_public_keys_with_kid(http):
    keys = http.get("/jwks.json").json()["keys"]
    assert keys
    for key in keys:
        assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
        assert isinstance(key["kid"], str) and key["kid"]
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)  # nothing private


# --------------------------------------------------------------------------- /register


def test_register_accepts_cursors_three_mixed_redirect_uris_and_each_one_works(gw, http):
    response = register(http, {
        "client_name": "Cursor", "redirect_uris": CURSOR_URIS, "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
    })
    assert response.status_code == 201, response.text
    client = response.json()
    assert client["redirect_uris"] == CURSOR_URIS
    assert "client_secret" not in client

    async def main():
        async with ScriptedBrowser() as browser:
            results = []
            # The loopback one on another port than registered: Cursor picks a free port.
            for uri in [CURSOR_URIS[0], CURSOR_URIS[1], "http://localhost:50999/callback"]:
                result, verifier, query, _ = await walk(gw, browser, client["client_id"], redirect_uri=uri)
                results.append((uri, result, verifier, query))
            return results

    for uri, result, verifier, query in asyncio.run(main()):
        assert result["state"] == query["state"] and result["iss"] == gw.url, (uri, result)
        response = exchange(http, client["client_id"], result["code"], verifier, redirect_uri=uri)
        assert response.status_code == 200, (uri, response.text)


@pytest.mark.parametrize("uri", [
    "javascript:alert(1)",
    "JavaScript://example.com/%0Aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "file:///etc/passwd",
    "vbscript:msgbox(1)",
    "about:blank",
    "blob:https://app.example/0b6f3e4c",
])
def test_register_refuses_dangerous_schemes(http, uri):
    # Next to a good one: the whole registration is refused (RFC 7591 §3.2.2).
    response = register(http, {"redirect_uris": [REDIRECT, uri], "token_endpoint_auth_method": "none"})
    assert error_of(response) == "invalid_redirect_uri"


@pytest.mark.parametrize("uri", [
    "http://app.example/callback",  # http off loopback
    "http://192.168.1.20:8080/callback",
    "http://localhost.evil.example/callback",
    "https://app.example/callback#fragment",
    "http://127.0.0.1:3000/callback#",
    "/relative/callback",
    "https:///no-host",
    "https://user:pw@app.example/callback",
    "http://[::1/callback",  # malformed IPv6 literal
    "https://app.example:99999/callback",  # port out of range
    "https://app.example/call back",
    "",
])
def test_register_refuses_redirect_uris_outside_the_policy(http, uri):
    response = register(http, {"redirect_uris": [uri], "token_endpoint_auth_method": "none"})
    assert error_of(response) == "invalid_redirect_uri"


@pytest.mark.parametrize("uri", [
    "http://127.0.0.1/callback", "http://[::1]:8000/cb", "http://localhost:1234/",
    "https://claude.ai/api/mcp/auth_callback", "claude://oauth/callback", "vscode://vscode.github-authentication/did-authenticate",
    "com.example.app:/oauth2redirect",
])
def test_register_accepts_https_loopback_http_and_private_use_schemes(http, uri):
    response = register(http, {"redirect_uris": [uri], "token_endpoint_auth_method": "none"})
    assert response.status_code == 201, response.text
    assert response.json()["redirect_uris"] == [uri]


@pytest.mark.parametrize("uri, problem", [
    ("https://\u0430pp.example/cb", "xn--pp-6kc.example"),  # Cyrillic a: the A-label to write instead
    ("https://b\u00fccher.example/cb", "xn--bcher-kva.example"),
    ("https://app.example/\u202ecb", "must be ASCII"),  # right-to-left override
    ("https://app.example/caf\u00e9", "must be ASCII"),  # RFC 3986: percent-encode it (caf%C3%A9)
    ("https://app.example/\u200bcb", "must be ASCII"),  # zero-width space
    ("claude://\u0430pp/cb", "A-label"),
    ("https://%D0%B0pp.example/cb", "host must be a DNS name"),  # a browser decodes it to the look-alike
    ("https://app.example\\.evil.example/cb", "RFC 3986"),  # a browser reads \ as /
    ("https://app.example/cb?x=%zz", "RFC 3986"),
])
def test_register_refuses_redirect_uris_that_are_not_ascii_rfc3986_uris(gw, http, uri, problem):
    """A redirect URI is an RFC 3986 URI: ASCII, hosts as IDNA A-labels. The answer names
    the problem and which URI, in RFC 6749's error_description charset, without echoing it."""
    before = client_rows(gw)
    response = register(http, {"redirect_uris": [REDIRECT, uri], "token_endpoint_auth_method": "none"})
    assert error_of(response) == "invalid_redirect_uri"
    description = response.json()["error_description"]
    assert description.startswith("redirect_uris[1]: ") and problem in description, description
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]+", description) and "pp.example/cb" not in description
    assert client_rows(gw) == before


def test_register_accepts_the_a_label_and_percent_encoded_form(http):
    uris = ["https://xn--pp-6kc.example/cb", "https://app.example/caf%C3%A9?q=%E2%80%AE"]
    response = register(http, {"redirect_uris": uris, "token_endpoint_auth_method": "none"})
    assert response.status_code == 201, response.text
    assert response.json()["redirect_uris"] == uris


@pytest.mark.parametrize("path", ["/token", "/revoke"])
@pytest.mark.parametrize("name, shown", [
    ("\x1f", "a parameter is repeated"),
    ('"\\\u00e9\u202e', "a parameter is repeated"),
    ("client_id", "the parameter client_id is repeated"),
])
def test_repeated_parameter_errors_never_echo_unsafe_names(http, path, name, shown):
    """RFC 6749 §5.2: error_description is printable ASCII without '"' and '\\'; a plain
    parameter name is still named."""
    response = http.post(path, content=urlencode([(name, "x"), (name, "x")]),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert error_of(response) == "invalid_request"
    assert response.json()["error_description"] == shown


def test_error_description_rendering_replaces_what_rfc_6749_forbids():
    from handlers.base import error_description

    assert error_description('say "hi" \\ \x1f caf\u00e9 \u202e', "invalid_request") == "say ?hi? ? ? caf? ?"
    assert error_description("plain text: ok!", "x") == "plain text: ok!"
    assert error_description("", "invalid_request") == "invalid request"


@pytest.mark.parametrize("content, content_type", [
    (json.dumps({"redirect_uris": [REDIRECT]}).encode(), "application/x-www-form-urlencoded"),
    (json.dumps({"redirect_uris": [REDIRECT]}).encode(), "text/plain"),
    (b'{"redirect_uris": ["' + REDIRECT.encode() + b'"], "client_name": "\xff\xfe"}', "application/json"),
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b"[]", "application/json"),
    (b'"a string"', "application/json"),
    (b"null", "application/json"),
    (b"[" * 50000, "application/json"),  # nesting deep enough to exhaust a recursive parser
])
def test_register_refuses_malformed_bodies(http, content, content_type):
    response = register(http, content=content, content_type=content_type)
    assert error_of(response) == "invalid_client_metadata"


def test_register_refuses_an_oversized_body_with_413(http):
    body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", "software_id": "x" * 100_000}
    response = register(http, body)
    assert error_of(response, 413) == "invalid_client_metadata"


@pytest.mark.parametrize("change, error", [
    ({"redirect_uris": REDIRECT}, "invalid_redirect_uri"),
    ({"redirect_uris": []}, "invalid_redirect_uri"),
    ({"redirect_uris": [REDIRECT, 42]}, "invalid_redirect_uri"),
    ({"redirect_uris": None}, "invalid_redirect_uri"),
    ({"token_endpoint_auth_method": "private_key_jwt"}, "invalid_client_metadata"),
    ({"token_endpoint_auth_method": ["none"]}, "invalid_client_metadata"),
    ({"grant_types": ["client_credentials"]}, "invalid_client_metadata"),
    ({"grant_types": "authorization_code"}, "invalid_client_metadata"),
    ({"response_types": ["token"]}, "invalid_client_metadata"),
    ({"application_type": "desktop"}, "invalid_client_metadata"),
    ({"client_name": 7}, "invalid_client_metadata"),
    ({"client_name": "n" * 201}, "invalid_client_metadata"),
    ({"client_uri": "javascript:alert(1)"}, "invalid_client_metadata"),
    ({"logo_uri": "http://[::1"}, "invalid_client_metadata"),
    ({"contacts": "ops@example.com"}, "invalid_client_metadata"),
])
def test_register_refuses_wrong_typed_metadata_with_the_rfc7591_code(http, change, error):
    body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", **change}
    assert error_of(register(http, body)) == error


def test_refused_registrations_leave_no_row(gw, http):
    before = client_rows(gw)
    for body in ({"redirect_uris": [REDIRECT, "javascript:x"]}, {"redirect_uris": [REDIRECT], "grant_types": ["implicit"]},
                 {"redirect_uris": ["http://app.example/cb"]}):
        assert register(http, body).status_code == 400
    assert client_rows(gw) == before


def test_registration_201_has_the_registered_metadata(http):
    response = register(http, {
        "client_name": "Shape", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
        "application_type": "native", "client_uri": "https://app.example/", "software_id": "shape-app",
    })
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["client_id"], str) and len(body["client_id"]) >= 20
    assert isinstance(body["client_id_issued_at"], int) and abs(body["client_id_issued_at"] - time.time()) < 60
    assert body["client_name"] == "Shape"
    assert body["redirect_uris"] == [REDIRECT]
    assert body["token_endpoint_auth_method"] == "none"
    assert body["application_type"] == "native"
    assert body["response_types"] == ["code"]
    assert set(body["grant_types"]) == {"authorization_code", "refresh_token"}
    assert body["client_uri"] == "https://app.example/" and body["software_id"] == "shape-app"
    assert "client_secret" not in body and "client_secret_expires_at" not in body


def test_confidential_registration_returns_the_secret_once_and_stores_it_hashed(gw, http):
    response = register(http, {"client_name": "Web app", "redirect_uris": ["https://app.example/cb"]})
    assert response.status_code == 201
    body = response.json()
    assert body["token_endpoint_auth_method"] == "client_secret_basic"  # RFC 7591 default
    secret = body["client_secret"]
    assert len(secret) >= 32 and body["client_secret_expires_at"] == 0
    stored = b"".join(p.read_bytes() for p in gw.state_dir.rglob("*") if p.is_file())
    assert secret.encode() not in stored  # database, its WAL and the logs
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored  # what was stored instead


def test_register_rate_limit_is_per_address_and_allows_a_shared_egress_burst(http):
    body = {"client_name": "Claude", "redirect_uris": ["https://claude.ai/api/mcp/auth_callback"],
            "token_endpoint_auth_method": "none"}
    responses = [register(http, body, address="10.200.0.1") for _ in range(75)]
    statuses = [r.status_code for r in responses]
    assert statuses[:60] == [201] * 60
    limited = [r for r in responses if r.status_code == 429]
    assert limited, statuses
    assert int(limited[0].headers["retry-after"]) > 0
    assert register(http, body, address="10.200.0.2").status_code == 201


# -------------------------------------------------------------------------- /authorize


def test_authorize_unknown_client_is_an_html_page_never_a_redirect(http):
    for client_id in ("mcp_not_registered_here", "", "https://[broken/client.json", "https://client.example/"):
        query, _ = authorize_params(client_id)
        response = http.get("/authorize", params=query)
        assert response.status_code == 400
        assert "location" not in response.headers
        assert response.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("redirect_uri", [
    REDIRECT + "/",  # a trailing slash is another URI
    "http://127.0.0.1:9/other",
    "https://evil.example/callback",
    "http://localhost:9/callback",  # another loopback host name
    REDIRECT + "#fragment",
    "http://attacker@127.0.0.1:9/callback",
    "http://127.0.0.1:99999/callback",
    "http://[::1/callback",
])
def test_authorize_unregistered_redirect_uri_is_a_page_never_a_redirect(http, app, redirect_uri):
    query, _ = authorize_params(app["client_id"], redirect_uri)
    response = http.get("/authorize", params=query)
    assert response.status_code == 400, response.headers.get("location")
    assert "location" not in response.headers
    assert "text/html" in response.headers["content-type"]


@pytest.mark.parametrize("name", ["state", "client_id", "redirect_uri", "code_challenge"])
def test_authorize_repeated_parameter_is_a_page_never_a_redirect(http, app, name):
    query, _ = authorize_params(app["client_id"])
    pairs = [*query.items(), (name, query[name])]
    response = http.get("/authorize?" + urlencode(pairs))
    assert response.status_code == 400
    assert "location" not in response.headers


@pytest.mark.parametrize("change, error", [
    ({"code_challenge": None}, "invalid_request"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge_method": None}, "invalid_request"),
    ({"code_challenge": "too-short"}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"response_type": None}, "unsupported_response_type"),
    ({"resource": "https://elsewhere.example/mcp/x"}, "invalid_target"),
    ({"resource": "{gw}/mcp/srv_unknown"}, "invalid_target"),
    ({"resource": "{gw}/mcp/" + SERVER + "#frag"}, "invalid_target"),
    ({"resource": "http://[::1/mcp/"}, "invalid_target"),
    ({"prompt": "none login"}, "invalid_request"),
    ({"prompt": "dance"}, "invalid_request"),
    ({"scope": 'mcp:connect "quoted'}, "invalid_scope"),
    ({"prompt": "none"}, "login_required"),  # nobody is signed in in this client
])
def test_authorize_errors_go_back_to_the_client_with_state_and_iss(gw, http, app, change, error):
    change = {k: v.replace("{gw}", gw.url) if isinstance(v, str) else v for k, v in change.items()}
    query, _ = authorize_params(app["client_id"], **change)
    query = {k: v for k, v in query.items() if v is not None}
    response = http.get("/authorize", params=query)
    assert response.headers["location"].startswith(REDIRECT + "?")
    result = redirect_query(response)
    assert result["error"] == error
    assert result["state"] == query["state"]
    assert result["iss"] == gw.url
    assert result["error_description"]


def test_authorize_accepts_the_base_resource_or_none(gw, http, app):
    for resource in (f"{gw.url}/mcp/", f"{gw.url}/mcp", None):
        query, _ = authorize_params(app["client_id"], resource=resource)
        response = http.get("/authorize", params={k: v for k, v in query.items() if v is not None})
        assert response.status_code == 302
        assert response.headers["location"].startswith("/login?"), response.headers["location"]


def test_loopback_redirect_uri_matches_on_any_port(gw, http, app):
    other_port = "http://127.0.0.1:53124/callback"
    code, verifier = code_for(gw, app["client_id"], redirect_uri=other_port)
    response = exchange(http, app["client_id"], code, verifier, redirect_uri=other_port)
    assert response.status_code == 200, response.text


async def reach_consent(gw, idp, browser, url: str, who=ALICE):
    page = await browser.follow(url, stop_at=REDIRECT)
    if any(form.has_input("sub") for form in page.forms):
        idp.set_user(who["sub"], **{k: v for k, v in who.items() if k != "sub"})
        page = await browser.submit(page, "sub", {"sub": who["sub"]}, stop_at=REDIRECT)
    return page


def test_consent_page_names_the_client_cannot_be_framed_and_puts_approve_first(gw, idp, http):
    client = public_client(http, client_name="Consent <b>App</b>")
    query, _ = authorize_params(client["client_id"], resource=server_resource(gw))

    async def main():
        async with ScriptedBrowser() as browser:
            return await reach_consent(gw, idp, browser, f"{gw.url}/authorize?{urlencode(query)}")

    page = asyncio.run(main())
    assert page.status == 200 and page.url.startswith(gw.url + "/authorize/consent")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    (form,) = [f for f in page.post_forms() if "decision" in f.button_names()]
    assert [(b.name, b.value) for b in form.buttons][0] == ("decision", "approve")
    assert "Consent &lt;b&gt;App&lt;/b&gt;" in page.text and "<b>App</b>" not in page.text
    assert "Endpoint tests" in page.text  # the server named by `resource`
    assert "127.0.0.1" in page.text and "your own computer" in page.text  # loopback warning


def test_consent_post_needs_the_xsrf_token(gw, idp, http):
    query, _ = authorize_params(public_client(http)["client_id"])

    async def main():
        async with ScriptedBrowser() as browser:
            page = await reach_consent(gw, idp, browser, f"{gw.url}/authorize?{urlencode(query)}")
            (form,) = [f for f in page.post_forms() if "decision" in f.button_names()]
            assert "_xsrf" in dict(form.fields)
            data = [(n, v) for n, v in form.fields if n != "_xsrf"] + [("decision", "approve")]
            missing = await browser.request("POST", form.action, data=data)
            forged = await browser.request("POST", form.action, data=[*data, ("_xsrf", "2|00|00|00")])
            # The refused attempts consumed nothing: the real form still works.
            final = await browser.submit(page, form, button=("decision", "approve"), stop_at=REDIRECT)
            return missing, forged, final

    missing, forged, final = asyncio.run(main())
    for refused in (missing, forged):
        assert refused.status == 403 and refused.location is None
    assert "code" in final.redirect_query


def test_consent_is_remembered_and_prompt_consent_forces_it(gw, http):
    client = public_client(http)

    def consent_posts(requests):
        return [r for r in requests if r[0] == "POST" and "/authorize/consent" in r[1]]

    async def main():
        async with ScriptedBrowser() as browser:
            first = await walk(gw, browser, client["client_id"])
            second = await walk(gw, browser, client["client_id"])
            forced = await walk(gw, browser, client["client_id"], prompt="consent")
            return first, second, forced

    first, second, forced = asyncio.run(main())
    for result, *_ in (first, second, forced):
        assert "code" in result
    assert len(consent_posts(first[3])) == 1
    assert consent_posts(second[3]) == []
    assert len(consent_posts(forced[3])) == 1


def test_deny_returns_access_denied_with_state_and_iss(gw, http):
    client = public_client(http)

    async def main():
        async with ScriptedBrowser() as browser:
            denied = await walk(gw, browser, client["client_id"], consent="deny")
            # A denial is not remembered as an approval: the page comes again.
            again = await walk(gw, browser, client["client_id"], consent="deny")
            return denied, again

    for result, _, query, _ in asyncio.run(main()):
        assert result["error"] == "access_denied"
        assert result["state"] == query["state"] and result["iss"] == gw.url
        assert "code" not in result


def test_sign_in_cookie_is_httponly_and_samesite_lax(gw, idp, http, app):
    query, _ = authorize_params(app["client_id"])

    async def main():
        async with ScriptedBrowser() as browser:
            page = await browser.follow(f"{gw.url}/authorize?{urlencode(query)}", stop_at=REDIRECT)
            idp.set_user(ALICE["sub"], email=ALICE["email"], email_verified=True, name="Alice")
            page = await browser.submit(page, "sub", {"sub": ALICE["sub"]}, stop_at=gw.url + "/oauth/callback")
            return await browser.request("GET", page.location)

    callback = asyncio.run(main())
    assert callback.status == 302
    (cookie,) = [c for c in callback.headers.get_list("set-cookie") if c.startswith("mcpgw_signin=")]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes
    assert "samesite=lax" in attributes
    assert "path=/" in attributes


def test_prompt_login_sends_the_user_to_the_idp_again(gw, idp, http, app):
    idp_authorize = idp.authorization_endpoint

    def idp_visits(requests):
        return [url for method, url, _ in requests if method == "GET" and url.startswith(idp_authorize)]

    async def main():
        async with ScriptedBrowser() as browser:
            first = await walk(gw, browser, app["client_id"])
            quiet = await walk(gw, browser, app["client_id"])
            forced = await walk(gw, browser, app["client_id"], prompt="login")
            return first, quiet, forced

    first, quiet, forced = asyncio.run(main())
    assert "code" in quiet[0] and "code" in forced[0]
    assert len(idp_visits(first[3])) == 1
    assert idp_visits(quiet[3]) == []  # signed in: the cookie is enough
    (visit,) = idp_visits(forced[3])
    assert dict(parse_qsl(urlsplit(visit).query))["prompt"] == "login"


def test_prompt_login_cannot_be_skipped_by_going_straight_to_consent(gw, http, app):
    """With prompt=login, an older sign-in must not be enough, even when the browser skips
    the trip to the IdP and opens the consent step itself."""

    async def main():
        async with ScriptedBrowser() as browser:
            await walk(gw, browser, app["client_id"])  # signed in, consent remembered
            query, _ = authorize_params(app["client_id"], prompt="login")
            response = await browser.request("GET", f"{gw.url}/authorize?{urlencode(query)}")
            consent_url = dict(parse_qsl(urlsplit(response.location).query))["next"]
            return await browser.request("GET", gw.url + consent_url)

    skipped = asyncio.run(main())
    assert not (skipped.location or "").startswith(REDIRECT), skipped.location
    assert skipped.location and "/login" in skipped.location


# ------------------------------------------------------------------------------ /token


def test_token_refuses_a_json_body(http, app):
    response = http.post("/token", json={"grant_type": "authorization_code", "client_id": app["client_id"]})
    assert response.headers["cache-control"] == "no-store"
    assert error_of(response) == "invalid_request"


@pytest.mark.parametrize("content", [
    b"grant_type=authorization_code&grant_type=refresh_token&client_id={cid}",
    b"grant_type=refresh_token&client_id={cid}&client_id={cid}&refresh_token=x",
    b"grant_type=refresh_token&client_id={cid}&refresh_token=\xff\xfe",
    b"grant_type=refresh_token&client_id={cid}&refresh_token=%ff%fe",
    b"grant_type=refresh_token&client_id={cid}&refresh_token=a%00b",
])
def test_token_refuses_repeated_or_undecodable_parameters(http, app, content):
    response = token(http, None, content=content.replace(b"{cid}", app["client_id"].encode()))
    assert error_of(response) == "invalid_request"


@pytest.mark.parametrize("grant_type", ["password", "client_credentials", "urn:ietf:params:oauth:grant-type:device_code"])
def test_token_unknown_grant_type(http, app, grant_type):
    response = token(http, {"grant_type": grant_type, "client_id": app["client_id"]})
    assert error_of(response) == "unsupported_grant_type"


@pytest.mark.parametrize("data", [
    {"code": "abc", "code_verifier": "v" * 43},  # no grant_type
    {"grant_type": "authorization_code", "code_verifier": "v" * 43},
    {"grant_type": "authorization_code", "code": "abc"},
    {"grant_type": "authorization_code", "code": "", "code_verifier": "v" * 43},
    {"grant_type": "refresh_token"},
])
def test_token_missing_parameters_are_invalid_request(http, app, data):
    assert error_of(token(http, {**data, "client_id": app["client_id"]})) == "invalid_request"


def test_pkce_verifier_of_wrong_form_is_invalid_request_and_does_not_burn_the_code(gw, http, app):
    code, verifier = code_for(gw, app["client_id"])
    for bad in ("short", "a" * 42, "a" * 129, "a" * 42 + "!", "a" * 42 + "é", "a" * 42 + " "):
        assert error_of(exchange(http, app["client_id"], code, bad)) == "invalid_request", bad
    assert exchange(http, app["client_id"], code, verifier).status_code == 200


def test_pkce_verifier_of_wrong_value_is_invalid_grant(gw, http, app):
    code, _ = code_for(gw, app["client_id"])
    assert error_of(exchange(http, app["client_id"], code, pkce()[0])) == "invalid_grant"


def test_code_issued_to_another_client_is_invalid_grant(gw, http, app):
    other = public_client(http)
    code, verifier = code_for(gw, app["client_id"])
    assert error_of(exchange(http, other["client_id"], code, verifier)) == "invalid_grant"


@pytest.mark.parametrize("redirect_uri", [REDIRECT + "/", "http://127.0.0.1:10/callback", "https://app.example/cb"])
def test_redirect_uri_differing_from_the_authorization_is_invalid_grant(gw, http, app, redirect_uri):
    code, verifier = code_for(gw, app["client_id"])
    assert error_of(exchange(http, app["client_id"], code, verifier, redirect_uri=redirect_uri)) == "invalid_grant"


def test_replayed_code_is_refused_and_revokes_what_it_issued(gw, http, app):
    code, verifier = code_for(gw, app["client_id"], resource=server_resource(gw))
    first = exchange(http, app["client_id"], code, verifier)
    assert first.status_code == 200
    issued = first.json()
    assert_accepted(mcp_call(http, issued["access_token"]))
    assert error_of(exchange(http, app["client_id"], code, verifier)) == "invalid_grant"
    assert error_of(refresh(http, app["client_id"], issued["refresh_token"])) == "invalid_grant"
    assert_invalid_token(gw, mcp_call(http, issued["access_token"]))


def test_unknown_client_is_401_invalid_client(http):
    for data in ({"client_id": "mcp_gone_after_restart"}, {}):
        response = token(http, {"grant_type": "authorization_code", "code": "c", "code_verifier": "v" * 43, **data})
        assert error_of(response, 401) == "invalid_client"


def test_confidential_client_authenticates_with_basic(gw, http):
    body = register(http, {"client_name": "Basic app", "redirect_uris": [REDIRECT]}).json()
    assert body["token_endpoint_auth_method"] == "client_secret_basic"
    code, verifier = code_for(gw, body["client_id"])
    # Without the secret: refused.
    assert error_of(exchange(http, body["client_id"], code, verifier), 401) == "invalid_client"
    code, verifier = code_for(gw, body["client_id"])
    data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": REDIRECT}
    response = token(http, data, auth=(body["client_id"], body["client_secret"]))
    assert response.status_code == 200, response.text
    again = token(http, {"grant_type": "refresh_token", "refresh_token": response.json()["refresh_token"]},
                  auth=(body["client_id"], body["client_secret"]))
    assert again.status_code == 200, again.text


def test_confidential_client_authenticates_with_post(gw, http):
    body = register(http, {"client_name": "Post app", "redirect_uris": [REDIRECT],
                           "token_endpoint_auth_method": "client_secret_post"}).json()
    code, verifier = code_for(gw, body["client_id"])
    response = exchange(http, body["client_id"], code, verifier, client_secret=body["client_secret"])
    assert response.status_code == 200, response.text


def test_wrong_client_secret_is_401_with_basic_challenge(gw, http):
    body = register(http, {"client_name": "Secret app", "redirect_uris": [REDIRECT]}).json()
    data = {"grant_type": "refresh_token", "refresh_token": "whatever"}
    basic = token(http, data, auth=(body["client_id"], body["client_secret"] + "x"))
    assert error_of(basic, 401) == "invalid_client"
    assert basic.headers["www-authenticate"].lower().startswith("basic")
    posted = token(http, {**data, "client_id": body["client_id"], "client_secret": "wrong"})
    assert error_of(posted, 401) == "invalid_client"
    public = public_client(http)
    with_secret = token(http, {**data, "client_id": public["client_id"], "client_secret": "invented"})
    assert error_of(with_secret, 401) == "invalid_client"


def test_token_response_shape_and_claims(gw, http, app):
    code, verifier = code_for(gw, app["client_id"], resource=server_resource(gw))
    response = exchange(http, app["client_id"], code, verifier)
    assert response.status_code == 200
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["refresh_token"] and set(body["scope"].split()) >= {"mcp:connect", "mcp:invoke"}
    claims = verify_with_jwks(gw, http, body["access_token"])
    assert claims["aud"] == server_resource(gw)
    assert claims["sub"] == ALICE["sub"] and claims["email"] == ALICE["email"]
    assert claims["client_id"] == app["client_id"]
    assert jwt.get_unverified_header(body["access_token"])["kid"] in jwks_keys(http)


# ---------------------------------------------------------------------------- refresh


def test_refresh_rotates_and_a_retry_in_the_grace_window_gets_the_same_successor(gw, http):
    client_id, issued = tokens_for(gw, http)
    first = refresh(http, client_id, issued["refresh_token"])
    assert first.status_code == 200
    successor = first.json()["refresh_token"]
    assert successor != issued["refresh_token"]
    assert first.json()["access_token"] != issued["access_token"]
    retry = refresh(http, client_id, issued["refresh_token"])  # the first answer was "lost"
    assert retry.status_code == 200
    assert retry.json()["refresh_token"] == successor
    following = refresh(http, client_id, successor)
    assert following.status_code == 200 and following.json()["refresh_token"] not in (successor, issued["refresh_token"])


def test_four_concurrent_refreshes_of_one_token_all_succeed_with_one_successor(gw, http):
    client_id, issued = tokens_for(gw, http)
    data = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"], "client_id": client_id}

    async def burst():
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as client:
            return await asyncio.gather(*(client.post("/token", data=data) for _ in range(4)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200, 200, 200, 200], [r.text for r in responses]
    successors = {r.json()["refresh_token"] for r in responses}
    assert len(successors) == 1
    (successor,) = successors
    assert refresh(http, client_id, successor).status_code == 200


def test_reuse_after_the_successor_was_used_revokes_the_whole_family(gw, http):
    client_id, issued = tokens_for(gw, http)
    rt1 = refresh(http, client_id, issued["refresh_token"]).json()["refresh_token"]
    second = refresh(http, client_id, rt1)
    assert second.status_code == 200
    rt2, at2 = second.json()["refresh_token"], second.json()["access_token"]
    assert_accepted(mcp_call(http, at2))
    assert error_of(refresh(http, client_id, issued["refresh_token"])) == "invalid_grant"
    assert error_of(refresh(http, client_id, rt2)) == "invalid_grant"
    assert error_of(refresh(http, client_id, rt1)) == "invalid_grant"
    assert_invalid_token(gw, mcp_call(http, at2))


def test_refresh_token_of_another_client_is_invalid_grant(gw, http):
    client_id, issued = tokens_for(gw, http)
    other = public_client(http)
    assert error_of(refresh(http, other["client_id"], issued["refresh_token"])) == "invalid_grant"
    assert refresh(http, client_id, issued["refresh_token"]).status_code == 200  # unharmed


def test_refresh_scope_may_narrow_but_not_widen(gw, http):
    client_id, issued = tokens_for(gw, http)
    narrowed = refresh(http, client_id, issued["refresh_token"], scope="mcp:connect")
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["scope"] == "mcp:connect"
    assert verify_with_jwks(gw, http, narrowed.json()["access_token"])["scope"] == "mcp:connect"

    client_id, issued = tokens_for(gw, http, scope="mcp:connect")
    assert issued["scope"] == "mcp:connect"
    for wider in ("mcp:connect mcp:invoke", "mcp:invoke", "admin"):
        assert error_of(refresh(http, client_id, issued["refresh_token"], scope=wider)) == "invalid_scope"
    # A refused refresh leaves the token as it was.
    assert refresh(http, client_id, issued["refresh_token"]).status_code == 200


def test_refresh_is_refused_once_the_user_is_removed_from_the_grant(gw, http):
    gw.cli("servers", "add", "--name", "Shared", "--upstream", "http://127.0.0.1:9/mcp",
           "--owner", "carol@example.com", "--id", "srv_shared")
    gw.cli("grants", "add", "srv_shared", "--email", BOB["email"])
    client_id, issued = tokens_for(gw, http, who=BOB, server_id="srv_shared")
    current = refresh(http, client_id, issued["refresh_token"])
    assert current.status_code == 200
    gw.cli("grants", "remove", "srv_shared", "--email", BOB["email"])
    # Another process changed the rules: the gateway sees it within its cache bound (3 s).
    deadline = time.monotonic() + 8
    while current.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.25)
        current = refresh(http, client_id, current.json()["refresh_token"])
    assert error_of(current) == "invalid_grant"


# ----------------------------------------------------------------------------- /revoke


def revoke(http, client_id, value, **extra) -> httpx.Response:
    return http.post("/revoke", data={"token": value, "client_id": client_id, **extra})


def test_revoking_a_refresh_token_revokes_its_family(gw, http):
    client_id, issued = tokens_for(gw, http)
    response = revoke(http, client_id, issued["refresh_token"], token_type_hint="refresh_token")
    assert response.status_code == 200
    assert error_of(refresh(http, client_id, issued["refresh_token"])) == "invalid_grant"
    assert_invalid_token(gw, mcp_call(http, issued["access_token"]))


def test_revoking_an_access_token_makes_the_proxy_refuse_it(gw, http):
    client_id, issued = tokens_for(gw, http)
    assert_accepted(mcp_call(http, issued["access_token"]))
    assert revoke(http, client_id, issued["access_token"], token_type_hint="access_token").status_code == 200
    assert_invalid_token(gw, mcp_call(http, issued["access_token"]))
    # Only that access token: the refresh token still works.
    assert refresh(http, client_id, issued["refresh_token"]).status_code == 200


def test_revoke_finds_a_refresh_token_despite_a_wrong_hint(gw, http):
    client_id, issued = tokens_for(gw, http)
    assert revoke(http, client_id, issued["refresh_token"], token_type_hint="access_token").status_code == 200
    assert error_of(refresh(http, client_id, issued["refresh_token"])) == "invalid_grant"


def test_revoke_unknown_token_is_200_and_other_clients_tokens_are_untouched(gw, http, app):
    assert revoke(http, app["client_id"], "never-issued").status_code == 200
    client_id, issued = tokens_for(gw, http)
    assert revoke(http, app["client_id"], issued["refresh_token"]).status_code == 200
    assert revoke(http, app["client_id"], issued["access_token"]).status_code == 200
    assert_accepted(mcp_call(http, issued["access_token"]))
    assert refresh(http, client_id, issued["refresh_token"]).status_code == 200


def test_revoke_errors(http, app):
    assert error_of(http.post("/revoke", data={"client_id": app["client_id"]})) == "invalid_request"
    assert error_of(revoke(http, "mcp_unknown", "x"), 401) == "invalid_client"
    assert error_of(http.post("/revoke", json={"token": "x", "client_id": app["client_id"]})) == "invalid_request"
    body = register(http, {"client_name": "Revoking app", "redirect_uris": [REDIRECT]}).json()
    wrong = http.post("/revoke", data={"token": "x"}, auth=(body["client_id"], "wrong"))
    assert error_of(wrong, 401) == "invalid_client"
    assert wrong.headers["www-authenticate"].lower().startswith("basic")


# ------------------------------------------------------------------ bearer check at /mcp


def forge(claims: dict, header: dict, signing_input_key=None) -> str:
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    signature = b""
    if signing_input_key is not None:
        signature = hmac.new(signing_input_key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def test_forged_access_tokens_are_refused_with_401(gw, http):
    _, issued = tokens_for(gw, http)
    genuine = issued["access_token"]
    assert_accepted(mcp_call(http, genuine))
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    head, body, signature = genuine.split(".")

    tampered_claims = {**claims, "sub": "someone-else", "email": "mallory@example.com"}
    tampered = f"{head}.{b64url(json.dumps(tampered_claims).encode())}.{signature}"
    alg_none = forge(claims, {"alg": "none", "typ": "at+jwt", "kid": header["kid"]})
    public_pem = jwt.PyJWK(jwks_keys(http)[header["kid"]]).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs256 = forge(claims, {"alg": "HS256", "typ": "at+jwt", "kid": header["kid"]}, public_pem)
    foreign_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    foreign = jwt.encode(claims, foreign_key, algorithm="RS256", headers={"kid": header["kid"], "typ": "at+jwt"})
    unknown_kid = jwt.encode(claims, foreign_key, algorithm="RS256", headers={"kid": "not-a-kid"})
    for forged in (tampered, alg_none, hs256, foreign, unknown_kid, "not-a-jwt", genuine + "x"):
        assert_invalid_token(gw, mcp_call(http, forged))


def test_missing_bearer_gets_the_discovery_challenge(gw, http):
    response = http.post(f"/mcp/{SERVER}", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 401
    assert f'resource_metadata="{gw.url}/.well-known/oauth-protected-resource/mcp/{SERVER}"' in (
        response.headers["www-authenticate"]
    )


# ---------------------------------------------------------------------- key rotation


def test_key_rotation_keeps_old_tokens_valid_and_signs_new_ones_with_the_new_kid(gateway_factory):
    gateway = gateway_factory("rotation")
    gateway.add_server("http://127.0.0.1:9/mcp", ALICE["email"], "Rotation", "--id", SERVER)
    with httpx.Client(base_url=gateway.url, trust_env=False, timeout=20) as client:
        client_id, issued = tokens_for(gateway, client)
        old_kid = jwt.get_unverified_header(issued["access_token"])["kid"]
        new_kid = gateway.cli("keys", "rotate").stdout.strip().splitlines()[-1]
        assert new_kid != old_kid
        # The serving instance keeps accepting what it issued.
        assert_accepted(mcp_call(client, issued["access_token"]))
        # A restarted (or any other) instance signs with the new key and still verifies the old one.
        gateway.stop()
        gateway.start()
        assert {old_kid, new_kid} <= set(jwks_keys(client))
        assert_accepted(mcp_call(client, issued["access_token"]))
        refreshed = refresh(client, client_id, issued["refresh_token"]).json()
        assert jwt.get_unverified_header(refreshed["access_token"])["kid"] == new_kid
        verify_with_jwks(gateway, client, refreshed["access_token"])
        assert_accepted(mcp_call(client, refreshed["access_token"]))
    statuses = {row["kid"]: row["status"] for row in gateway.cli_json("keys", "list")}
    assert statuses == {old_kid: "retiring", new_kid: "active"}
