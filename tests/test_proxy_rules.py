"""HTTP-level rules of the MCP proxy at /mcp/{serverId}, against one real gateway process
(users signed in at the real OIDC provider process, tokens from the real /authorize and
/token), the `mcp` package's MCPServer as upstream, and a small Tornado upstream run in
this module that records what reaches it: bearer challenges, audiences, live grant
removal, scope step-up, session isolation across users, servers and gateway processes,
input limits, Origin, upstream failures and header hygiene, SSE relay, usage capture and
client disconnects."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest
import tornado.web

from tests.support.browser import ScriptedBrowser
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.ports import HeldPort
from tests.support.tokens import access_token, register_public_client

ALICE = {"sub": "alice-rules", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
BOB = {"sub": "bob-rules", "email": "bob@example.com", "email_verified": True, "name": "Bob"}
CAROL = {"sub": "carol-rules", "email": "carol@example.com", "email_verified": True, "name": "Carol"}
ALLOWED_ORIGIN = "https://app.example"
ACCEPT = "application/json, text/event-stream"
LEGACY = "2025-11-25"
MODERN = "2026-07-28"
API_KEY = "k-" + secrets.token_hex(6)

# Server ids (all created through the CLI).
SRV_A = "srv_rules_a"  # MCPServer, owner Alice, shared with Bob
SRV_B = "srv_rules_b"  # MCPServer, owner Alice only
SRV_GRANT = "srv_rules_grant"  # MCPServer, owner someone else, shared with Carol
SRV_DOWN = "srv_rules_down"  # nothing listens at its upstream
SRV_REC = "srv_rules_rec"  # recording upstream, with an upstream API key header
SRV_SSE = "srv_rules_sse"  # recording upstream answering a fixed SSE stream
SRV_IDENTITY = "rules-identity"
SRV_HANG_HEAD = "srv_rules_hang_head"  # upstream that never sends response headers
SRV_HANG_BODY = "srv_rules_hang_body"  # upstream that starts an SSE stream, then hangs
SRV_USAGE = "srv_rules_usage"  # MCPServer, only the usage test calls it

# The exact bytes the SSE upstream sends: ids, a retry field, CRLF framing in one event.
SSE_EVENTS = [
    b'retry: 1500\nid: ev-41\nevent: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
    b'"params":{"progressToken":"p1","progress":1,"total":2}}\n\n',
    b'id: ev-42\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
    b'"params":{"progressToken":"p1","progress":2,"total":2}}\r\n\r\n',
    b'id: ev-43\ndata: {"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"done"}]}}\n\n',
]


# --------------------------------------------------------------------- in-test upstream


class _UpstreamHandler(tornado.web.RequestHandler):
    """/json answers a JSON-RPC result, /sse the fixed SSE_EVENTS, /hang-head nothing at
    all, /hang-body one SSE event then nothing; every request is recorded."""

    SUPPORTED_METHODS = ("GET", "POST", "DELETE")

    def initialize(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self._released: asyncio.Future | None = None
        self.kind = ""

    async def post(self, kind: str) -> None:
        self.kind = kind
        self.upstream.record(kind, self.request)
        try:
            request_id = json.loads(self.request.body or b"null").get("id")
        except (ValueError, AttributeError):
            request_id = None
        if kind == "json":
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {"ok": True}}))
        elif kind == "sse":
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            for event in SSE_EVENTS:
                self.write(event)
                await self.flush()
                await asyncio.sleep(0.05)
            self.finish()
        elif kind in ("hang-head", "hang-body"):
            self._released = asyncio.get_running_loop().create_future()
            if kind == "hang-body":
                self.set_header("Content-Type", "text/event-stream")
                self.write(SSE_EVENTS[0])
                await self.flush()
            self.upstream.event("arrived", kind).set()
            try:
                await asyncio.wait_for(self._released, 40)
            except TimeoutError:
                pass
            if not self.request.connection.stream.closed():
                self.finish()
        else:
            self.send_error(404)

    get = post
    delete = post

    def on_connection_close(self) -> None:
        self.upstream.event("closed", self.kind).set()
        if self._released is not None and not self._released.done():
            self._released.set_result(None)


# ---------------------------------------------------------------------- token helpers


async def _all_tokens(gw: GatewayProcess) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
        client_id = await register_public_client(http, "Proxy rules")
        tokens: dict[str, str] = {}
        plan = {
            ALICE["sub"]: [("alice_a", SRV_A, None), ("alice_base", None, None),
                           ("alice_connect", SRV_A, "mcp:connect")],
            BOB["sub"]: [("bob_a", SRV_A, None), ("bob_base", None, None)],
            CAROL["sub"]: [("carol", SRV_GRANT, None)],
        }
        for who in (ALICE, BOB, CAROL):
            async with ScriptedBrowser() as browser:  # one browser (one sign-in) per person
                for name, server_id, scope in plan[who["sub"]]:
                    resource = f"{gw.url}/mcp/{server_id}" if server_id else None
                    tokens[name] = await access_token(gw.url, http, browser, client_id, who,
                                                      resource=resource, scope=scope)
        return tokens


# -------------------------------------------------------------------------- fixtures


@dataclass
class Rig:
    gw: GatewayProcess
    fake: FakeUpstream
    tokens: dict[str, str]
    http: httpx.Client = field(repr=False)

    @property
    def db(self) -> Path:
        return self.gw.state_dir / "gateway.db"


@pytest.fixture(scope="module")
def rig(idp, upstream, tmp_path_factory):
    fake = FakeUpstream(_UpstreamHandler).start()
    down = HeldPort()  # bound, never listening: refused, and no one else's meanwhile
    gw = GatewayProcess(tmp_path_factory.mktemp("proxy-rules"), idp=idp,
                        extra_env={"MCPGW_ALLOWED_ORIGINS": ALLOWED_ORIGIN})
    gw.use_idp_client(idp)
    gw.start()
    try:
        alice = ALICE["email"]
        gw.add_server(upstream.url, alice, "Rules A", "--id", SRV_A)
        gw.cli("grants", "add", SRV_A, "--email", BOB["email"])
        gw.add_server(upstream.url, alice, "Rules B", "--id", SRV_B)
        gw.add_server(upstream.url, "owner@example.com", "Rules grant", "--id", SRV_GRANT)
        gw.cli("grants", "add", SRV_GRANT, "--email", CAROL["email"])
        gw.add_server(f"{down.url}/mcp", alice, "Rules down", "--id", SRV_DOWN)
        gw.add_server(f"{fake.url}/json", alice, "Rules rec", "--id", SRV_REC, "--header", f"X-Api-Key: {API_KEY}")
        gw.add_server(f"{fake.url}/sse", alice, "Rules sse", "--id", SRV_SSE)
        gw.add_server(f"{fake.url}/json", alice, "Rules identity", "--id", SRV_IDENTITY, "--forward-identity")
        gw.add_server(f"{fake.url}/hang-head", alice, "Rules hang head", "--id", SRV_HANG_HEAD)
        gw.add_server(f"{fake.url}/hang-body", alice, "Rules hang body", "--id", SRV_HANG_BODY)
        gw.add_server(upstream.url, alice, "Rules usage", "--id", SRV_USAGE)
        tokens = asyncio.run(_all_tokens(gw))
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as http:
            yield Rig(gw, fake, tokens, http)
    finally:
        gw.stop()
        fake.stop()
        down.close()


# ---------------------------------------------------------------------- MCP helpers




INITIALIZE = rpc("initialize", 1, protocolVersion=LEGACY, capabilities={},
                 clientInfo={"name": "proxy-rules", "version": "1"})


def headers_for(token: str | None = None, *, session: str | None = None, version: str | None = LEGACY,
                **extra: str) -> dict[str, str]:
    headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if session:
        headers["Mcp-Session-Id"] = session
    if version:
        headers["MCP-Protocol-Version"] = version
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


def post(http: httpx.Client, server_id: str, token: str | None, message, *, base: str | None = None,
         **header_args) -> httpx.Response:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    url = f"{base or ''}/mcp/{server_id}"
    return http.post(url, content=body, headers=headers_for(token, **header_args))


def messages_of(response: httpx.Response) -> list[dict]:
    """The JSON-RPC messages of a JSON or SSE response body."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        found = []
        for block in response.text.replace("\r\n", "\n").split("\n\n"):
            data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
            if data and "".join(data).strip():
                found.append(json.loads("\n".join(data)))
        return found
    parsed = response.json()
    return parsed if isinstance(parsed, list) else [parsed]


