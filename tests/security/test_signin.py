"""Sign-in and browser sessions (issue 7, findings 1-6 and 23), from the outside.

The IdP leg runs against the stock OpenID provider process (oidc-provider-mock, no
`kid` in its ID tokens) and, where a provider's behaviour must vary, against the one
varied provider (`kid` in the header) or a tiny provider served from this process whose
key set and clocks the test chooses. Every refusal is asserted exactly, together with
what must not have happened: no sign-in cookie, no session, no user, no code.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import jwt
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from handlers.oauth import local_path
from services import build_services
from services.authserver.identity import CLOCK_SKEW, IdentityClaims, OidcIdentityProvider
from services.authserver.signin import SESSION_CHECK_TTL, Accounts
from services.common.access import Principal
from services.common.errors import IdentityError, OAuthError, PageError
from storage import open_storage
from storage.base import Server, User
from tests.support.browser import BrowserError, ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.idp import IdpProcess
from tests.support.inprocess import make_config
from tests.support.ports import HeldPort

ANA = {"sub": "ana-signin-1", "email": "ana@example.com", "email_verified": True, "name": "Ana"}
BEA = {"sub": "bea-signin-1", "email": "bea@example.com", "email_verified": True, "name": "Bea"}
SIGNIN_COOKIE = "mcpgw_signin"  # loopback gateways: no __Host- prefix (not https)
LOGIN_COOKIE = "mcpgw_login"
CLIENT_ID = "gateway-client"
NONCE = "n-0123456789"


# ------------------------------------------------------------------------ fixtures


def start_gateway(idp: IdpProcess, state_dir) -> GatewayProcess:
    gateway = GatewayProcess(state_dir, idp=idp)
    gateway.use_idp_client(idp)
    return gateway.start()


@pytest.fixture(scope="module")
def gw(idp, tmp_path_factory):
    """One gateway signing in at the stock IdP (conftest's `idp`: `python -m oidc_provider_mock`)."""
    gateway = start_gateway(idp, tmp_path_factory.mktemp("signin"))
    yield gateway
    gateway.stop()


# ------------------------------------------------------------------------- helpers


async def to_callback(gw, browser: ScriptedBrowser, idp: IdpProcess, who: dict, next_path: str | None = "/dashboard"):
    """/login in `browser`, sign in as `who` at the IdP; the IdP's redirect back (not yet followed)."""
    query = "" if next_path is None else "?" + urlencode({"next": next_path})
    page = await browser.follow(f"{gw.url}/login{query}")
    assert page.status == 200 and page.url.startswith(idp.authorization_endpoint), page.url
    idp.set_user(who["sub"], **{k: v for k, v in who.items() if k != "sub"})
    page = await browser.submit(page, "sub", {"sub": who["sub"]}, stop_at=gw.url + "/oauth/callback")
    assert page.stopped_at, page
    return page.location


async def sign_in(gw, browser: ScriptedBrowser, idp: IdpProcess, who: dict, next_path: str | None = "/dashboard"):
    """The whole sign-in: the callback's answer (a 302 that sets the sign-in cookie)."""
    return await browser.request("GET", await to_callback(gw, browser, idp, who, next_path))


def signin_cookies(page) -> list[str]:
    return [c for c in page.headers.get_list("set-cookie") if c.startswith(SIGNIN_COOKIE + "=")]


def me(gw, cookie_value: str | None) -> httpx.Response:
    """/api/me from a fresh client holding only this sign-in cookie (a copy, as a thief has)."""
    cookies = {SIGNIN_COOKIE: cookie_value} if cookie_value else {}
    with httpx.Client(base_url=gw.url, cookies=cookies, trust_env=False, timeout=20) as client:
        return client.get("/api/me")


def users_in(gw) -> set[str]:
    with sqlite3.connect(gw.state_dir / "gateway.db") as conn:
        return {row[0] for row in conn.execute("SELECT sub FROM users")}


# ------------------------------------------- 1. ID tokens with and without kid (real IdPs)


def test_stock_provider_without_kid_signs_people_in(gw, idp):
    """Finding 1: the stock provider names no `kid`; the callback used to answer 502."""

    async def main():
        async with ScriptedBrowser() as browser:
            callback = await sign_in(gw, browser, idp, ANA)
            return callback, browser.cookies.get(SIGNIN_COOKIE)

    callback, cookie = asyncio.run(main())
    assert callback.status == 302, callback.text[:300]
    assert callback.location == gw.url + "/dashboard"
    assert len(signin_cookies(callback)) == 1
    assert me(gw, cookie).json()["email"] == ANA["email"]


def test_varied_provider_with_kid_signs_people_in(tmp_path):
    """The same flow against a provider that does send `kid` (as Google does)."""
    with IdpProcess(id_token_kid=True) as kid_idp:
        gateway = start_gateway(kid_idp, tmp_path / "kid")
        try:
            async def main():
                async with ScriptedBrowser() as browser:
                    callback = await sign_in(gateway, browser, kid_idp, BEA)
                    return callback, browser.cookies.get(SIGNIN_COOKIE)

            callback, cookie = asyncio.run(main())
            assert callback.status == 302 and callback.location == gateway.url + "/dashboard"
            assert me(gateway, cookie).json()["email"] == BEA["email"]
        finally:
            gateway.stop()


# ------------------------------- 1, 2. verification against a provider served from here


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key, kid: str | None = None, **extra) -> dict:
    if isinstance(private_key, rsa.RSAPrivateKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return {**jwk, **extra}


class Provider:
    """A tiny OpenID provider in this process (real HTTP on loopback): discovery, a key
    set the test chooses (fetches counted) and a token endpoint told how to misbehave."""

    def __init__(self):
        self.jwks: dict = {"keys": []}
        self.jwks_fetches = 0
        self.discovery_mode = "ok"  # ok | hang
        self.token_mode = "hang"  # hang | close | HTTP status as an int
        self._release = asyncio.Event()

    async def __aenter__(self):
        provider = self

        class Discovery(tornado.web.RequestHandler):
            async def get(self):
                if provider.discovery_mode == "hang":
                    await provider._release.wait()
                    return
                self.write({"issuer": provider.issuer, "authorization_endpoint": provider.issuer + "/authorize",
                            "token_endpoint": provider.issuer + "/token", "jwks_uri": provider.issuer + "/jwks"})

        class Jwks(tornado.web.RequestHandler):
            def get(self):
                provider.jwks_fetches += 1
                self.write(provider.jwks)

        class Token(tornado.web.RequestHandler):
            async def post(self):
                if provider.token_mode == "hang":
                    await provider._release.wait()
                elif provider.token_mode == "close":
                    self.request.connection.stream.close()
                else:
                    self.set_status(provider.token_mode)
                    self.write({"error": "invalid_grant" if provider.token_mode < 500 else "server_error"})

        app = tornado.web.Application([
            (r"/.well-known/openid-configuration", Discovery), (r"/jwks", Jwks), (r"/token", Token),
        ])
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets(sockets)
        self.issuer = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self._release.set()
        self._server.stop()
        await self._server.close_all_connections()

    def client(self, timeout: float = 10.0) -> OidcIdentityProvider:
        return OidcIdentityProvider(self.issuer, CLIENT_ID, "secret", "http://127.0.0.1:9/oauth/callback", timeout)

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        return {"iss": self.issuer, "aud": [CLIENT_ID], "sub": "u-1", "email": "u@example.com",
                "email_verified": True, "nonce": NONCE, "iat": now, "exp": now + 300, **overrides}


def sign(private_key, claims: dict, alg: str = "RS256", kid: str | None = None) -> str:
    return jwt.encode(claims, private_key, algorithm=alg, headers={"kid": kid} if kid else None)


def run(coro):
    return asyncio.run(coro)


def test_one_key_no_kid_verifies():
    async def main():
        async with Provider() as provider:
            key = rsa_key()
            provider.jwks = {"keys": [public_jwk(key, "only")]}  # the set names it; the token does not
            claims = await provider.client().verify_id_token(sign(key, provider.claims()), NONCE)
            assert (claims.sub, claims.email, claims.email_verified) == ("u-1", "u@example.com", True)

    run(main())


def test_several_keys_no_kid_tries_each_key_of_the_matching_type():
    async def main():
        async with Provider() as provider:
            first, second = rsa_key(), rsa_key()
            ec_key = ec.generate_private_key(ec.SECP256R1())
            provider.jwks = {"keys": [
                public_jwk(ec_key, "e1"), public_jwk(first, "r1"), public_jwk(rsa_key(), "enc", use="enc"),
                public_jwk(second, "r2"),
            ]}
            by_second = await provider.client().verify_id_token(sign(second, provider.claims(sub="u-2")), NONCE)
            by_ec = await provider.client().verify_id_token(
                sign(ec_key, provider.claims(sub="u-3"), alg="ES256"), NONCE)
            assert (by_second.sub, by_ec.sub) == ("u-2", "u-3")

    run(main())


def test_a_token_no_key_of_the_set_signed_is_refused_after_one_refetch():
    async def main():
        async with Provider() as provider:
            provider.jwks = {"keys": [public_jwk(rsa_key(), "r1"), public_jwk(rsa_key(), "r2")]}
            with pytest.raises(IdentityError) as caught:
                await provider.client().verify_id_token(sign(rsa_key(), provider.claims()), NONCE)
            assert str(caught.value) == "the identity provider's ID token did not verify"
            assert provider.jwks_fetches == 2  # the cached set, then one refetch: a rotation?

    run(main())


def test_a_rotated_key_is_found_by_one_refetch_with_and_without_kid():
    async def main():
        async with Provider() as provider:
            old, new, newer = rsa_key(), rsa_key(), rsa_key()
            client = provider.client()
            provider.jwks = {"keys": [public_jwk(old, "old")]}
            await client.verify_id_token(sign(old, provider.claims(), kid="old"), NONCE)
            provider.jwks = {"keys": [public_jwk(new, "new")]}
            await client.verify_id_token(sign(new, provider.claims(), kid="new"), NONCE)  # unknown kid
            assert provider.jwks_fetches == 2
            provider.jwks = {"keys": [public_jwk(newer)]}
            await client.verify_id_token(sign(newer, provider.claims()), NONCE)  # no kid, cached key fails
            assert provider.jwks_fetches == 3

    run(main())


@pytest.mark.parametrize("alg", ["none", "HS256"])
def test_unsigned_and_symmetric_tokens_are_refused(alg):
    async def main():
        async with Provider() as provider:
            provider.jwks = {"keys": [public_jwk(rsa_key())]}
            token = jwt.encode(provider.claims(), "s" * 32 if alg == "HS256" else None, algorithm=alg)
            with pytest.raises(IdentityError) as caught:
                await provider.client().verify_id_token(token, NONCE)
            assert str(caught.value) == (
                "the identity provider's ID token uses an algorithm the gateway does not accept")

    run(main())


@pytest.mark.parametrize("claims, message", [
    ({"aud": ["another-client"]}, "the ID token was issued to another client"),
    ({"aud": [CLIENT_ID, "another-client"]}, "the ID token was issued to another client"),  # no azp
    ({"iss": "http://127.0.0.1:9"}, "the ID token was issued by another issuer"),
    ({"nonce": "other"}, "the ID token's nonce does not match this sign-in"),
    ({"exp": None}, "the ID token lacks the exp claim"),
    ({"iat": None}, "the ID token lacks the iat claim"),
])
def test_claims_are_checked(claims, message):
    async def main():
        async with Provider() as provider:
            key = rsa_key()
            provider.jwks = {"keys": [public_jwk(key)]}
            body = {k: v for k, v in {**provider.claims(), **claims}.items() if v is not None}
            with pytest.raises(IdentityError) as caught:
                await provider.client().verify_id_token(sign(key, body), NONCE)
            assert str(caught.value) == message

    run(main())


@pytest.mark.parametrize("skew", [
    {"exp": -30},  # expired half a minute ago
    {"iat": 20},  # issued by a clock 20 s ahead
    {"iat": 20, "nbf": 20},
    {"exp": -(CLOCK_SKEW - 5)},
])
def test_clock_leeway_applies_to_exp_iat_and_nbf(skew):
    """Finding 2: within CLOCK_SKEW either way, a token verifies."""

    async def main():
        async with Provider() as provider:
            key = rsa_key()
            provider.jwks = {"keys": [public_jwk(key, "k1")]}
            now = int(time.time())
            claims = provider.claims(**{name: now + offset for name, offset in skew.items()})
            if "exp" not in skew:
                claims["exp"] = now + 300
            # With kid: the old verifier reached its clock checks, so this fails there on the leeway alone.
            verified = await provider.client().verify_id_token(sign(key, claims, kid="k1"), NONCE)
            assert verified.sub == "u-1"

    run(main())


@pytest.mark.parametrize("skew, message", [
    ({"exp": -(CLOCK_SKEW + 30)}, "the identity provider's ID token has expired"),
    ({"iat": CLOCK_SKEW + 30}, "the identity provider's ID token is not valid yet (check the clocks)"),
    ({"nbf": CLOCK_SKEW + 30}, "the identity provider's ID token is not valid yet (check the clocks)"),
])
def test_beyond_the_leeway_tokens_are_refused(skew, message):
    async def main():
        async with Provider() as provider:
            key = rsa_key()
            provider.jwks = {"keys": [public_jwk(key, "k1")]}
            now = int(time.time())
            claims = provider.claims(**{name: now + offset for name, offset in skew.items()})
            with pytest.raises(IdentityError) as caught:
                await provider.client().verify_id_token(sign(key, claims, kid="k1"), NONCE)
            assert str(caught.value) == message

    run(main())


# ------------------------------------------------------------- 3. login CSRF


def test_callback_opened_in_another_browser_signs_nobody_in(gw, idp):
    """Finding 3: the state belongs to the browser that went to /login."""

    async def main():
        async with ScriptedBrowser() as victim, ScriptedBrowser() as attacker, ScriptedBrowser() as other:
            callback_url = await to_callback(gw, victim, idp, ANA)
            assert victim.cookies.get(LOGIN_COOKIE)
            no_cookie = await attacker.request("GET", callback_url)
            # A browser that started a sign-in of its own holds a login cookie, just not this one.
            await to_callback(gw, other, idp, BEA)
            own_cookie = await other.request("GET", callback_url)
            # Refused without consuming the state: the browser it belongs to still finishes.
            finished = await victim.request("GET", callback_url)
            return no_cookie, own_cookie, finished, attacker.cookies.get(SIGNIN_COOKIE), other.cookies.get(SIGNIN_COOKIE)

    before = users_in(gw)
    no_cookie, own_cookie, finished, attacker_cookie, other_cookie = asyncio.run(main())
    for refused in (no_cookie, own_cookie):
        assert refused.status == 403
        assert "This sign-in was started in another browser" in refused.text
        assert signin_cookies(refused) == []
    assert attacker_cookie is None and other_cookie is None
    assert finished.status == 302 and len(signin_cookies(finished)) == 1
    assert users_in(gw) - before <= {ANA["sub"]}


def test_login_cookie_is_httponly_lax_and_short_lived(gw, idp):
    async def main():
        async with ScriptedBrowser() as browser:
            return await browser.request("GET", f"{gw.url}/login?next=/dashboard")

    response = asyncio.run(main())
    (cookie,) = [c for c in response.headers.get_list("set-cookie") if c.startswith(LOGIN_COOKIE + "=")]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=lax" in attributes and "path=/" in attributes
    assert any(a.startswith("expires=") for a in attributes)


# ------------------------------------------------------------ 4. open redirect


@pytest.mark.parametrize("target", [
    "/\t/evil.example/", "/\n/evil.example/", "/\r\nSet-Cookie: x=1", "//evil.example/", "/\\evil.example/",
    "/\\/evil.example/", "https://evil.example/", "/ /evil.example", "/\x7f/evil.example", "/\u3000/evil.example",
    "javascript:alert(1)", "dashboard", "", "/%0d%0a",
])
def test_local_path_refuses_anything_but_a_same_origin_path(target):
    expected = "/%0d%0a" if target == "/%0d%0a" else "/dashboard"  # percent-escapes are a browser's own
    assert local_path(target) == expected


@pytest.mark.parametrize("target", ["/dashboard/servers/srv_1?notice=saved", "/authorize/consent?req=a-b_c",
                                    "/dashboard#top", "/"])
def test_local_path_keeps_same_origin_paths(target):
    assert local_path(target) == target


@pytest.mark.parametrize("next_path", ["/\t/evil.example/", "/\r\n/evil.example/", "/\\evil.example", "//evil.example"])
def test_sign_in_never_redirects_off_site(gw, idp, next_path):
    """Finding 4: the whole flow, `next` given to /login as a browser would send it."""

    async def main():
        async with ScriptedBrowser() as browser:
            return await sign_in(gw, browser, idp, ANA, next_path=next_path)

    log_before = len(gw.log_text())
    callback = asyncio.run(main())
    assert callback.status == 302
    assert callback.headers["location"] == "/dashboard"
    assert "Traceback" not in gw.log_text()[log_before:]


# ----------------------------------------------------------- 5. sessions end


def test_logout_ends_the_session_for_every_copy_of_the_cookie(gw, idp):
    """Finding 5: a copy of the cookie taken before POST /logout stops working at once."""

    async def main():
        async with ScriptedBrowser() as browser:
            await sign_in(gw, browser, idp, ANA)
            copy = browser.cookies.get(SIGNIN_COOKIE)
            assert me(gw, copy).status_code == 200
            await browser.request("GET", gw.url + "/dashboard")  # hands out the _xsrf cookie
            logout = await browser.request("POST", gw.url + "/logout", data=[("_xsrf", browser.cookies["_xsrf"])])
            return copy, logout

    copy, logout = asyncio.run(main())
    assert logout.status == 302 and logout.location == gw.url + "/"
    refused = me(gw, copy)
    assert refused.status_code == 401 and refused.json()["error"] == "not_signed_in"
    with httpx.Client(base_url=gw.url, cookies={SIGNIN_COOKIE: copy}, trust_env=False) as thief:
        page = thief.get("/dashboard")
    assert page.status_code == 302 and page.headers["location"].startswith("/login?")


def test_sign_out_everywhere_ends_every_session_of_that_person_only(gw, idp):
    async def main():
        async with ScriptedBrowser() as laptop, ScriptedBrowser() as phone, ScriptedBrowser() as colleague:
            await sign_in(gw, laptop, idp, ANA)
            await sign_in(gw, phone, idp, ANA)
            await sign_in(gw, colleague, idp, BEA)
            page = await laptop.follow(gw.url + "/dashboard/authorizations")
            done = await laptop.submit(page, "everywhere")
            cookies = [b.cookies.get(SIGNIN_COOKIE) for b in (laptop, phone, colleague)]
            laptop_copy = cookies[0]
            # A sign-in after it starts a new session, which works.
            async with ScriptedBrowser() as later:
                await sign_in(gw, later, idp, ANA)
                fresh = later.cookies.get(SIGNIN_COOKIE)
            return done, laptop_copy, cookies[1], cookies[2], fresh

    done, laptop_copy, phone, colleague, fresh = asyncio.run(main())
    assert done.status == 200 and done.url == gw.url + "/"
    assert me(gw, laptop_copy).status_code == 401
    assert me(gw, phone).status_code == 401
    assert me(gw, colleague).json()["email"] == BEA["email"]
    assert me(gw, fresh).json()["email"] == ANA["email"]


def test_a_removed_user_has_no_session(gw, idp):
    removed = {"sub": "gone-signin-1", "email": "gone@example.com", "email_verified": True, "name": "Gone"}

    async def main():
        async with ScriptedBrowser() as browser:
            await sign_in(gw, browser, idp, removed)
            return browser.cookies.get(SIGNIN_COOKIE)

    cookie = asyncio.run(main())
    assert me(gw, cookie).status_code == 200
    with sqlite3.connect(gw.state_dir / "gateway.db") as conn:
        conn.execute("DELETE FROM users WHERE sub = ?", (removed["sub"],))
    time.sleep(SESSION_CHECK_TTL)  # the gateway may reuse a positive check this long, no longer
    assert me(gw, cookie).status_code == 401


# ---------------------------------------------------- 6. owner binding is immediate


def test_owner_binding_refuses_a_second_account_with_the_same_email_at_once(tmp_path):
    """Finding 6, in the services: the rules were cached (owner = the e-mail) just before
    the owner's first sign-in; right after it another `sub` with that e-mail is refused."""

    async def main():
        services = build_services(make_config(tmp_path))
        await services.start(background=False)
        try:
            await services.storage.create_server(Server(
                "srv_bind", "Bound", "https://upstream.example/mcp", owner_email=ANA["email"], created_at=time.time()))
            impostor = Principal(sub="impostor-1", email=ANA["email"])
            assert (await services.access.decide(impostor, "srv_bind")).allowed  # cached before the binding
            await services.accounts.sign_in(IdentityClaims(ANA["sub"], ANA["email"], True, "", "Ana", ""))
            decision = await services.access.decide(impostor, "srv_bind")
            audience = services.tokens.audience_for(services.config.server_resource("srv_bind"))
            user = User(sub="impostor-1", email=ANA["email"], email_verified=True, hd="", name="", picture="",
                        created_at=0.0, last_login_at=0.0)
            with pytest.raises(OAuthError) as caught:
                await services.tokens.check_access(user, audience)
            owner = await services.access.decide(Principal(sub=ANA["sub"], email=ANA["email"]), "srv_bind")
            return decision, caught.value, owner
        finally:
            await services.stop()

    decision, refusal, owner = asyncio.run(main())
    assert (decision.allowed, decision.reason) == (False, "this server has not been shared with your account")
    assert (refusal.error, refusal.description) == ("access_denied", "this server has not been shared with your account")
    assert (owner.allowed, owner.reason) == (True, "owner")


def test_owner_binding_end_to_end(gw, idp):
    """The same through the gateway: the owner's /authorize caches the rules, the owner's
    first sign-in binds the server, and an account with the same verified e-mail that
    comes right after gets the refusal page and no code."""
    owner = {"sub": "own-bind-1", "email": "owner-bind@example.com", "email_verified": True, "name": "Owner"}
    twin = {"sub": "twin-bind-1", "email": "owner-bind@example.com", "email_verified": True, "name": "Twin"}
    server_id = gw.add_server("http://127.0.0.1:9/mcp", owner["email"], "Binding")
    redirect = "http://127.0.0.1:9/cb"
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = http.post("/register", json={"redirect_uris": [redirect], "token_endpoint_auth_method": "none",
                                                 "client_name": "Binding test"}).json()["client_id"]
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect, "state": "s1",
             "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "code_challenge_method": "S256",
             "resource": f"{gw.url}/mcp/{server_id}"}
    url = f"{gw.url}/authorize?{urlencode(query)}"

    async def main():
        async with ScriptedBrowser() as first, ScriptedBrowser() as second:
            granted = await first.authorize(url, stop_at=redirect, idp_login=owner)
            with pytest.raises(BrowserError) as caught:
                await second.authorize(url, stop_at=redirect, idp_login=twin)
            return granted, caught.value.page, second.history

    granted, refused, history = asyncio.run(main())
    assert "code" in granted
    assert refused.status == 403 and "has not been shared with your account" in refused.text
    assert not any(u.startswith(redirect) and "code=" in u for _, u, _ in history)


