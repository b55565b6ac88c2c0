"""A real OAuth-protected upstream for tests: an OAuth 2.1 authorization server process (the `mcp`
SDK's auth routes over an in-memory provider) and an MCP server process (the SDK's MCPServer as a
resource server, verifying bearer tokens by introspection at that AS) with a tool `whoami`.

Run: python -m tests.support.oauth_upstream as --fd FD --issuer URL [--access-ttl S] [--user SUB]
     python -m tests.support.oauth_upstream mcp --fd FD --issuer URL --resource URL

The AS: RFC 8414 metadata, DCR (RFC 7591), authorization code + PKCE S256 with `resource`,
refresh tokens with rotation, revocation, introspection (RFC 7662, for the MCP server), access
tokens that live `--access-ttl` seconds, OpenID `/userinfo` (named in its metadata;
`userinfo_status` in `/_control` makes it answer that status instead). `/authorize` signs in, without any form, the user named
by the `as_user` cookie (set by `GET /signin?user=SUB`), else `--user`. Test controls:
`POST /_control` (JSON: `token_status` answers /token with that status; `rotate` false: a
refresh returns no new refresh token and keeps the old one; `access_ttl`: the lifetime of
tokens issued from now on; `cimd`: the metadata says client_id_metadata_document_supported; `revoke_user`: every token of that
subject dies; `expire_access`: that subject's access tokens die, its refresh tokens live; `issue_scopes`: what every code grants from now on), `GET /_stats` (token requests as seen: grant type, subject, `resource`; `introspected`: every
bearer token the MCP server received, in order).

`OAuthUpstream` starts both on sockets the test bound (the AS's port is a `HeldPort`, so
`stop_as()` leaves it refusing and `start_as()` serves it again).
"""

from __future__ import annotations

import contextvars
import json
import secrets
import subprocess
import sys
import time
from urllib.parse import parse_qs

CODE_TTL = 300
SCOPES = ["mcp"]
_user: contextvars.ContextVar[str] = contextvars.ContextVar("as_user", default="")


class TestProvider:
    """An in-memory OAuthAuthorizationServerProvider that signs the current test user in."""

    def __init__(self, default_user: str, access_ttl: float) -> None:
        self.default_user = default_user
        self.access_ttl = access_ttl
        self.clients: dict = {}
        self.codes: dict = {}
        self.access: dict = {}
        self.refresh: dict = {}
        self.rotate = True
        self.issue_scopes: list[str] = []  # when set, what every code grants, whatever was asked

    async def get_client(self, client_id: str):
        return self.clients.get(client_id)

    async def register_client(self, client_info) -> None:
        self.clients[client_info.client_id] = client_info

    async def authorize(self, client, params) -> str:
        from mcp.server.auth.provider import AuthorizationCode, construct_redirect_uri

        code = secrets.token_urlsafe(24)
        self.codes[code] = AuthorizationCode(
            code=code, scopes=self.issue_scopes or params.scopes or SCOPES, expires_at=time.time() + CODE_TTL,
            client_id=client.client_id, code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource, subject=_user.get() or self.default_user,
        )
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state)

    async def load_authorization_code(self, client, code: str):
        found = self.codes.get(code)
        return found if found is not None and found.client_id == client.client_id else None

    def _issue(self, client_id: str, scopes: list[str], resource, subject: str, refresh_token=None):
        from mcp.server.auth.provider import AccessToken, RefreshToken
        from mcp.shared.auth import OAuthToken

        access = "at-" + secrets.token_urlsafe(24)
        ttl = self.access_ttl
        self.access[access] = AccessToken(token=access, client_id=client_id, scopes=scopes,
                                          expires_at=int(time.time() + ttl), resource=resource,
                                          subject=subject)
        if refresh_token is None:
            refresh_token = "rt-" + secrets.token_urlsafe(24)
            self.refresh[refresh_token] = RefreshToken(token=refresh_token, client_id=client_id, scopes=scopes,
                                                       resource=resource, subject=subject)
            returned = refresh_token
        else:
            returned = None  # the old one stays valid, and none is returned
        return OAuthToken(access_token=access, expires_in=max(1, int(ttl)), refresh_token=returned,
                          scope=" ".join(scopes))

    async def exchange_authorization_code(self, client, authorization_code):
        del self.codes[authorization_code.code]
        return self._issue(client.client_id, authorization_code.scopes, authorization_code.resource,
                           authorization_code.subject or "")

    async def load_refresh_token(self, client, refresh_token: str):
        found = self.refresh.get(refresh_token)
        return found if found is not None and found.client_id == client.client_id else None

    async def exchange_refresh_token(self, client, refresh_token, scopes):
        if self.rotate:
            del self.refresh[refresh_token.token]
            return self._issue(client.client_id, scopes or refresh_token.scopes, refresh_token.resource,
                               refresh_token.subject or "")
        return self._issue(client.client_id, scopes or refresh_token.scopes, refresh_token.resource,
                           refresh_token.subject or "", refresh_token=refresh_token.token)

    async def load_access_token(self, token: str):
        found = self.access.get(token)
        if found is None or (found.expires_at or 0) < time.time():
            return None
        return found

    async def revoke_token(self, token) -> None:
        self.access.pop(token.token, None)
        self.refresh.pop(token.token, None)

    def revoke_user(self, subject: str) -> None:
        for table in (self.access, self.refresh):
            for key in [k for k, v in table.items() if v.subject == subject]:
                del table[key]