def answer_to(response: httpx.Response, request_id) -> dict:
    for message in messages_of(response):
        if message.get("id") == request_id and "method" not in message:
            return message
    raise AssertionError(f"no answer to {request_id!r} in {response.text[:500]!r}")


def open_session(http: httpx.Client, server_id: str, token: str, *, base: str | None = None) -> str:
    """initialize + notifications/initialized, the 2025-era way; returns the gateway session id."""
    response = post(http, server_id, token, INITIALIZE, base=base)
    assert response.status_code == 200, (response.status_code, response.text)
    assert "result" in answer_to(response, 1)
    session = response.headers["mcp-session-id"]
    initialized = post(http, server_id, token, rpc("notifications/initialized", None), session=session, base=base)
    assert initialized.status_code == 202, (initialized.status_code, initialized.text)
    return session


def list_tools(http: httpx.Client, server_id: str, token: str, session: str, *,
               base: str | None = None) -> httpx.Response:
    return post(http, server_id, token, rpc("tools/list", 2), session=session, base=base)


def challenge_params(response: httpx.Response) -> dict[str, str]:
    header = response.headers["www-authenticate"]
    assert header.startswith("Bearer "), header
    params = {}
    for part in header[len("Bearer "):].split(", "):
        name, _, value = part.partition("=")
        assert value.startswith('"') and value.endswith('"'), header
        params[name] = value[1:-1]
    return params