# ------------------------------------------------------- 23. IdP faults named


async def begin_and_finish(tmp_path, provider: Provider, timeout: float):
    storage = open_storage(f"sqlite:///{tmp_path}/accounts.db")
    await storage.open()
    try:
        accounts = Accounts(storage, provider.client(timeout))
        start = await accounts.begin("/dashboard", False, None)
        state = dict(parse_qsl(urlsplit(start.url).query))["state"]
        with pytest.raises(PageError) as caught:
            await accounts.finish(state, "code-1", None, start.browser_key)
        return caught.value, await storage.get_user("u-1")
    finally:
        await storage.close()


def test_a_token_endpoint_that_times_out_is_named_a_timeout(tmp_path):
    async def main():
        async with Provider() as provider:
            provider.token_mode = "hang"
            return await begin_and_finish(tmp_path, provider, timeout=0.5)

    error, user = asyncio.run(main())
    assert (error.status, error.title) == (504, "Sign-in timed out")
    assert error.message == "the identity provider did not answer in time (token endpoint timed out)"
    assert user is None


def test_a_discovery_that_times_out_is_named_a_timeout(tmp_path):
    async def main():
        async with Provider() as provider:
            provider.discovery_mode = "hang"
            storage = open_storage(f"sqlite:///{tmp_path}/accounts.db")
            await storage.open()
            try:
                with pytest.raises(PageError) as caught:
                    await Accounts(storage, provider.client(0.5)).begin("/dashboard", False, None)
                return caught.value
            finally:
                await storage.close()

    error = asyncio.run(main())
    assert (error.status, error.title) == (504, "Sign-in is unavailable")
    assert error.message == "the identity provider did not answer in time (discovery timed out)"