def as_app(issuer: str, default_user: str, access_ttl: float):
    """The authorization server's Starlette app."""
    from mcp.server.auth.routes import build_metadata, create_auth_routes
    from mcp.server.auth.settings import ClientRegistrationOptions, RevocationOptions
    from pydantic import AnyHttpUrl
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    provider = TestProvider(default_user, access_ttl)
    control: dict = {"token_status": 0}
    seen: list[dict] = []
    counts = {"register": 0, "revoke": 0, "userinfo": 0}
    introspected: list[dict] = []  # every bearer token the MCP server was sent, as it asked

    async def signin(request):
        response = PlainTextResponse("signed in")
        response.set_cookie("as_user", request.query_params.get("user", default_user), httponly=True)
        return response

    async def introspect(request):
        form = await request.form()
        token = await provider.load_access_token(str(form.get("token", "")))
        introspected.append({"token": str(form.get("token", "")), "active": token is not None})
        if token is None:
            return JSONResponse({"active": False})
        return JSONResponse({"active": True, "sub": token.subject, "client_id": token.client_id,
                             "scope": " ".join(token.scopes), "exp": token.expires_at, "aud": token.resource,
                             "iss": issuer})

    async def userinfo(request):
        """OpenID userinfo for a bearer access token this AS issued: who the account is."""
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        token = await provider.load_access_token(bearer) if scheme.lower() == "bearer" else None
        counts["userinfo"] += 1
        if control.get("userinfo_status"):  # e.g. 403: the scope granted does not cover userinfo
            return JSONResponse({"error": "insufficient_scope"}, status_code=control["userinfo_status"])
        if token is None:
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        return JSONResponse({"sub": token.subject})

    async def set_control(request):
        body = await request.json()
        if "rotate" in body:
            provider.rotate = bool(body["rotate"])
        if "cimd" in body:
            control["cimd"] = bool(body["cimd"])
        if "issue_scopes" in body:
            provider.issue_scopes = list(body["issue_scopes"])
        if "access_ttl" in body:
            provider.access_ttl = float(body["access_ttl"])
        if "userinfo_status" in body:
            control["userinfo_status"] = int(body["userinfo_status"])
        if "token_status" in body:
            control["token_status"] = int(body["token_status"])
        if body.get("revoke_user"):
            provider.revoke_user(body["revoke_user"])
        if body.get("expire_access"):  # the subject's access tokens die; its refresh tokens live
            for key in [k for k, v in provider.access.items() if v.subject == body["expire_access"]]:
                del provider.access[key]
        return JSONResponse({"ok": True})

    async def stats(request):
        return JSONResponse({"token_requests": seen, **counts, "clients": list(provider.clients),
                             "introspected": introspected})

    registration = ClientRegistrationOptions(enabled=True, valid_scopes=SCOPES, default_scopes=SCOPES)
    routes = create_auth_routes(provider, AnyHttpUrl(issuer), client_registration_options=registration,
                                revocation_options=RevocationOptions(enabled=True))
    metadata = build_metadata(AnyHttpUrl(issuer), None, registration, RevocationOptions(enabled=True))
    # The SDK's metadata plus an OpenID userinfo endpoint (the gateway's "connected as").
    plain = {**metadata.model_dump(mode="json", exclude_none=True), "userinfo_endpoint": f"{issuer.rstrip('/')}/userinfo"}
    with_cimd = {**plain, "client_id_metadata_document_supported": True}
    routes += [Route("/signin", signin), Route("/introspect", introspect, methods=["POST"]),
               Route("/userinfo", userinfo),
               Route("/_control", set_control, methods=["POST"]), Route("/_stats", stats)]
    app = Starlette(routes=routes)

    async def asgi(scope, receive, send):
        """Records token requests, applies the fault control and the user cookie."""
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path = scope["path"]
        cookies = dict(h for h in scope.get("headers", []) if h[0] == b"cookie")
        user = ""
        for part in cookies.get(b"cookie", b"").decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "as_user":
                user = value
        _user.set(user)
        if path == "/.well-known/oauth-authorization-server":
            return await JSONResponse(with_cimd if control.get("cimd") else plain)(scope, receive, send)
        if path in ("/register", "/revoke"):
            counts[path[1:]] += 1
        if path != "/token":
            return await app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        form = {k: v[0] for k, v in parse_qs(body.decode("latin-1")).items()}
        subject = ""
        if form.get("grant_type") == "refresh_token" and form.get("refresh_token") in provider.refresh:
            subject = provider.refresh[form["refresh_token"]].subject or ""
        elif form.get("code") in provider.codes:
            subject = provider.codes[form["code"]].subject or ""
        seen.append({"grant_type": form.get("grant_type", ""), "resource": form.get("resource"),
                     "subject": subject, "at": time.time()})
        if control["token_status"]:
            response = JSONResponse({"error": "temporarily_unavailable"}, status_code=control["token_status"])
            return await response(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await app(scope, replay, send)

    return asgi


class IntrospectionVerifier:
    """The MCP server's TokenVerifier: asks the AS (RFC 7662) what a bearer token is."""

    def __init__(self, introspection_url: str) -> None:
        self.url = introspection_url

    async def verify_token(self, token: str):
        import httpx
        from mcp.server.auth.provider import AccessToken

        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            answer = (await http.post(self.url, data={"token": token})).json()
        if not answer.get("active"):
            return None
        return AccessToken(token=token, client_id=answer["client_id"], scopes=answer["scope"].split(),
                           expires_at=answer.get("exp"), resource=answer.get("aud"), subject=answer.get("sub"))


def mcp_app(issuer: str, resource: str):
    """The resource server: an MCPServer whose tool `whoami` answers the token's subject."""
    from mcp.server.auth.middleware.auth_context import get_access_token
    from mcp.server.auth.settings import AuthSettings
    from mcp.server.mcpserver import MCPServer

    server = MCPServer(
        "oauth-upstream",
        token_verifier=IntrospectionVerifier(issuer.rstrip("/") + "/introspect"),
        auth=AuthSettings(issuer_url=issuer, resource_server_url=resource, required_scopes=SCOPES,
                          validate_token_resource=True),
    )

    @server.tool()
    def whoami() -> str:
        """The upstream identity: the subject of the bearer token this server sees."""
        token = get_access_token()
        return token.subject if token is not None and token.subject else "anonymous"

    return server.streamable_http_app(host="127.0.0.1")


def main(argv: list[str]) -> None:
    import anyio
    import uvicorn

    role = argv[0]

    def option(name: str, default: str = "") -> str:
        return argv[argv.index(name) + 1] if name in argv else default

    issuer = option("--issuer")
    if role == "as":
        app = as_app(issuer, option("--user", "upstream-user"), float(option("--access-ttl", "3600")))
    else:
        app = mcp_app(issuer, option("--resource"))
    config = uvicorn.Config(app, fd=int(option("--fd")), log_level="warning")
    anyio.run(uvicorn.Server(config).serve)


class OAuthUpstream:
    """Both processes, each on a socket this object bound: `.issuer` (the AS), `.mcp_url`."""

    def __init__(self, access_ttl: float = 3600, user: str = "upstream-user") -> None:
        from tests.support.ports import HeldPort, bind_unused_port

        self.access_ttl, self.user = access_ttl, user
        self._as_port = HeldPort()
        self.issuer = self._as_port.url
        sock, port = bind_unused_port()
        self.base = f"http://127.0.0.1:{port}"
        self.mcp_url = f"{self.base}/mcp"
        self.as_process: subprocess.Popen | None = None
        with sock:
            self.mcp_process = self._spawn(sock, "mcp", "--issuer", self.issuer, "--resource", self.mcp_url)
        self.start_as()

    @staticmethod
    def _spawn(sock, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.oauth_upstream", args[0], "--fd", str(sock.fileno()), *args[1:]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
        )

    def start_as(self) -> None:
        """(Re)start the authorization server on its held port; its state starts empty."""
        with self._as_port.listen() as sock:
            self.as_process = self._spawn(sock, "as", "--issuer", self.issuer, "--user", self.user,
                                          "--access-ttl", str(self.access_ttl))

    def stop_as(self) -> None:
        """Stop the AS: its port keeps refusing connections (held, never listening)."""
        if self.as_process is not None:
            self.as_process.terminate()
            self.as_process.wait(10)
            self.as_process = None

    def wait_ready(self) -> OAuthUpstream:
        import httpx

        deadline = time.monotonic() + 30
        for url, process in ((f"{self.issuer}/.well-known/oauth-authorization-server", lambda: self.as_process),
                             (f"{self.base}/.well-known/oauth-protected-resource/mcp", lambda: self.mcp_process)):
            while True:
                if process() is None or process().poll() is not None:
                    raise RuntimeError(f"the OAuth upstream process for {url} exited")
                try:
                    httpx.get(url, timeout=5, trust_env=False)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{url} did not answer") from None
                    time.sleep(0.05)
        return self

    def control(self, **settings) -> None:
        import httpx

        httpx.post(f"{self.issuer}/_control", content=json.dumps(settings), trust_env=False,
                   headers={"Content-Type": "application/json"}, timeout=5).raise_for_status()

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.issuer}/_stats", trust_env=False, timeout=5).json()

    def stop(self) -> None:
        self.stop_as()
        self.mcp_process.terminate()
        self.mcp_process.wait(10)
        self._as_port.close()


if __name__ == "__main__":
    main(sys.argv[1:])
