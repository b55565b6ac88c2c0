"""OAuth endpoints: /register, /authorize (+ consent), sign-in (/login, /oauth/callback,
/logout), /token and /revoke. Parsing and responses only; the rules live in services."""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from handlers.base import BaseHandler
from services.authserver.authorization import Denied, Redirect
from services.authserver.clients import registration_response
from services.common.errors import (
    InvalidClientMetadata,
    InvalidRequest,
    PageError,
    SlowDown,
)
from services.dashboard.connections import Connections

log = logging.getLogger("gateway.oauth")

MAX_JSON_BODY = 64 * 1024


def local_path(target: str | None, default: str = "/dashboard") -> str:
    """Only same-origin paths may be a post-sign-in destination (no open redirect).

    Parsed, not pattern-matched: printable ASCII only (browsers drop tabs and newlines
    from URLs, so "/\t/evil.example" is "//evil.example" to them, and CR/LF cannot go
    into a Location header), no backslash (read as "/"), and nothing urlsplit reads as a
    scheme or a host. Anything else gets the default."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return default
    if any(not 0x21 <= ord(char) <= 0x7E for char in target) or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


class RegisterHandler(BaseHandler):
    cors = True
    no_store = True

    async def post(self) -> None:
        if not self.services.limits.allow("register", self.client_ip()):
            raise SlowDown("too many registrations from this address", headers={"Retry-After": "60"})
        if self.body_media_type() != "application/json":
            raise InvalidClientMetadata("the body must be application/json")
        if len(self.request.body) > MAX_JSON_BODY:
            raise InvalidClientMetadata("the body is too large", 413)
        try:
            metadata = json.loads(self.request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurd nesting
            raise InvalidClientMetadata("the body is not valid UTF-8 JSON") from None
        client, secret = await self.services.clients.register(metadata)
        self.log_fields["client_id"] = client.client_id
        log.info("registered client %s (%s)", client.client_id, client.client_name)
        self.write_json(registration_response(client, secret), 201)


class AuthorizeHandler(BaseHandler):
    """GET /authorize: the request is validated and parked; the browser goes on to sign-in,
    to consent, or back to the client with an error."""

    is_page = True
    bad_request_title = "Invalid authorization request"

    async def get(self) -> None:
        params = self.query_params()
        self.log_fields["client_id"] = params.get("client_id")  # as sent: /authorize checks it next
        outcome = await self.services.authorizations.start(params, self.current_user)
        self.redirect(outcome.url)


class ConsentHandler(BaseHandler):
    """GET shows the consent page (or skips it when remembered); POST decides. For a server
    whose users connect their own upstream account, the approval may first detour through the
    upstream's sign-in (`Connections` is the authserver's Detour) and come back to /authorize/continue."""

    is_page = True

    async def get(self) -> None:
        outcome = await self.services.authorizations.review(
            self.get_query_argument("req", None), self.current_user, self.request.uri,
            detour=Connections.of(self.services),
        )
        if isinstance(outcome, Redirect):
            self.redirect(outcome.url)
        elif isinstance(outcome, Denied):
            self.page("denied.html", status=403, reason=outcome.reason, back_url=outcome.back_url)
        else:
            self.page("consent.html", **vars(outcome))

    async def post(self) -> None:
        outcome = await self.services.authorizations.decide(
            self.get_body_argument("req", None),
            self.current_user,
            approve=self.get_body_argument("decision", "") == "approve",
            detour=Connections.of(self.services),
        )
        self.redirect(outcome.url)


class ContinueHandler(BaseHandler):
    """GET /authorize/continue?req: back from the upstream's sign-in (via /oauth/upstream/callback),
    the held authorization's code goes to the client (single use, this browser session only)."""

    is_page = True

    async def get(self) -> None:
        outcome = await self.services.authorizations.resume(
            self.get_query_argument("req", None), self.current_user, detour=Connections.of(self.services)
        )
        self.redirect(outcome.url)