def jsonrpc_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["jsonrpc"] == "2.0" and isinstance(body["error"]["message"], str), body
    return body


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ------------------------------------------------------------------ 1. bearer challenge


@pytest.mark.parametrize("verb", ["POST", "GET", "DELETE"])
@pytest.mark.parametrize("credentials", [None, "Bearer not-a-jwt", "Basic YWxpY2U6cHc=", "Bearer"])
def test_missing_or_bad_token_is_a_401_challenge_naming_the_server_prm(rig, verb, credentials):
    headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
    if credentials:
        headers["Authorization"] = credentials
    content = json.dumps(rpc("ping")).encode() if verb == "POST" else None
    response = rig.http.request(verb, f"/mcp/{SRV_A}", content=content, headers=headers)
    assert response.status_code == 401, (response.status_code, response.text)
    params = challenge_params(response)
    assert params["resource_metadata"] == f"{rig.gw.url}/.well-known/oauth-protected-resource/mcp/{SRV_A}"
    assert set(params["scope"].split()) == {"mcp:connect", "mcp:invoke"}
    sent_a_bearer_token = credentials == "Bearer not-a-jwt"
    assert (params.get("error") == "invalid_token") == sent_a_bearer_token, params
    if not sent_a_bearer_token:
        assert "error" not in params
    # The advertised metadata really is this server's PRM.
    prm = rig.http.get(params["resource_metadata"].removeprefix(rig.gw.url)).json()
    assert prm["resource"] == f"{rig.gw.url}/mcp/{SRV_A}"


def test_token_signed_by_a_foreign_key_is_invalid_token(rig):
    # Same claims shape, signed by a key the gateway never issued.
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    forged = jwt.encode({"iss": rig.gw.url, "sub": ALICE["sub"], "aud": f"{rig.gw.url}/mcp/{SRV_A}",
                         "scope": "mcp:connect mcp:invoke", "iat": now, "exp": now + 600, "jti": "x"},
                        key, algorithm="RS256", headers={"kid": "forged"})
    response = post(rig.http, SRV_A, forged, rpc("ping"))
    assert response.status_code == 401
    assert challenge_params(response)["error"] == "invalid_token"


