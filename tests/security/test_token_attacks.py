"""Access tokens at the proxy, attacked: algorithms and keys (none, HS256 keyed with the
public key, RS512/PS256 with the gateway's own key, foreign keys, unknown or misdirected
kid, jku/x5u/jwk/x5c/crit headers), every claim missing, wrong or of the wrong type,
audiences, scopes per method, revoked families, mangled encodings, the token in the wrong
place, and tokens of another issuer.

One real gateway process (users signed in at the real OIDC provider process), a recording
upstream in this module, genuine tokens from the real /authorize and /token, and forged
ones signed with the gateway's own key (read from its storage with its master secret, the
way a second instance would) only where a case needs a validly-signed token. Every refusal
is checked exactly (status, WWW-Authenticate error, JSON-RPC code) and so is the fact that
nothing reached the upstream. Cases already in tests/test_oauth_endpoints.py and
tests/test_proxy_rules.py (plain alg none, HS256 over the PEM, a foreign RS256 key, an
expired token, a token for another server) are not repeated."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx
import jwt
import pytest
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from config import Config
from services import build_services
from tests.support.browser import ScriptedBrowser
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import REDIRECT, pkce, register_public_client

ALICE = {"sub": "alice-tok", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
BOB = {"sub": "bob-tok", "email": "bob@example.com", "email_verified": True, "name": "Bob"}
SRV = "srv_tok"  # recording upstream, owner Alice
SRV_OTHER = "srv_tok_other"  # recording upstream, owner Alice
SRV_ID = "srv_tok_identity"  # recording upstream with identity forwarding, owner Alice
ACCEPT = "application/json, text/event-stream"
CALL = rpc("tools/call", 7, name="echo", arguments={"text": "x"})


# --------------------------------------------------------------------- the upstream


class _Recorder(tornado.web.RequestHandler):
    """Answers every POST with a JSON-RPC result; GET /jwks serves an attacker's key set
    (a jku the gateway must never fetch). Everything is recorded."""

    SUPPORTED_METHODS = ("GET", "POST", "DELETE")

    def initialize(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    def post(self, kind: str) -> None:
        self.upstream.record(kind, self.request)
        try:
            request_id = json.loads(self.request.body or b"null").get("id")
        except (ValueError, AttributeError):
            request_id = None
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {"ok": True}}))

    def get(self, kind: str) -> None:
        self.upstream.record(kind, self.request)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.upstream.attacker_jwks))

    delete = post


# ------------------------------------------------------------------------ fixtures


@dataclass
class Rig:
    gw: GatewayProcess
    fake: FakeUpstream
    http: httpx.Client
    client_id: str
    tokens: dict[str, dict]  # name -> the /token response
    kid: str
    private_key: object = field(repr=False)
    attacker_key: object = field(repr=False)

    def resource(self, server_id: str = SRV) -> str:
        return f"{self.gw.url}/mcp/{server_id}"

    def claims(self, **changes) -> dict:
        """A complete claim set as the gateway mints it; None removes a claim."""
        now = int(time.time())
        claims = {
            "iss": self.gw.url, "sub": ALICE["sub"], "aud": self.resource(), "scope": "mcp:connect mcp:invoke",
            "email": ALICE["email"], "client_id": self.client_id, "iat": now, "exp": now + 600,
            "jti": secrets.token_urlsafe(16), "fid": secrets.token_urlsafe(16),
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict | None = None, *, key=None, alg: str = "RS256", kid: str | None = "", **header) -> str:
        """Signed with the gateway's own active key unless `key` is given; kid "" = the real kid."""
        headers = {"typ": "at+jwt", **header}
        if kid is not None:
            headers["kid"] = kid or self.kid
        return jwt.encode(claims if claims is not None else self.claims(), key or self.private_key,
                          algorithm=alg, headers=headers)