@pytest.mark.parametrize("mode, status, message", [
    (503, 502, "the identity provider answered HTTP 503 (token endpoint)"),
    (400, 502, "the identity provider refused the sign-in code"),
    ("close", 502, "the identity provider closed the connection before answering (token endpoint)"),
])
def test_token_endpoint_faults_are_named_as_they_are(tmp_path, mode, status, message):
    async def main():
        async with Provider() as provider:
            provider.token_mode = mode
            return await begin_and_finish(tmp_path, provider, timeout=5.0)

    error, user = asyncio.run(main())
    assert (error.status, error.title, error.message) == (status, "Sign-in failed", message)
    assert user is None


def test_an_unreachable_provider_is_named_unreachable(tmp_path):
    async def main(port: int):
        closed = OidcIdentityProvider(f"http://127.0.0.1:{port}", CLIENT_ID, "s", "http://127.0.0.1:9/cb")
        with pytest.raises(IdentityError) as caught:
            await closed.discovery()
        return caught.value

    with HeldPort() as held:  # bound, never listening: refused, and no one else's meanwhile
        error = asyncio.run(main(held.port))
    assert str(error) == "the identity provider is unreachable (discovery: Connection refused)"
    assert error.status == 502


# --------------------------------------- 3. the login cookie in a real browser, cross-site


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_login_cookie_comes_back_on_the_cross_site_return_in_chromium(idp, tmp_path):
    """SameSite=Lax is what a real browser sends on the IdP's top-level redirect back. The
    IdP is addressed as `localhost`, the gateway as `127.0.0.1`: two sites to Chromium,
    so the return is a cross-site navigation, as from Google. Were the cookie withheld,
    the callback would answer 403."""
    playwright_api = pytest.importorskip("playwright.async_api")
    if not __import__("os").path.exists(CHROMIUM):
        pytest.skip("no Chromium at " + CHROMIUM)
    cross_site_issuer = f"http://localhost:{idp.port}"
    gateway = GatewayProcess(tmp_path / "chromium")
    client = idp.register_client([gateway.url + "/oauth/callback"])
    gateway.env.pop("MCPGW_DEV_LOGIN")
    gateway.env.update(MCPGW_OIDC_ISSUER=cross_site_issuer, MCPGW_OIDC_CLIENT_ID=client.client_id,
                       MCPGW_OIDC_CLIENT_SECRET=client.client_secret)
    gateway.start()
    idp.set_user("chromium-1", email="chromium@example.com", email_verified=True, name="Chrome")

    async def main():
        async with playwright_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context()
                context.set_default_timeout(15_000)

                async def offline(route):  # the IdP's page links a CDN stylesheet; the network is closed
                    await route.fulfill(status=204, body="")

                await context.route(lambda url: not url.startswith((gateway.url, cross_site_issuer)), offline)
                page = await context.new_page()
                callbacks = []
                page.on("response", lambda r: callbacks.append(r.status) if "/oauth/callback" in r.url else None)
                await page.goto(gateway.url + "/login?next=/dashboard")
                assert page.url.startswith(cross_site_issuer + "/oauth2/authorize")
                form = page.locator("form", has=page.locator("input[name=sub]"))
                await form.locator("input[name=sub]").fill("chromium-1")
                async with page.expect_navigation(url=lambda url: url.startswith(gateway.url)):
                    await form.locator("button, input[type=submit]").first.click()
                signed_in = await page.locator("#nav-user").all_inner_texts()
                return callbacks, page.url, signed_in
            finally:
                await browser.close()

    try:
        callbacks, landed, who = asyncio.run(main())
    finally:
        gateway.stop()
    assert callbacks == [302]
    assert (landed, who) == (gateway.url + "/dashboard", ["chromium@example.com"])