def test_expired_token_signed_with_the_gateways_own_key_is_invalid_token(rig):
    """The gateway's real signing key (read from its own storage and master secret, as a
    second instance would) signs a token that expired a second ago: refused with 401."""
    from config import Config
    from services import build_services

    async def mint() -> str:
        env = {k: v for k, v in rig.gw.env.items() if k.startswith("MCPGW_")}
        services = build_services(Config.from_env(env))
        await services.start(background=False)
        try:
            now = int(time.time())
            return services.keyring.sign({
                "iss": rig.gw.url, "sub": ALICE["sub"], "aud": f"{rig.gw.url}/mcp/{SRV_A}",
                "scope": "mcp:connect mcp:invoke", "email": ALICE["email"], "client_id": "c",
                "iat": now - 3601, "exp": now - 1, "jti": "expired-1", "fid": "f"})
        finally:
            await services.stop()

    expired = asyncio.run(mint())
    response = post(rig.http, SRV_A, expired, rpc("ping"))
    assert response.status_code == 401
    params = challenge_params(response)
    assert params["error"] == "invalid_token" and "expired" in params["error_description"]


def test_preflight_needs_no_auth_and_exposes_session_and_challenge_headers(rig):
    response = rig.http.options(f"/mcp/{SRV_A}", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id, mcp-protocol-version",
    })
    assert response.status_code in (200, 204), (response.status_code, response.text)
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"mcp-session-id", "www-authenticate"} <= exposed
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "mcp-session-id", "mcp-protocol-version"} <= allowed
    assert "POST" in response.headers["access-control-allow-methods"]
    # The 401 that follows is readable by that origin, challenge included.
    unauthenticated = rig.http.post(f"/mcp/{SRV_A}", json=rpc("ping"), headers={"Origin": ALLOWED_ORIGIN})
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "www-authenticate" in unauthenticated.headers["access-control-expose-headers"].lower()


# --------------------------------------------------------------------- 2. unknown server


@pytest.mark.parametrize("verb", ["POST", "GET", "DELETE"])
def test_unknown_server_is_a_404_json_error(rig, verb):
    headers = headers_for(rig.tokens["alice_base"])
    content = json.dumps(rpc("ping")).encode() if verb == "POST" else None
    response = rig.http.request(verb, "/mcp/srv_rules_nothing_here", content=content, headers=headers)
    assert response.status_code == 404, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == "not_found"
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize("verb", ["POST", "GET", "DELETE"])
def test_unknown_server_without_a_token_is_a_401_first(rig, verb):
    """The token is checked before the server is looked up (issue 8): no server id, real
    or not, is answered before the caller authenticates."""
    content = json.dumps(rpc("ping")).encode() if verb == "POST" else None
    response = rig.http.request(verb, "/mcp/srv_rules_nothing_here", content=content, headers=headers_for(None))
    assert response.status_code == 401, (response.status_code, response.text)
    challenge = response.headers["www-authenticate"]
    assert f'resource_metadata="{rig.gw.url}/.well-known/oauth-protected-resource/mcp/srv_rules_nothing_here"' \
        in challenge, challenge
    assert jsonrpc_error(response, 401)["error"]["code"] == -32001


# ------------------------------------------------------------------------ 3. audiences


def test_token_for_one_server_is_refused_at_another(rig):
    claims = jwt.decode(rig.tokens["alice_a"], options={"verify_signature": False})
    assert claims["aud"] == f"{rig.gw.url}/mcp/{SRV_A}"
    response = post(rig.http, SRV_B, rig.tokens["alice_a"], INITIALIZE)
    assert response.status_code == 401, (response.status_code, response.text)
    params = challenge_params(response)
    assert params["error"] == "invalid_token"
    assert params["resource_metadata"] == f"{rig.gw.url}/.well-known/oauth-protected-resource/mcp/{SRV_B}"
    # ...while at its own server it works.
    assert post(rig.http, SRV_A, rig.tokens["alice_a"], INITIALIZE).status_code == 200


def test_base_audience_token_works_wherever_the_user_may_go(rig):
    claims = jwt.decode(rig.tokens["alice_base"], options={"verify_signature": False})
    assert claims["aud"] == f"{rig.gw.url}/mcp/"
    for server_id in (SRV_A, SRV_B):
        session = open_session(rig.http, server_id, rig.tokens["alice_base"])
        listed = list_tools(rig.http, server_id, rig.tokens["alice_base"], session)
        assert listed.status_code == 200 and "echo" in json.dumps(answer_to(listed, 2))
    # Bob's base token: fine on the server shared with him, 403 where he has no grant.
    assert post(rig.http, SRV_A, rig.tokens["bob_base"], INITIALIZE).status_code == 200
    refused = jsonrpc_error(post(rig.http, SRV_B, rig.tokens["bob_base"], INITIALIZE), 403)
    assert "shared" in refused["error"]["message"]