async def _signin_tokens(gw: GatewayProcess) -> tuple[str, dict[str, dict]]:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Token attacks")
        plan = {
            ALICE["sub"]: [("alice", SRV, None), ("alice_connect", SRV, "mcp:connect"),
                           ("alice_base", None, None), ("alice_offline", SRV, "mcp:connect offline_access"),
                           ("alice_revoked", SRV, None)],
            BOB["sub"]: [("bob_base", None, None)],
        }
        tokens: dict[str, dict] = {}
        for who in (ALICE, BOB):
            async with ScriptedBrowser() as browser:
                for name, server_id, scope in plan[who["sub"]]:
                    verifier, challenge = pkce()
                    query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT,
                             "state": secrets.token_hex(6), "code_challenge": challenge,
                             "code_challenge_method": "S256"}
                    if server_id:
                        query["resource"] = f"{gw.url}/mcp/{server_id}"
                    if scope:
                        query["scope"] = scope
                    result = await browser.authorize(f"{gw.url}/authorize?{urlencode(query)}", stop_at=REDIRECT,
                                                     idp_login=who)
                    response = await http.post("/token", data={
                        "grant_type": "authorization_code", "code": result["code"], "code_verifier": verifier,
                        "redirect_uri": REDIRECT, "client_id": client_id})
                    assert response.status_code == 200, response.text
                    tokens[name] = response.json()
        return client_id, tokens


async def _gateway_key(gw: GatewayProcess):
    """The gateway's active signing key, read as a second instance would read it."""
    services = build_services(Config.from_env({k: v for k, v in gw.env.items() if k.startswith("MCPGW_")}))
    await services.start(background=False)
    try:
        active = services.keyring._active
        return active.record.kid, active.private_key
    finally:
        await services.stop()


@pytest.fixture(scope="module")
def rig(idp, tmp_path_factory):
    fake = FakeUpstream(_Recorder, name="token-attacks-upstream")
    attacker_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker_key.public_key()))
    fake.attacker_jwks = {"keys": [{**attacker_jwk, "kid": "attacker", "alg": "RS256", "use": "sig"}]}
    fake.start()
    gw = GatewayProcess(tmp_path_factory.mktemp("token-attacks"), idp=idp)
    gw.use_idp_client(idp)
    gw.start()
    try:
        gw.add_server(f"{fake.url}/json", ALICE["email"], "Token attacks", "--id", SRV)
        gw.add_server(f"{fake.url}/other", ALICE["email"], "Token attacks other", "--id", SRV_OTHER)
        gw.add_server(f"{fake.url}/identity", ALICE["email"], "Token attacks identity", "--id", SRV_ID,
                      "--forward-identity")
        client_id, tokens = asyncio.run(_signin_tokens(gw))
        kid, private_key = asyncio.run(_gateway_key(gw))
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as http:
            yield Rig(gw, fake, http, client_id, tokens, kid, private_key, attacker_key)
    finally:
        gw.stop()
        fake.stop()


# ------------------------------------------------------------------------- helpers


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def send(rig: Rig, token: str | None, message=CALL, server_id: str = SRV, *, headers=None, params=None,
         raw_authorization: list[str] | None = None) -> httpx.Response:
    """POST one JSON-RPC message to /mcp/{server_id}; `raw_authorization` sends those
    Authorization header lines as they are (several lines = several headers)."""
    head: list[tuple[str, str]] = [("Accept", ACCEPT), ("Content-Type", "application/json"),
                                   ("MCP-Protocol-Version", "2025-11-25")]
    if token is not None:
        head.append(("Authorization", f"Bearer {token}"))
    for line in raw_authorization or []:
        head.append(("Authorization", line))
    head.extend((headers or {}).items())
    return rig.http.post(f"/mcp/{server_id}", content=json.dumps(message).encode(), headers=head, params=params)


def challenge_params(response: httpx.Response) -> dict[str, str]:
    header = response.headers["www-authenticate"]
    assert header.startswith("Bearer "), header
    params = {}
    for part in header[len("Bearer "):].split(", "):
        name, _, value = part.partition("=")
        assert value.startswith('"') and value.endswith('"'), header
        params[name] = value[1:-1]
    return params


