"""Drive the MCP Python SDK's own OAuth client (mcp 2.3.0) against the gateway, with no human.

The SDK's ``OAuthClientProvider`` does discovery, registration, PKCE and the token
exchange; its redirect/callback hooks are wired to a ``ScriptedBrowser`` that walks the
gateway's sign-in, IdP and consent pages.

The SDK API this relies on (mcp 2.3.0, read from its source)::

    from mcp.client.auth import OAuthClientProvider, TokenStorage, AuthorizationCodeResult
    OAuthClientProvider(
        server_url: str,                                # the MCP URL, e.g. GW/mcp/srv_x
        client_metadata: OAuthClientMetadata,           # mcp.shared.auth; mutated (scope)
        storage: TokenStorage,                          # async get/set_tokens, get/set_client_info
        redirect_handler: Callable[[str], Awaitable[None]] | None = None,   # gets the /authorize URL
        callback_handler: Callable[[], Awaitable[AuthorizationCodeResult]] | None = None,
        client_metadata_url: str | None = None,         # CIMD client id (https, non-root path)
        validate_resource_url: Callable[[str, str | None], Awaitable[None]] | None = None,
    )                                                   # an httpx2.Auth
    OAuthClientMetadata(redirect_uris=[...], client_name=..., scope=None,
        token_endpoint_auth_method=None, grant_types=["authorization_code", "refresh_token"],
        response_types=["code"], application_type="native")
    AuthorizationCodeResult(code: str, state: str | None = None, iss: str | None = None)

    # An authenticated session: the Client has no auth= argument; pass a transport.
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    async with httpx2.AsyncClient(auth=provider) as http:
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as c:
            await c.list_tools()

``mode`` (``Client(..., mode=...)``): ``"legacy"`` sends ``initialize`` (protocolVersion
2025-11-25, a session via Mcp-Session-Id); ``"auto"`` (the default) first POSTs
``server/discover`` with ``MCP-Protocol-Version: 2026-07-28`` and falls back to
``initialize`` on any JSON-RPC/HTTP-4xx error except -32022 naming only modern versions;
``"2026-07-28"`` adopts the modern era with no probe at all.

What the provider sends (on the first 401 or 403 ``insufficient_scope``):
PRM from ``WWW-Authenticate: resource_metadata=`` then ``/.well-known/oauth-protected-resource{path}``
then the root PRM; PRM ``resource`` must be a same-origin path prefix of ``server_url``;
AS metadata from ``/.well-known/oauth-authorization-server`` then ``openid-configuration``,
whose ``issuer`` must equal the PRM's first ``authorization_servers`` entry. Scope = the
``WWW-Authenticate`` scope, else PRM ``scopes_supported``, else AS ``scopes_supported``,
plus ``offline_access`` when the AS lists it. DCR body: ``redirect_uris``, ``client_name``,
``scope``, ``grant_types``, ``response_types``, ``application_type: "native"``, no
``token_endpoint_auth_method`` unless set. Authorize: ``response_type=code, client_id,
redirect_uri, state, code_challenge(S256), resource, scope`` and ``prompt=consent`` when
``offline_access`` is in the scope; it checks ``state`` and ``iss`` (``iss`` required when the
AS advertises ``authorization_response_iss_parameter_supported``). Token and refresh:
``client_id``, ``resource`` (whenever a PRM was found), client auth per the registration
(``client_secret_basic`` header, ``client_secret_post`` body, or none).

Refresh: only proactive. Before each request, if the access token's known expiry
(``expires_in``) has passed and a refresh token exists, it refreshes; a failed refresh clears
the tokens and a 401 then runs the whole authorization again. ``expire_access_token`` makes
the next request refresh the SDK's way; ``refresh_now`` refreshes immediately.

This module's API::

    InMemoryTokenStorage()                       # .tokens, .client_info, .token_history
    BrowserAuthorizer(browser, redirect_uri, *, idp_login=None, email=None, consent="approve")
        .redirect_handler / .callback_handler; .authorization_urls, .results
    rig = make_oauth_rig(server_url, browser, *, redirect_uri=DEFAULT_REDIRECT_URI,
                         idp_login=None, email=None, consent="approve", client_name=...,
                         scope=None, token_endpoint_auth_method=None,
                         client_metadata_url=None, storage=None)
        rig.provider, rig.storage, rig.authorizer, rig.server_url
    async with connect(rig, mode="legacy" | "auto" | "2026-07-28", **client_kwargs) as client: ...
    tokens = await obtain_tokens(rig, mode="legacy")   # runs the flow via a real session
    expire_access_token(rig)                     # next request refreshes
    response = await refresh_now(rig)            # httpx2.Response of the refresh request
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from .browser import ScriptedBrowser

__all__ = [
    "DEFAULT_REDIRECT_URI",
    "AuthorizationRefused",
    "BrowserAuthorizer",
    "InMemoryTokenStorage",
    "OAuthRig",
    "connect",
    "expire_access_token",
    "make_oauth_rig",
    "obtain_tokens",
    "refresh_now",
]

# Nothing listens here: the browser stops at the redirect, as a CLI client's listener would.
DEFAULT_REDIRECT_URI = "http://127.0.0.1:53682/callback"


class AuthorizationRefused(RuntimeError):
    """The authorization ended with an ``error`` redirect (e.g. the user denied consent)."""

    def __init__(self, result: dict[str, str]) -> None:
        super().__init__(f"authorization refused: {result}")
        self.result = result


class InMemoryTokenStorage:
    """``TokenStorage`` kept in memory; ``token_history`` keeps every token set, in order."""

    def __init__(
        self,
        tokens: OAuthToken | None = None,
        client_info: OAuthClientInformationFull | None = None,
    ) -> None:
        self.tokens = tokens
        self.client_info = client_info
        self.token_history: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.token_history.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass
class BrowserAuthorizer:
    """The provider's redirect/callback handlers, played by a ScriptedBrowser.

    ``redirect_handler`` walks the whole authorization at once and keeps the redirect's query;
    ``callback_handler`` hands it back (or raises ``AuthorizationRefused`` on ``error``).
    """

    browser: ScriptedBrowser
    redirect_uri: str
    idp_login: dict[str, Any] | None = None
    email: str | None = None
    consent: str = "approve"
    authorization_urls: list[str] = field(default_factory=list)
    results: list[dict[str, str]] = field(default_factory=list)
    _pending: dict[str, str] | None = None

    async def redirect_handler(self, authorization_url: str) -> None:
        self.authorization_urls.append(authorization_url)
        result = await self.browser.authorize(
            authorization_url,
            stop_at=self.redirect_uri,
            idp_login=self.idp_login,
            consent=self.consent,
            email=self.email,
        )
        self.results.append(result)
        self._pending = result

    async def callback_handler(self) -> AuthorizationCodeResult:
        result, self._pending = self._pending, None
        if result is None:
            raise RuntimeError("callback_handler called before redirect_handler")
        if "error" in result or "code" not in result:
            raise AuthorizationRefused(result)
        return AuthorizationCodeResult(
            code=result["code"], state=result.get("state"), iss=result.get("iss")
        )


@dataclass
class OAuthRig:
    """One SDK OAuth client: the provider plus the storage and authorizer it was built with."""

    server_url: str
    provider: OAuthClientProvider
    storage: InMemoryTokenStorage
    authorizer: BrowserAuthorizer

    @property
    def tokens(self) -> OAuthToken | None:
        return self.storage.tokens

    @property
    def client_info(self) -> OAuthClientInformationFull | None:
        return self.storage.client_info


def make_oauth_rig(
    server_url: str,
    browser: ScriptedBrowser,
    *,
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    idp_login: dict[str, Any] | None = None,
    email: str | None = None,
    consent: str = "approve",
    client_name: str = "mcp-gateway test harness",
    scope: str | None = None,
    token_endpoint_auth_method: str | None = None,
    client_metadata_url: str | None = None,
    storage: InMemoryTokenStorage | None = None,
) -> OAuthRig:
    """Build an ``OAuthClientProvider`` whose human is ``browser``.

    ``idp_login``/``email`` say who signs in (IdP ``sub`` and claims, or the dev sign-in
    e-mail); pass a previous rig's ``storage`` to reuse its registration and tokens.
    """
    metadata_fields: dict[str, Any] = {
        "redirect_uris": [redirect_uri],
        "client_name": client_name,
    }
    if scope is not None:
        metadata_fields["scope"] = scope
    if token_endpoint_auth_method is not None:
        metadata_fields["token_endpoint_auth_method"] = token_endpoint_auth_method
    storage = storage if storage is not None else InMemoryTokenStorage()
    authorizer = BrowserAuthorizer(
        browser=browser,
        redirect_uri=redirect_uri,
        idp_login=idp_login,
        email=email,
        consent=consent,
    )
    provider = OAuthClientProvider(
        server_url=server_url,
        client_metadata=OAuthClientMetadata.model_validate(metadata_fields),
        storage=storage,
        redirect_handler=authorizer.redirect_handler,
        callback_handler=authorizer.callback_handler,
        client_metadata_url=client_metadata_url,
    )
    return OAuthRig(
        server_url=server_url, provider=provider, storage=storage, authorizer=authorizer
    )


@asynccontextmanager
async def connect(
    rig: OAuthRig, *, mode: str = "legacy", **client_kwargs: Any
) -> AsyncIterator[Client]:
    """An authenticated ``mcp.Client`` session to ``rig.server_url``.

    ``cache`` defaults to None so every call really reaches the gateway.
    """
    client_kwargs.setdefault("cache", None)
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with httpx2.AsyncClient(auth=rig.provider, timeout=timeout) as http:
        transport = streamable_http_client(rig.server_url, http_client=http)
        async with Client(transport, mode=mode, **client_kwargs) as client:
            yield client


async def obtain_tokens(rig: OAuthRig, *, mode: str = "legacy") -> OAuthToken:
    """Run the whole flow by opening (and closing) a real session; return the tokens."""
    async with connect(rig, mode=mode):
        pass
    if rig.storage.tokens is None:
        raise RuntimeError("the session opened but no tokens were stored")
    return rig.storage.tokens


def expire_access_token(rig: OAuthRig) -> None:
    """Make the provider treat its access token as expired: the next request refreshes.

    The SDK refreshes only before a request and only on a known expiry, so this is the
    one way to make it refresh the way it does in the field.
    """
    rig.provider.context.token_expiry_time = time.time() - 1


async def refresh_now(rig: OAuthRig) -> httpx2.Response:
    """Send the provider's own refresh request now and let it process the answer.

    On 200 the new tokens are in ``rig.storage``; on failure the provider clears its tokens
    (as the SDK does). Uses the provider's private builders: the SDK has no public refresh.
    """
    provider = rig.provider
    if not provider._initialized:  # the state the SDK loads before a request
        await provider._initialize()
    request = await provider._refresh_token()
    async with httpx2.AsyncClient(timeout=30.0) as http:
        response = await http.send(request)
        await provider._handle_refresh_response(response)
    return response