# -------------------------------------------------------------------- 4. grant removal


def test_removed_grant_is_refused_within_seconds_with_a_reason(rig):
    token = rig.tokens["carol"]
    session = open_session(rig.http, SRV_GRANT, token)
    assert list_tools(rig.http, SRV_GRANT, token, session).status_code == 200
    rig.gw.cli("grants", "remove", SRV_GRANT, "--email", CAROL["email"])
    removed_at = time.monotonic()

    def refused():
        response = list_tools(rig.http, SRV_GRANT, token, session)
        assert response.status_code in (200, 403), (response.status_code, response.text)
        return response if response.status_code == 403 else None

    response = wait_for(refused, 10, 0.25)
    assert response is not None, "the removed grant was still honoured after 10 s"
    assert time.monotonic() - removed_at < 10
    body = jsonrpc_error(response, 403)
    assert "access denied" in body["error"]["message"] and "shared" in body["error"]["message"]
    # A fresh initialize is refused too, as is every verb.
    assert post(rig.http, SRV_GRANT, token, INITIALIZE).status_code == 403
    assert rig.http.delete(f"/mcp/{SRV_GRANT}", headers=headers_for(token, session=session)).status_code == 403


# ------------------------------------------------------------------- 5. scope step-up


def test_connect_only_token_lists_but_tool_calls_need_invoke(rig):
    token = rig.tokens["alice_connect"]
    assert jwt.decode(token, options={"verify_signature": False})["scope"] == "mcp:connect"
    session = open_session(rig.http, SRV_A, token)
    listed = list_tools(rig.http, SRV_A, token, session)
    assert listed.status_code == 200
    assert "echo" in {tool["name"] for tool in answer_to(listed, 2)["result"]["tools"]}
    assert post(rig.http, SRV_A, token, rpc("ping", 3), session=session).status_code == 200

    for method, params in (("tools/call", {"name": "echo", "arguments": {"text": "x"}}),
                           ("resources/read", {"uri": "memo://greeting"})):
        response = post(rig.http, SRV_A, token, rpc(method, 4, **params), session=session)
        assert response.status_code == 403, (response.status_code, response.text)
        challenge = challenge_params(response)
        assert challenge["error"] == "insufficient_scope"
        assert "mcp:invoke" in challenge["scope"].split()
        assert challenge["resource_metadata"] == f"{rig.gw.url}/.well-known/oauth-protected-resource/mcp/{SRV_A}"
        assert response.json()["error"]["code"] == -32003


# --------------------------------------------------------------- 6. session isolation