def upstream_calls(rig: Rig) -> int:
    return len(rig.fake.requests)


def tracebacks(rig: Rig) -> int:
    return rig.gw.log_text().count("Traceback")


def assert_refused(rig: Rig, response: httpx.Response, calls_before: int, *, server_id: str = SRV,
                   status: int = 401, error: str | None = "invalid_token", logs_before: int | None = None) -> dict:
    """The exact refusal, and nothing reached the upstream. Returns the challenge params."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["error"]["code"] == (-32001 if status == 401 else -32003), body
    params: dict[str, str] = {}
    if status == 401 or error == "insufficient_scope":
        params = challenge_params(response)
        assert params["resource_metadata"] == f"{rig.gw.url}/.well-known/oauth-protected-resource/mcp/{server_id}"
        assert params.get("error") == error, params
    else:
        assert "www-authenticate" not in response.headers
    assert upstream_calls(rig) == calls_before, "the refused request reached the upstream"
    if logs_before is not None:
        assert tracebacks(rig) == logs_before, rig.gw.log_text()[-3000:]
    return params


def refused(rig: Rig, token: str, message=CALL, server_id: str = SRV, **expect) -> dict:
    calls, logs = upstream_calls(rig), tracebacks(rig)
    return assert_refused(rig, send(rig, token, message, server_id), calls, server_id=server_id,
                          logs_before=logs, **expect)


def accepted(rig: Rig, token: str, message=CALL, server_id: str = SRV) -> httpx.Response:
    calls = upstream_calls(rig)
    response = send(rig, token, message, server_id)
    assert response.status_code == 200, (response.status_code, response.text)
    assert upstream_calls(rig) == calls + 1
    return response


# ---------------------------------------------------------------- the forger works


def test_controls_genuine_and_forged_with_the_gateways_key_are_accepted(rig):
    """Without this, every refusal below could be the forger's fault."""
    accepted(rig, rig.tokens["alice"]["access_token"])
    accepted(rig, rig.sign())
    forwarded = rig.fake.requests[-1]
    assert "authorization" not in forwarded["headers"]  # the bearer token never goes upstream


# ------------------------------------------------------------------ algorithms, keys


def _public_forms(rig: Rig) -> list[bytes]:
    public = rig.private_key.public_key()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    return [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        json.dumps({**jwk, "kid": rig.kid, "alg": "RS256", "use": "sig"}).encode(),
        base64.urlsafe_b64decode(jwk["n"] + "=" * (-len(jwk["n"]) % 4)),
    ]


def _unsigned(rig: Rig, header: dict, signature: bytes = b"") -> str:
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(rig.claims()).encode()),
                     b64url(signature)])


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("with_kid", [True, False])
def test_unsigned_tokens_in_every_spelling_of_none_are_refused(rig, alg, with_kid):
    header = {"alg": alg, "typ": "at+jwt", **({"kid": rig.kid} if with_kid else {})}
    refused(rig, _unsigned(rig, header))


def test_hs256_keyed_with_any_form_of_the_public_key_is_refused(rig):
    """Algorithm confusion: the verifier must never use the RSA public key as an HMAC secret,
    whatever encoding of it the attacker guesses (PKCS#1 PEM, DER, the JWK, the modulus)."""
    for secret in _public_forms(rig):
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            header = {"alg": alg, "typ": "at+jwt", "kid": rig.kid}
            head, body = b64url(json.dumps(header).encode()), b64url(json.dumps(rig.claims()).encode())
            signature = hmac.new(secret, f"{head}.{body}".encode(), digest).digest()
            refused(rig, f"{head}.{body}.{b64url(signature)}")


@pytest.mark.parametrize("alg", ["RS512", "RS384", "PS256"])
def test_other_rsa_algorithms_with_the_gateways_own_key_are_refused(rig, alg):
    """The key is right, the algorithm is not the one the gateway signs with (RS256 only)."""
    refused(rig, rig.sign(alg=alg))


