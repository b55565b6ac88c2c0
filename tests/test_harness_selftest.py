"""Self-tests of the test harness, without the gateway: the IdP process, the scripted
browser and the SDK OAuth rig, each against a real peer on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import jwt
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import uvicorn
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    construct_redirect_uri,
)
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from services.authserver.identity import OidcIdentityProvider
from tests.support.browser import BrowserError, ScriptedBrowser, parse_forms
from tests.support.idp import IdpClient, IdpProcess
from tests.support.mcp_oauth import (
    AuthorizationRefused,
    connect,
    expire_access_token,
    make_oauth_rig,
    obtain_tokens,
    refresh_now,
)
from tests.support.ports import bind_unused_port

# Port 9 (discard): nothing listens, the browser stops at the redirect before any request.
REDIRECT_URI = "http://127.0.0.1:9/oauth/callback"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdpProcess]:
    with IdpProcess() as process:
        yield process


@pytest.fixture(scope="module")
def idp_client(idp: IdpProcess) -> IdpClient:
    return idp.register_client([REDIRECT_URI])


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        .rstrip(b"=")
        .decode()
    )
    return verifier, challenge


def _authorize_url(
    idp: IdpProcess, client: IdpClient, *, state: str, nonce: str, challenge: str
) -> str:
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid email profile",
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return f"{idp.authorization_endpoint}?{urlencode(query)}"


async def _exchange(
    idp: IdpProcess, client: IdpClient, code: str, verifier: str
) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.post(
            idp.token_endpoint,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
            },
            auth=(client.client_id, client.client_secret),
        )
    assert response.status_code == 200, response.text
    return response.json()


def _verify_id_token(
    idp: IdpProcess, client: IdpClient, id_token: str
) -> dict[str, Any]:
    # The stock provider signs with its one key and names no `kid` (OIDC Core §10.1).
    (key,) = jwt.PyJWKSet.from_dict(idp.jwks()).keys
    assert "kid" not in jwt.get_unverified_header(id_token)
    return jwt.decode(
        id_token,
        key.key,
        algorithms=["RS256"],
        audience=client.client_id,
        issuer=idp.issuer,
    )


async def _sign_in_at_idp(
    idp: IdpProcess, client: IdpClient, idp_login: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any], str]:
    """The whole code flow against the IdP; returns (redirect query, ID-token claims, nonce)."""
    verifier, challenge = _pkce()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    async with ScriptedBrowser() as browser:
        result = await browser.authorize(
            _authorize_url(idp, client, state=state, nonce=nonce, challenge=challenge),
            stop_at=REDIRECT_URI,
            idp_login=idp_login,
        )
    assert result["state"] == state
    tokens = await _exchange(idp, client, result["code"], verifier)
    claims = _verify_id_token(idp, client, tokens["id_token"])
    # The gateway's own verifier accepts the stock provider's token as it is.
    verifier = OidcIdentityProvider(idp.issuer, client.client_id, client.client_secret, REDIRECT_URI)
    verified = await verifier.verify_id_token(tokens["id_token"], nonce)
    assert (verified.sub, verified.email) == (claims["sub"], claims.get("email", "").lower())
    return result, claims, nonce


# -- the IdP process -------------------------------------------------------------------


def test_idp_discovery_names_its_loopback_issuer(idp: IdpProcess) -> None:
    assert idp.issuer.startswith("http://127.0.0.1:")
    assert idp.discovery["issuer"] == idp.issuer
    assert idp.token_endpoint == f"{idp.issuer}/oauth2/token"


@pytest.mark.anyio
async def test_workspace_user_claims_reach_the_id_token(
    idp: IdpProcess, idp_client: IdpClient
) -> None:
    idp.set_user(
        "u-workspace",
        email="ann@corp.example",
        email_verified=True,
        hd="corp.example",
        name="Ann",
    )

    _, claims, nonce = await _sign_in_at_idp(idp, idp_client, {"sub": "u-workspace"})

    assert claims["sub"] == "u-workspace"
    assert claims["email"] == "ann@corp.example"
    assert claims["email_verified"] is True
    assert claims["hd"] == "corp.example"
    assert claims["name"] == "Ann"
    assert claims["nonce"] == nonce


@pytest.mark.anyio
async def test_browser_sets_claims_of_an_unverified_consumer_account(
    idp: IdpProcess, idp_client: IdpClient
) -> None:
    login = {"sub": "u-consumer", "email": "bob@corp.example", "email_verified": False}

    _, claims, _ = await _sign_in_at_idp(idp, idp_client, login)

    assert claims["sub"] == "u-consumer"
    assert claims["email_verified"] is False
    assert "hd" not in claims


@pytest.mark.anyio
async def test_idp_refuses_an_unregistered_client(
    idp: IdpProcess, idp_client: IdpClient
) -> None:
    bogus = IdpClient("not-registered", "x", (REDIRECT_URI,), "client_secret_basic")
    _, challenge = _pkce()
    async with ScriptedBrowser() as browser:
        with pytest.raises(BrowserError) as failure:
            await browser.authorize(
                _authorize_url(idp, bogus, state="s", nonce="n", challenge=challenge),
                stop_at=REDIRECT_URI,
                idp_login={"sub": "u-1"},
            )
    assert failure.value.page is not None and failure.value.page.status == 400


@pytest.mark.anyio
async def test_idp_deny_comes_back_as_access_denied(
    idp: IdpProcess, idp_client: IdpClient
) -> None:
    _, challenge = _pkce()
    async with ScriptedBrowser() as browser:
        result = await browser.authorize(
            _authorize_url(idp, idp_client, state="s", nonce="n", challenge=challenge),
            stop_at=REDIRECT_URI,
            idp_action="deny",
        )
    assert result["error"] == "access_denied"


# -- form parsing -------------------------------------------------------------------------


def test_parse_forms_reads_what_a_browser_would_send() -> None:
    html = """
    <form method="post" action="../consent">
      <input type="hidden" name="_xsrf" value="X">
      <input name="req" type="hidden" value="R">
      <input type="checkbox" name="remember" value="yes" checked>
      <input type="checkbox" name="spam" value="yes">
      <select name="lang"><option value="en">E</option><option value="fr" selected>F</option></select>
      <textarea name="note">hi</textarea>
      <button name="decision" value="approve">Allow</button>
      <button name="decision" value="deny">Deny</button>
    </form>
    <form><input name="q"></form>
    """
    consent, search = parse_forms(html, "http://gw.test/oauth/authorize?x=1")

    assert consent.action == "http://gw.test/consent"
    assert consent.method == "POST"
    assert consent.fields == [
        ("_xsrf", "X"),
        ("req", "R"),
        ("remember", "yes"),
        ("lang", "fr"),
        ("note", "hi"),
    ]
    assert [(b.name, b.value, b.label) for b in consent.buttons] == [
        ("decision", "approve", "Allow"),
        ("decision", "deny", "Deny"),
    ]
    assert (
        search.method == "GET" and search.action == "http://gw.test/oauth/authorize?x=1"
    )


# -- the walker against pages that follow the gateway's page contract ----------------------


class _SignIn(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(
            f'<form method="post">{self.xsrf_form_html()}'
            f'<input type="hidden" name="next" value="{tornado.escape.xhtml_escape(self.get_argument("next"))}">'
            '<input type="email" name="email"><button type="submit">Sign in</button></form>'
        )

    def post(self) -> None:
        self.set_signed_cookie("user", self.get_argument("email"))
        self.redirect(self.get_argument("next"))


class _Authorize(tornado.web.RequestHandler):
    def get(self) -> None:
        if not self.get_signed_cookie("user"):
            self.redirect("/signin?" + urlencode({"next": self.request.uri}))
            return
        req = tornado.escape.xhtml_escape(self.request.query)
        self.write(
            f'<form method="post" action="/consent">{self.xsrf_form_html()}'
            f'<input type="hidden" name="req" value="{req}">'
            '<button name="decision" value="approve">Approve</button>'
            '<button name="decision" value="deny">Deny</button></form>'
        )


class _Consent(tornado.web.RequestHandler):
    def post(self) -> None:
        query = dict(parse_qsl(self.get_argument("req")))
        user = (self.get_signed_cookie("user") or b"").decode()
        if self.get_argument("decision") == "approve":
            answer = {
                "code": f"code-for-{user}",
                "state": query["state"],
                "iss": "http://gw.test",
            }
        else:
            answer = {"error": "access_denied", "state": query["state"]}
        self.redirect(f"{query['redirect_uri']}?{urlencode(answer)}")


@asynccontextmanager
async def _page_server() -> AsyncIterator[str]:
    app = tornado.web.Application(
        [(r"/signin", _SignIn), (r"/authorize", _Authorize), (r"/consent", _Consent)],
        xsrf_cookies=True,
        cookie_secret=secrets.token_hex(16),
    )
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    try:
        yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    finally:
        server.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("decision", ["approve", "deny"])
async def test_walker_signs_in_and_decides_with_xsrf_cookies(decision: str) -> None:
    async with _page_server() as base, ScriptedBrowser() as browser:
        url = f"{base}/authorize?" + urlencode(
            {"redirect_uri": REDIRECT_URI, "state": "st"}
        )
        result = await browser.authorize(
            url, stop_at=REDIRECT_URI, email="ann@corp.example", consent=decision
        )
        # A second authorization reuses the sign-in cookie: straight to consent.
        again = await browser.authorize(url, stop_at=REDIRECT_URI, consent=decision)

    if decision == "approve":
        assert result == {
            "code": "code-for-ann@corp.example",
            "state": "st",
            "iss": "http://gw.test",
        }
    else:
        assert result == {"error": "access_denied", "state": "st"}
    assert again == result
    assert [status for method, _, status in browser.history if method == "POST"] == [
        302,
        302,
        302,
    ]


# -- the SDK OAuth rig against the SDK's own authorization server ----------------------------


class _AutoApprovingProvider:
    """An in-memory ``OAuthAuthorizationServerProvider`` that approves every request at once."""

    def __init__(self) -> None:
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.token_requests: list[str] = []  # grant kinds, in order

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        self.clients[client_info.client_id] = client_info

    async def authorize(
        self, client: OAuthClientInformationFull, params: AuthorizationParams
    ) -> str:
        code = secrets.token_urlsafe(16)
        self.codes[code] = AuthorizationCode(
            code=code,
            scopes=params.scopes or [],
            expires_at=time.time() + 300,
            client_id=client.client_id or "",
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
            subject="u-1",
        )
        return construct_redirect_uri(
            str(params.redirect_uri), code=code, state=params.state
        )

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, code: str
    ) -> AuthorizationCode | None:
        return self.codes.get(code)

    def _issue(
        self, client_id: str, scopes: list[str], resource: str | None
    ) -> OAuthToken:
        access, refresh = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        self.access[access] = AccessToken(
            token=access,
            client_id=client_id,
            scopes=scopes,
            expires_at=int(time.time()) + 3600,
            resource=resource,
        )
        self.refresh[refresh] = RefreshToken(
            token=refresh, client_id=client_id, scopes=scopes, resource=resource
        )
        return OAuthToken(
            access_token=access,
            expires_in=3600,
            refresh_token=refresh,
            scope=" ".join(scopes),
        )

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        self.token_requests.append("authorization_code")
        del self.codes[authorization_code.code]
        return self._issue(
            authorization_code.client_id,
            authorization_code.scopes,
            authorization_code.resource,
        )

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> RefreshToken | None:
        return self.refresh.get(refresh_token)

    async def exchange_refresh_token(
        self,
        client: OAuthClientInformationFull,
        refresh_token: RefreshToken,
        scopes: list[str],
    ) -> OAuthToken:
        self.token_requests.append("refresh_token")
        del self.refresh[refresh_token.token]
        return self._issue(
            refresh_token.client_id,
            scopes or refresh_token.scopes,
            refresh_token.resource,
        )

    async def load_access_token(self, token: str) -> AccessToken | None:
        return self.access.get(token)

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        self.access.pop(token.token, None)
        self.refresh.pop(token.token, None)


@asynccontextmanager
async def _sdk_oauth_server() -> AsyncIterator[tuple[str, _AutoApprovingProvider]]:
    sock, port = bind_unused_port()
    base = f"http://127.0.0.1:{port}"
    provider = _AutoApprovingProvider()
    server = MCPServer(
        "harness-selftest",
        auth_server_provider=provider,
        auth=AuthSettings(
            issuer_url=base,
            resource_server_url=f"{base}/mcp",
            client_registration_options=ClientRegistrationOptions(
                enabled=True, valid_scopes=["mcp"]
            ),
            required_scopes=["mcp"],
            validate_token_resource=False,
        ),
    )

    @server.tool()
    def echo(text: str) -> str:
        return text

    config = uvicorn.Config(server.streamable_http_app(), log_level="warning")
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        while not uv.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield f"{base}/mcp", provider
    finally:
        uv.should_exit = True
        await task


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_rig_runs_the_whole_flow_and_refreshes(mode: str) -> None:
    async with _sdk_oauth_server() as (url, as_provider), ScriptedBrowser() as browser:
        rig = make_oauth_rig(url, browser)
        async with connect(rig, mode=mode) as client:
            result = await client.call_tool("echo", {"text": "hi"})
            assert result.content[0].text == "hi"  # type: ignore[union-attr]
            first = rig.tokens
            assert first is not None and first.refresh_token

            # The SDK way: an expired token is refreshed before the next request.
            expire_access_token(rig)
            await client.call_tool("echo", {"text": "again"})
            assert (
                rig.tokens is not None and rig.tokens.access_token != first.access_token
            )

        (authorization_url,) = rig.authorizer.authorization_urls
        query = dict(parse_qsl(urlsplit(authorization_url).query))
        assert query["resource"] == url and query["code_challenge_method"] == "S256"
        assert query["scope"] == "mcp"
        assert (
            rig.client_info is not None and rig.client_info.application_type == "native"
        )

        response = await refresh_now(rig)
        assert response.status_code == 200
        assert as_provider.token_requests == [
            "authorization_code",
            "refresh_token",
            "refresh_token",
        ]
        assert len(rig.storage.token_history) == 3

        # A stored registration and tokens are reused by a new rig: no second authorization.
        reuse = make_oauth_rig(url, browser, storage=rig.storage)
        assert (
            await obtain_tokens(reuse, mode=mode)
        ).access_token == rig.storage.token_history[-1].access_token
        assert reuse.authorizer.authorization_urls == []


@pytest.mark.anyio
async def test_callback_handler_raises_on_an_error_redirect() -> None:
    async with ScriptedBrowser() as browser:
        rig = make_oauth_rig("http://127.0.0.1:9/mcp", browser)
        rig.authorizer._pending = {"error": "access_denied", "state": "s"}
        with pytest.raises(AuthorizationRefused) as refused:
            await rig.authorizer.callback_handler()
    assert refused.value.result["error"] == "access_denied"