def session_row(rig: Rig, session_id: str):
    with sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True) as conn:
        return conn.execute(
            "SELECT upstream_session_id, user_sub, server_id, protocol_version FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()


def test_sessions_are_the_gateways_own_and_bound_to_user_and_server(rig):
    alice, bob = rig.tokens["alice_base"], rig.tokens["bob_a"]
    session = open_session(rig.http, SRV_A, alice)
    assert session.startswith("mcpgw-") and len(session) > 30
    upstream_id, user_sub, server_id, version = session_row(rig, session)
    assert version == LEGACY  # from the initialize body (the header only follows it)
    assert upstream_id and upstream_id != session and upstream_id not in session
    assert (user_sub, server_id) == (ALICE["sub"], SRV_A)
    assert list_tools(rig.http, SRV_A, alice, session).status_code == 200

    # Bob may use SRV_A, but not Alice's session: not for a call, a stream, nor to end it.
    stolen = post(rig.http, SRV_A, bob, rpc("tools/list", 9), session=session)
    assert jsonrpc_error(stolen, 404)["id"] == 9
    assert rig.http.get(f"/mcp/{SRV_A}", headers=headers_for(bob, session=session)).status_code == 404
    assert rig.http.delete(f"/mcp/{SRV_A}", headers=headers_for(bob, session=session)).status_code == 404
    # Alice herself, at another server, with the same id: nothing there.
    assert post(rig.http, SRV_B, alice, rpc("tools/list", 2), session=session).status_code == 404
    # An id the gateway never issued (e.g. the upstream's own) finds nothing either.
    assert list_tools(rig.http, SRV_A, alice, upstream_id).status_code == 404
    # None of that harmed Alice's session.
    assert list_tools(rig.http, SRV_A, alice, session).status_code == 200

    ended = rig.http.delete(f"/mcp/{SRV_A}", headers=headers_for(alice, session=session))
    assert ended.status_code < 300, (ended.status_code, ended.text)
    assert session_row(rig, session) is None
    assert list_tools(rig.http, SRV_A, alice, session).status_code == 404


def test_a_session_continues_on_another_gateway_process_sharing_storage(rig, gateway_factory):
    alice = rig.tokens["alice_base"]
    session = open_session(rig.http, SRV_A, alice)
    second = gateway_factory("gw2", share_storage_with=rig.gw)
    assert second.listen_url != rig.gw.listen_url and second.url == rig.gw.url
    listed = list_tools(rig.http, SRV_A, alice, session, base=second.listen_url)
    assert listed.status_code == 200, (listed.status_code, listed.text)
    assert "echo" in json.dumps(answer_to(listed, 2))
    called = post(rig.http, SRV_A, alice, rpc("tools/call", 5, name="echo", arguments={"text": "2nd"}),
                  session=session, base=second.listen_url)
    assert "echo: 2nd" in json.dumps(answer_to(called, 5))
    # Still bound to Alice on the second process.
    assert list_tools(rig.http, SRV_A, rig.tokens["bob_a"], session, base=second.listen_url).status_code == 404
    # Ended on the second, gone on the first.
    ended = rig.http.delete(f"{second.listen_url}/mcp/{SRV_A}", headers=headers_for(alice, session=session))
    assert ended.status_code < 300
    assert list_tools(rig.http, SRV_A, alice, session).status_code == 404


# ------------------------------------------------------------------------ 7. bad input


def test_invalid_json_is_a_400_parse_error(rig):
    session = open_session(rig.http, SRV_A, rig.tokens["alice_a"])
    for body in (b"{not json", b"\xff\xfe", b""):
        response = post(rig.http, SRV_A, rig.tokens["alice_a"], body, session=session)
        assert jsonrpc_error(response, 400)["error"]["code"] == -32700
    not_rpc = post(rig.http, SRV_A, rig.tokens["alice_a"], {"method": "ping", "id": 1}, session=session)
    assert jsonrpc_error(not_rpc, 400)["error"]["code"] == -32600


def test_oversized_body_is_a_413(rig):
    padding = "x" * (1024 * 1024 + 10)
    body = json.dumps(rpc("tools/call", 1, name="echo", arguments={"text": padding})).encode()
    response = post(rig.http, SRV_A, rig.tokens["alice_a"], body)
    assert jsonrpc_error(response, 413)["error"]["code"] == -32600


def test_modern_routing_header_must_match_the_body(rig):
    token = rig.tokens["alice_a"]
    call = rpc("tools/call", 11, name="echo", arguments={"text": "x"})
    wrong_method = post(rig.http, SRV_A, token, call, version=MODERN, Mcp_Method="tools/list", Mcp_Name="echo")
    body = jsonrpc_error(wrong_method, 400)
    assert body["error"]["code"] == -32020 and body["id"] == 11
    wrong_name = post(rig.http, SRV_A, token, call, version=MODERN, Mcp_Method="tools/call", Mcp_Name="fail")
    assert jsonrpc_error(wrong_name, 400)["error"]["code"] == -32020


# --------------------------------------------------------------------------- 8. Origin


def test_foreign_browser_origin_is_refused_and_no_origin_passes(rig):
    token = rig.tokens["alice_a"]
    foreign = rig.http.post(f"/mcp/{SRV_A}", content=json.dumps(INITIALIZE),
                            headers={**headers_for(token), "Origin": "https://evil.example"})
    assert jsonrpc_error(foreign, 403)["error"]["code"] == -32003
    assert "origin" in foreign.json()["error"]["message"].lower()
    assert "access-control-allow-origin" not in foreign.headers  # a foreign page reads nothing
    allowed = rig.http.post(f"/mcp/{SRV_A}", content=json.dumps(INITIALIZE),
                            headers={**headers_for(token), "Origin": ALLOWED_ORIGIN})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert post(rig.http, SRV_A, token, INITIALIZE).status_code == 200  # no Origin: a native client


# -------------------------------------------------------------- 9. upstream hygiene


def test_unreachable_upstream_is_a_502_jsonrpc_error(rig):
    response = post(rig.http, SRV_DOWN, rig.tokens["alice_base"], rpc("tools/list", 21))
    body = jsonrpc_error(response, 502)
    assert body["id"] == 21 and body["error"]["code"] == -32603


def test_client_credentials_never_reach_the_upstream_but_server_headers_do(rig):
    token = rig.tokens["alice_base"]
    before = len(rig.fake.requests)
    extra = {"Cookie": "mcpgw_signin=secret-cookie; other=1", "Proxy-Authorization": "Basic eDp5"}
    response = rig.http.post(f"/mcp/{SRV_REC}", content=json.dumps(rpc("resources/list", 31)),
                             headers={**headers_for(token), **extra})
    assert response.status_code == 200, response.text
    assert answer_to(response, 31)["result"] == {"ok": True}
    assert response.headers["content-type"].startswith("application/json")
    for verb in ("GET", "DELETE"):
        assert rig.http.request(verb, f"/mcp/{SRV_REC}", headers={**headers_for(token), **extra}).status_code == 200
    arrived = rig.fake.requests[before:]
    assert [r["method"] for r in arrived] == ["POST", "GET", "DELETE"]
    for request in arrived:
        headers = request["headers"]
        assert "authorization" not in headers and "cookie" not in headers
        assert "proxy-authorization" not in headers
        assert token not in json.dumps(headers) and "secret-cookie" not in json.dumps(headers)
        assert headers["x-api-key"] == [API_KEY]
        assert headers["mcp-protocol-version"] == [LEGACY]
    assert json.loads(arrived[0]["body"])["id"] == 31


def test_identity_forwarding_sends_a_gateway_signed_assertion_for_the_upstream(rig):
    token = rig.tokens["alice_base"]
    before = len(rig.fake.requests)
    response = rig.http.post(f"/mcp/{SRV_IDENTITY}", content=json.dumps(rpc("resources/list", 32)),
                             headers=headers_for(token))
    assert response.status_code == 200, response.text
    headers = rig.fake.requests[before]["headers"]
    assert headers["x-mcpgw-user-sub"] == [ALICE["sub"]]
    assert headers["x-mcpgw-user-email"] == [ALICE["email"]]
    assertion = headers["x-mcpgw-identity"][0]
    assert assertion != token  # never the client's own token
    keys = rig.http.get("/jwks.json").json()["keys"]
    key = next(k for k in keys if k["kid"] == jwt.get_unverified_header(assertion)["kid"])
    claims = jwt.decode(assertion, jwt.PyJWK(key).key, algorithms=["RS256"],
                        audience=f"{rig.fake.url}/json", issuer=rig.gw.url)
    assert claims["sub"] == ALICE["sub"] and claims["exp"] - claims["iat"] <= 300
    # A server without the opt-in gets none of it.
    before = len(rig.fake.requests)
    rig.http.post(f"/mcp/{SRV_REC}", content=json.dumps(rpc("resources/list", 33)), headers=headers_for(token))
    assert not any(name.startswith("x-mcpgw") for name in rig.fake.requests[before]["headers"])


# ------------------------------------------------------------------------------ 10. SSE


def test_tool_progress_is_relayed_as_an_unbuffered_event_stream(rig):
    token = rig.tokens["alice_base"]
    session = open_session(rig.http, SRV_A, token)
    call = rpc("tools/call", 41, name="count", arguments={"steps": 3}, _meta={"progressToken": "tok-41"})
    with rig.http.stream("POST", f"/mcp/{SRV_A}", content=json.dumps(call),
                         headers=headers_for(token, session=session)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache, no-transform"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-length" not in response.headers
        response.read()
    found = messages_of(response)
    progress = [m["params"]["progress"] for m in found if m.get("method") == "notifications/progress"]
    assert progress == [1, 2, 3]
    assert answer_to(response, 41)["result"]["content"][0]["text"] == "counted 3"


def test_sse_events_are_relayed_byte_for_byte_with_their_ids(rig):
    with rig.http.stream("POST", f"/mcp/{SRV_SSE}", content=json.dumps(rpc("tools/call", 7, name="x")),
                         headers=headers_for(rig.tokens["alice_base"])) as response:
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-cache, no-transform"
        assert response.headers["x-accel-buffering"] == "no"
        body = response.read()
    assert body == b"".join(SSE_EVENTS)
    for event_id in ("ev-41", "ev-42", "ev-43"):
        assert f"id: {event_id}".encode() in body


# ---------------------------------------------------------------------- 11. usage


def test_usage_rows_name_user_tool_and_outcome_but_never_arguments(rig):
    token = rig.tokens["alice_base"]
    marker = "ARG-SECRET-" + secrets.token_hex(8)
    session = open_session(rig.http, SRV_USAGE, token)
    ok = post(rig.http, SRV_USAGE, token, rpc("tools/call", 51, name="echo", arguments={"text": marker}),
              session=session)
    assert marker in json.dumps(answer_to(ok, 51))
    failed = post(rig.http, SRV_USAGE, token, rpc("tools/call", 52, name="fail", arguments={"why": marker}),
                  session=session)
    assert answer_to(failed, 52)["result"]["isError"] is True

    def rows():
        with sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            found = [dict(r) for r in conn.execute(
                "SELECT * FROM usage_events WHERE server_id = ? AND method = 'tools/call' ORDER BY id",
                (SRV_USAGE,))]
        return found if len(found) >= 2 else None

    found = wait_for(rows, 8, 0.3)  # the recorder flushes in batches, about once a second
    assert found, "no usage rows were flushed"
    by_target = {row["target"]: row for row in found}
    assert by_target["echo"]["outcome"] == "ok"
    assert by_target["fail"]["outcome"] == "tool_error"
    for row in found:
        assert row["user_sub"] == ALICE["sub"] and row["user_email"] == ALICE["email"]
        assert row["era"] == "2025" and row["bytes_in"] > 0 and row["bytes_out"] > 0
        assert marker not in json.dumps(row)
    # Not in any table, nor in the write-ahead log.
    for path in (rig.db, rig.db.with_name("gateway.db-wal")):
        if path.exists():
            assert marker.encode() not in path.read_bytes(), path


# ------------------------------------------------------------ 12. client disconnect


@pytest.mark.parametrize("server_id, kind", [(SRV_HANG_HEAD, "hang-head"), (SRV_HANG_BODY, "hang-body")])
def test_client_disconnect_closes_the_upstream_request(rig, server_id, kind):
    body = json.dumps(rpc("tools/call", 61, name="slow", arguments={"seconds": 30})).encode()
    head = (f"POST /mcp/{server_id} HTTP/1.1\r\nHost: 127.0.0.1:{rig.gw.port}\r\n"
            f"Authorization: Bearer {rig.tokens['alice_base']}\r\nContent-Type: application/json\r\n"
            f"Accept: {ACCEPT}\r\nMCP-Protocol-Version: {LEGACY}\r\nContent-Length: {len(body)}\r\n\r\n")
    arrived, closed = rig.fake.event("arrived", kind), rig.fake.event("closed", kind)
    client = socket.create_connection(("127.0.0.1", rig.gw.port), timeout=10)
    try:
        client.sendall(head.encode() + body)
        assert arrived.wait(10), "the request never reached the upstream"
        if kind == "hang-body":
            received = b""
            while b"ev-41" not in received:  # the first event was relayed: we are mid-stream
                chunk = client.recv(65536)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
        assert not closed.is_set()
    finally:
        client.close()
    started = time.monotonic()
    assert closed.wait(8), f"the upstream request stayed open after the client left ({kind})"
    assert time.monotonic() - started < 8