class LoginHandler(BaseHandler):
    """GET /login: the local dev form, or a redirect to the identity provider.
    POST /login: the dev form's submission (only when MCPGW_DEV_LOGIN is on)."""

    is_page = True

    async def get(self) -> None:
        target = local_path(self.get_query_argument("next", None))
        if self.config.dev_login:
            self.page("login_dev.html", next=target, error=None, email="")
            return
        start = await self.services.accounts.begin(
            target, self.get_query_argument("force", "") == "1", self.login_binding()
        )
        self.set_login_binding(start.browser_key)
        self.redirect(start.url)

    async def post(self) -> None:
        if not self.config.dev_login:
            raise PageError(404, "Not found", "There is no local sign-in on this gateway.")
        email = self.get_body_argument("email", "")
        target = local_path(self.get_body_argument("next", None))
        try:
            user = await self.services.accounts.dev_sign_in(email)
        except PageError as exc:  # the form again, with the reason
            self.page("login_dev.html", status=exc.status, next=target, error=exc.message, email=email.strip())
            return
        self.log_fields["user_sub"] = user.sub
        await self.set_signin_cookie(user.sub, user.email, user.name)
        self.redirect(target)


class CallbackHandler(BaseHandler):
    """GET /oauth/callback: the identity provider sends the browser back here; only the
    browser holding the login cookie set at /login may finish (services.identity)."""

    is_page = True

    async def get(self) -> None:
        user, target = await self.services.accounts.finish(
            self.get_query_argument("state", ""),
            self.get_query_argument("code", ""),
            self.get_query_argument("error", None),
            self.login_binding(),
        )
        self.log_fields["user_sub"] = user.sub
        await self.set_signin_cookie(user.sub, user.email, user.name)
        self.redirect(local_path(target))


class LogoutHandler(BaseHandler):
    """POST /logout ends this browser's session server-side, or with everywhere=1 every
    session of the signed-in person (a copy of the cookie stops working too)."""

    is_page = True

    async def post(self) -> None:
        accounts = self.services.accounts
        data = self.signin_cookie_data()
        if data is not None:
            if self.get_body_argument("everywhere", "") == "1" and self.current_user is not None:
                await accounts.end_all_sessions(self.current_user["sub"])
            await accounts.end_session(data.get("sid"))
        self.clear_signin_cookie()
        self.redirect("/")


def check_client_limit(handler: BaseHandler, form: dict) -> None:
    """The /token and /revoke rate limit, checked before the client is looked up: a URL
    client_id makes authentication fetch its metadata document, and that must cost the
    caller, not the gateway (or the document's host). Keyed by the client_id as sent and
    the address: one client_id may serve many users (a CIMD client such as VS Code's, a
    pre-registered one), so never by client alone. SlowDown (429) when over it."""
    claimed = handler.services.clients.claimed_client_id(
        form.get("client_id"), handler.request.headers.get("Authorization")
    )
    if not handler.services.limits.allow("token", f"{claimed}|{handler.client_ip()}"):
        raise SlowDown("too many requests for this client", headers={"Retry-After": "10"})


class TokenHandler(BaseHandler):
    cors = True
    no_store = True
    basic_realm = "token"

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Pragma", "no-cache")

    async def post(self) -> None:
        form = self.form_body()
        check_client_limit(self, form)
        client = await self.services.clients.authenticate(
            form.get("client_id"), form.get("client_secret"), self.request.headers.get("Authorization")
        )
        self.log_fields["client_id"] = client.client_id
        body = await self.services.tokens.grant(client, form)
        await self.services.clients.touch(client)
        self.write_json(body)


class RevokeHandler(BaseHandler):
    cors = True
    no_store = True
    basic_realm = "revoke"

    async def post(self) -> None:
        form = self.form_body()
        check_client_limit(self, form)
        client = await self.services.clients.authenticate(
            form.get("client_id"), form.get("client_secret"), self.request.headers.get("Authorization")
        )
        self.log_fields["client_id"] = client.client_id
        token = form.get("token")
        if not token:
            raise InvalidRequest("token is required")
        await self.services.tokens.revoke(client, token, form.get("token_type_hint"))
        self.set_status(200)
        self.finish()