def test_ec_key_and_odd_alg_headers_are_refused(rig):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    refused(rig, rig.sign(key=ec_key, alg="ES256"))
    for header in ({"alg": ["RS256"], "kid": rig.kid}, {"kid": rig.kid}, {"alg": "", "kid": rig.kid}):
        # A genuine RS256 signature under a header that does not say RS256.
        head = b64url(json.dumps(header).encode())
        body = b64url(json.dumps(rig.claims()).encode())
        genuine = rig.sign(rig.claims())
        refused(rig, f"{head}.{body}.{genuine.split('.')[2]}")


@pytest.mark.parametrize("kid", [None, "unknown-kid", "", 7, ["kid"], "../../../../etc/passwd",
                                 "' OR '1'='1", "k" * 4000])
def test_the_gateways_signature_under_a_wrong_or_absent_kid_is_refused(rig, kid):
    """Signed with the right key, but the header names no key, an unknown one or garbage:
    the verifier picks keys by kid and never falls back to trying them all."""
    if kid == "":  # the empty string: rig.sign would put the real kid
        token = jwt.encode(rig.claims(), rig.private_key, algorithm="RS256", headers={"kid": "", "typ": "at+jwt"})
    elif kid is None:
        token = rig.sign(kid=None)
    else:
        head = b64url(json.dumps({"alg": "RS256", "typ": "at+jwt", "kid": kid}).encode())
        body = b64url(json.dumps(rig.claims()).encode())
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        signature = rig.private_key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{head}.{body}.{b64url(signature)}"
    refused(rig, token)


def test_header_key_injection_is_ignored_and_nothing_is_fetched(rig):
    """jku / x5u / jwk / x5c name the attacker's key; the gateway trusts only its own key
    set and fetches nothing the token points at."""
    attacker = rig.attacker_key
    jwk = rig.fake.attacker_jwks["keys"][0]
    jku = f"{rig.fake.url}/jwks"
    cert_der = base64.b64encode(b"not really a certificate").decode()
    for kid in (rig.kid, "attacker"):
        for header in ({"jku": jku}, {"x5u": jku}, {"jwk": jwk}, {"x5c": [cert_der]},
                       {"jku": jku, "jwk": jwk, "x5u": jku}):
            refused(rig, rig.sign(key=attacker, kid=kid, **header))
    assert rig.fake.of("jwks") == [], "the gateway fetched a key URL named in a token header"


def test_unknown_critical_header_extension_is_refused(rig):
    """RFC 7515 §4.1.11: a crit extension the verifier does not understand voids the token,
    even with a good signature by the gateway's own key."""
    refused(rig, rig.sign(crit=["urn:example:must-understand"], **{"urn:example:must-understand": True}))


@pytest.mark.parametrize("typ", ["JWT", "jwt", None, "", "at+jwt+x", "application/jwt", 7])
def test_a_gateway_signed_jwt_of_another_type_is_not_an_access_token(rig, typ):
    """RFC 9068 §4: only typ at+jwt is an access token (the gateway signs identity
    assertions for upstreams, typ JWT, with the same key)."""
    refused(rig, rig.sign(typ=typ))


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"])
def test_every_spelling_of_the_access_token_type_is_accepted(rig, typ):
    accepted(rig, rig.sign(typ=typ), rpc("ping"))


def test_identity_assertion_sent_to_an_upstream_is_not_an_access_token(rig):
    """A server with identity forwarding hands its upstream a gateway-signed JWT about the
    user. The upstream's operator replays it at the gateway, here and at another server."""
    accepted(rig, rig.tokens["alice_base"]["access_token"], rpc("ping"), SRV_ID)
    (assertion,) = rig.fake.of("identity")[-1]["headers"]["x-mcpgw-identity"]
    assert jwt.get_unverified_header(assertion)["kid"] == rig.kid  # signed by the same key
    for server_id in (SRV_ID, SRV):
        refused(rig, assertion, rpc("ping"), server_id)


def test_a_retiring_keys_kid_on_a_token_signed_by_the_new_key_is_refused(rig):
    """After a rotation both keys verify; each kid must still pick its own key."""
    old_kid, old_key = rig.kid, rig.private_key
    rig.gw.cli("keys", "rotate")
    new_kid, new_key = asyncio.run(_gateway_key(rig.gw))
    assert new_kid != old_kid
    # The gateway looks a new kid of its own format up on first sight, whatever unknown
    # kids the tests above sent (misses are remembered per kid, not for everyone).
    accepted(rig, rig.sign(key=new_key, kid=new_kid))
    accepted(rig, rig.sign(key=old_key, kid=old_kid))  # the retiring one still verifies
    refused(rig, rig.sign(key=new_key, kid=old_kid))
    refused(rig, rig.sign(key=old_key, kid=new_kid))


# ---------------------------------------------------------------------- the claims


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat", "jti"])
def test_a_token_missing_a_required_claim_is_refused(rig, claim):
    refused(rig, rig.sign(rig.claims(**{claim: None})))


@pytest.mark.parametrize("issuer", [
    "https://evil.example", "{gw}/", "{gw}/mcp/", "{gw_localhost}", "HTTP://127.0.0.1:{port}", "{idp}", "",
])
def test_a_token_of_another_issuer_signed_with_the_gateways_key_is_refused(rig, idp, issuer):
    issuer = issuer.format(gw=rig.gw.url, port=rig.gw.port, idp=idp.issuer,
                           gw_localhost=rig.gw.url.replace("127.0.0.1", "localhost"))
    refused(rig, rig.sign(rig.claims(iss=issuer)))


@pytest.mark.parametrize("audience", [
    "{gw}/mcp/{srv}/", "{gw}/mcp", "{gw}", "{gw}/", "{gw}/mcp/{srv}?x=1", "{gw}/mcp/{srv}#f",
    "{gw_localhost}/mcp/{srv}", "http://127.0.0.1:1/mcp/{srv}", "https://evil.example/mcp/{srv}", "",
    "{gw}/mcp/srv_tok_nothing",
])
def test_an_audience_that_is_not_exactly_this_server_or_the_base_is_refused(rig, audience):
    audience = audience.format(gw=rig.gw.url, srv=SRV, gw_localhost=rig.gw.url.replace("127.0.0.1", "localhost"))
    refused(rig, rig.sign(rig.claims(aud=audience)))


def test_a_list_audience_is_refused_even_when_it_names_this_server(rig):
    for audience in ([rig.resource()], [rig.resource(), f"{rig.gw.url}/mcp/"], [f"{rig.gw.url}/mcp/"]):
        refused(rig, rig.sign(rig.claims(aud=audience)))


def test_base_audience_reaches_only_servers_the_user_may_use(rig):
    """Both audiences are accepted at /mcp/{id}; the sharing rules are checked either way."""
    base = f"{rig.gw.url}/mcp/"
    accepted(rig, rig.sign(rig.claims(aud=base)))
    bob = rig.sign(rig.claims(aud=base, sub=BOB["sub"], email=BOB["email"]))
    refused(rig, bob, status=403, error=None)
    refused(rig, rig.tokens["bob_base"]["access_token"], status=403, error=None)


@pytest.mark.parametrize("changes", [
    {"exp": "+0"}, {"exp": "-1"}, {"nbf": "+120"}, {"iat": "+120"}, {"iat": "+86400", "exp": "+90000"},
])
def test_tokens_not_valid_now_are_refused(rig, changes):
    now = int(time.time())
    claims = rig.claims(**{k: now + int(v) for k, v in changes.items()})
    params = refused(rig, rig.sign(claims))
    assert params["error_description"]


_WRONG_TYPES = {
    "exp-string": {"exp": "9999999999"}, "nbf-without-exp": {"exp": None, "nbf": 1}, "sub-number": {"sub": 42},
    "aud-number": {"aud": 42}, "jti-list": {"jti": ["a", "b"]}, "jti-object": {"jti": {"a": 1}},
    "fid-number": {"fid": 5}, "fid-list": {"fid": ["x"]}, "scope-list": {"scope": ["mcp:invoke"]},
    "scope-number": {"scope": 7}, "email-list": {"email": ["alice@example.com"]}, "hd-number": {"hd": 5},
    "iat-string": {"iat": "1700000000"}, "exp-bool": {"exp": True}, "nbf-string": {"nbf": "1"},
    "client_id-number": {"client_id": 3}, "hd-list": {"hd": []}, "fid-zero": {"fid": 0},
    "sub-empty": {"sub": ""}, "jti-empty": {"jti": ""},
}


@pytest.mark.parametrize("case", list(_WRONG_TYPES))
def test_claims_of_the_wrong_type_are_refused_with_401_never_a_500(rig, case):
    refused(rig, rig.sign(rig.claims(**_WRONG_TYPES[case])))


def test_a_user_the_server_is_not_shared_with_is_refused_whatever_the_token_says(rig):
    """The token is genuine in form (the gateway's key) but names someone else: another
    sub, an unknown sub, or Alice's e-mail on another sub once Alice's sub owns the server."""
    for claims in (rig.claims(sub=BOB["sub"], email=BOB["email"]), rig.claims(sub="never-seen", email=None),
                   rig.claims(sub="mallory", email=ALICE["email"]),
                   rig.claims(sub="mallory", email=None, hd="example.com")):
        refused(rig, rig.sign(claims), status=403, error=None)


def test_a_fresh_token_of_a_revoked_family_is_refused(rig):
    """Revoking a refresh token stops its family: not only the access tokens already seen,
    but any token carrying that fid, even with a new jti."""
    issued = rig.tokens["alice_revoked"]
    fid = jwt.decode(issued["access_token"], options={"verify_signature": False})["fid"]
    accepted(rig, rig.sign(rig.claims(fid=fid)))
    revoked = rig.http.post("/revoke", data={"token": issued["refresh_token"], "client_id": rig.client_id})
    assert revoked.status_code == 200
    refused(rig, issued["access_token"])
    params = refused(rig, rig.sign(rig.claims(fid=fid)))
    assert "revoked" in params["error_description"]


def test_a_revoked_jti_stays_revoked_under_another_family(rig):
    jti = secrets.token_urlsafe(16)
    first, spare = rig.sign(rig.claims(jti=jti)), rig.sign(rig.claims(jti=jti))
    accepted(rig, spare)
    revoked = rig.http.post("/revoke", data={"token": first, "client_id": rig.client_id,
                                             "token_type_hint": "access_token"})
    assert revoked.status_code == 200
    refused(rig, first)
    refused(rig, spare)


# ------------------------------------------------------------------ scope per method


@pytest.mark.parametrize("message", [
    rpc("prompts/get", 3, name="greet"),
    rpc("completion/complete", 4, ref={"type": "ref/prompt", "name": "greet"}, argument={"name": "a", "value": "b"}),
    rpc("vendor/custom-action", 5),
    rpc("Tools/Call", 6, name="echo"),
    [rpc("ping", 8), CALL],  # the call hidden in a batch behind a connect method
    [rpc("tools/list", 9), rpc("resources/read", 10, uri="memo://x")],
], ids=["prompts-get", "completion", "unknown-method", "case-variant", "batch-call", "batch-read"])
def test_connect_only_token_cannot_invoke_by_any_method(rig, message):
    token = rig.tokens["alice_connect"]["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["scope"] == "mcp:connect"
    calls, logs = upstream_calls(rig), tracebacks(rig)
    response = send(rig, token, message)
    if isinstance(message, list) and response.status_code == 400:
        # A server may refuse batches outright (2025-06-18 dropped them): also no forwarding.
        assert response.json()["error"]["code"] in (-32600, -32602), response.text
        assert upstream_calls(rig) == calls
        return
    params = assert_refused(rig, response, calls, status=403, error="insufficient_scope", logs_before=logs)
    assert "mcp:invoke" in params["scope"].split()


@pytest.mark.parametrize("scope", [None, "", "offline_access", "mcp:connectx", "MCP:CONNECT MCP:INVOKE"])
def test_a_token_without_an_mcp_scope_cannot_even_connect(rig, scope):
    """DESIGN: initialize, ping and the */list methods need mcp:connect."""
    params = refused(rig, rig.sign(rig.claims(scope=scope)), rpc("tools/list", 2), status=403,
                     error="insufficient_scope")
    assert "mcp:connect" in params["scope"].split()


def test_the_stream_and_session_end_need_mcp_connect_too(rig):
    token = rig.sign(rig.claims(scope="offline_access"))
    for method in ("GET", "DELETE"):
        calls = upstream_calls(rig)
        response = rig.http.request(method, f"/mcp/{SRV}", headers={
            "Accept": ACCEPT, "Authorization": f"Bearer {token}", "Mcp-Session-Id": "s-1"})
        assert_refused(rig, response, calls, status=403, error="insufficient_scope")


@pytest.mark.parametrize("scope", ["mcp:connect", "mcp:invoke", "offline_access mcp:invoke"])
def test_connect_or_invoke_is_enough_to_connect(rig, scope):
    """mcp:invoke implies mcp:connect: a client that may call tools may list resources."""
    accepted(rig, rig.sign(rig.claims(scope=scope)), rpc("resources/list", 2))


def test_an_invoke_only_token_can_call(rig):
    accepted(rig, rig.sign(rig.claims(scope="mcp:invoke")))


def test_refresh_narrowed_to_offline_access_gives_no_connect_access(rig):
    issued = rig.tokens["alice_offline"]
    assert "offline_access" in issued["scope"].split()
    narrowed = rig.http.post("/token", data={"grant_type": "refresh_token", "refresh_token": issued["refresh_token"],
                                             "client_id": rig.client_id, "scope": "offline_access"})
    if narrowed.status_code == 400:  # refusing the narrowing outright is a fine answer too
        assert narrowed.json()["error"] == "invalid_scope"
        return
    assert narrowed.status_code == 200, narrowed.text
    token = narrowed.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["scope"] == ""
    refused(rig, token, rpc("tools/list", 2), status=403, error="insufficient_scope")


# ------------------------------------------------------------------ mangled encodings


def test_mangled_encodings_of_a_genuine_token_are_refused(rig):
    genuine = rig.tokens["alice"]["access_token"]
    other = rig.tokens["alice_connect"]["access_token"]
    head, body, signature = genuine.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    reencoded_body = b64url(json.dumps(payload, indent=1, sort_keys=True).encode())
    reencoded_head = b64url(json.dumps(header, separators=(", ", ": ")).encode())
    assert reencoded_body != body and reencoded_head != head
    variants = {
        "signature stripped": f"{head}.{body}.",
        "two segments": f"{head}.{body}",
        "truncated signature": f"{head}.{body}.{signature[:-6]}",
        "one byte short": genuine[:-1],
        "signature of another token": f"{head}.{body}.{other.split('.')[2]}",
        "payload re-encoded, same claims": f"{head}.{reencoded_body}.{signature}",
        "header re-encoded, same fields": f"{reencoded_head}.{body}.{signature}",
        "payload padded": f"{head}.{body}==.{signature}",
        "standard base64 alphabet": genuine.replace("-", "+").replace("_", "/"),
        "four segments": f"{genuine}.{signature}",
        "JWE-shaped": f"{head}.{body}.{signature}.{signature}.{signature}",
        "extra claim appended": f"{head}.{b64url(json.dumps({**payload, 'scope': 'admin'}).encode())}.{signature}",
        "leading dot": "." + genuine,
        "NUL inside": genuine[:20] + "%00" + genuine[20:],
    }
    for name, token in variants.items():
        assert token != genuine, name
        refused(rig, token)


# ---------------------------------------------------------- where the token is sent


def test_a_token_in_the_query_string_is_ignored(rig):
    """OAuth 2.1 / MCP: bearer tokens only in the Authorization header."""
    token = rig.tokens["alice"]["access_token"]
    for params in ({"access_token": token}, {"token": token}):
        calls = upstream_calls(rig)
        response = send(rig, None, params=params)
        assert_refused(rig, response, calls, error=None)
        assert "error" not in challenge_params(response)


@pytest.mark.parametrize("lines", [
    ["Bearer {good}", "Bearer not-a-jwt"],
    ["Bearer not-a-jwt", "Bearer {good}"],
    ["Bearer {good}", "Bearer {good}"],
    ["Bearer {good}", "Basic YWxpY2U6cHc="],
    ["Bearer {good}, Bearer {good}"],
    ["Bearer {good} trailing"],
])
def test_more_than_one_credential_is_refused(rig, lines):
    """RFC 6750 §3.1: more than one credential is a bad request; never pick one of them.
    The gateway reads repeated headers as one comma-joined value, which is no JWT:
    401 invalid_token (a 400 invalid_request would be as good)."""
    good = rig.tokens["alice"]["access_token"]
    calls = upstream_calls(rig)
    response = send(rig, None, raw_authorization=[line.format(good=good) for line in lines])
    assert response.status_code in (400, 401), (response.status_code, response.text)
    if response.status_code == 401:
        assert_refused(rig, response, calls)
    else:
        assert challenge_params(response)["error"] == "invalid_request"
        assert upstream_calls(rig) == calls


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_the_scheme_name_is_case_insensitive(rig, scheme):
    """RFC 9110 §11.1: auth schemes compare case-insensitively; refusing these would break clients."""
    calls = upstream_calls(rig)
    response = send(rig, None, raw_authorization=[f"{scheme} {rig.tokens['alice']['access_token']}"])
    assert response.status_code == 200, response.text
    assert upstream_calls(rig) == calls + 1


@pytest.mark.parametrize("line", ["Token {good}", "MAC {good}", "DPoP {good}", "Basic {good}", "{good}",
                                  "Bearer{good}"])
def test_other_schemes_carry_no_token(rig, line):
    """Only the Bearer scheme carries an access token: anything else is no credential at all."""
    calls = upstream_calls(rig)
    response = send(rig, None, raw_authorization=[line.format(good=rig.tokens["alice"]["access_token"])])
    assert_refused(rig, response, calls, error=None)


def _idp_tokens(idp) -> dict:
    """An ID token and access token the real OIDC provider issued to some client."""
    redirect = "http://127.0.0.1:9/idp-cb"
    client = idp.register_client([redirect])
    idp.set_user(ALICE["sub"], email=ALICE["email"], email_verified=True, name="Alice")
    query = {"client_id": client.client_id, "redirect_uri": redirect, "response_type": "code",
             "scope": "openid email profile", "state": "s", "nonce": "n"}
    url = f"{idp.authorization_endpoint}?{urlencode(query)}"
    with httpx.Client(trust_env=False, timeout=20) as http:
        answer = http.post(url, data={"sub": ALICE["sub"]})
        assert answer.status_code in (302, 303), answer.text[:300]
        code = dict(httpx.URL(answer.headers["location"]).params)["code"]
        tokens = http.post(idp.token_endpoint, data={"grant_type": "authorization_code", "code": code,
                                                     "redirect_uri": redirect},
                           auth=(client.client_id, client.client_secret))
        assert tokens.status_code == 200, tokens.text
        return tokens.json()


def test_tokens_the_identity_provider_issued_are_refused(rig, idp):
    """The IdP is trusted for sign-in, never as an issuer of access tokens for the gateway."""
    issued = _idp_tokens(idp)
    for name in ("id_token", "access_token"):
        refused(rig, issued[name])
