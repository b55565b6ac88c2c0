"""OAuth endpoints: /register, /authorize (+ consent), sign-in (/login, /oauth/callback,
/logout), /token and /revoke. Parsing and responses only; the rules live in services."""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from handlers.base import BadRequest, BaseHandler
from services.authorization import Denied, Redirect, ShownError
from services.clients import ClientError, registration_response
from services.identity import SignInError
from services.tokens import OAuthError

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

    async def post(self) -> None:
        self.set_header("Cache-Control", "no-store")
        if not self.services.limits.allow("register", self.client_ip()):
            self.set_header("Retry-After", "60")
            self.oauth_error("slow_down", "too many registrations from this address", 429)
            return
        content_type = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            self.oauth_error("invalid_client_metadata", "the body must be application/json")
            return
        if len(self.request.body) > MAX_JSON_BODY:
            self.oauth_error("invalid_client_metadata", "the body is too large", 413)
            return
        try:
            metadata = json.loads(self.request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurd nesting
            self.oauth_error("invalid_client_metadata", "the body is not valid UTF-8 JSON")
            return
        try:
            client, secret = await self.services.clients.register(metadata)
        except ClientError as exc:
            self.oauth_error(exc.error, exc.description, exc.status)
            return
        log.info("registered client %s (%s)", client.client_id, client.client_name)
        self.write_json(registration_response(client, secret), 201)


class AuthorizeHandler(BaseHandler):
    """GET /authorize: the request is validated and parked; the browser goes on to sign-in,
    to consent, or back to the client with an error."""

    is_page = True

    async def get(self) -> None:
        try:
            params = self.query_params()
            outcome = await self.services.authorizations.start(params, self.current_user)
        except BadRequest as exc:
            self.error_page(400, "Invalid authorization request", str(exc))
            return
        except ShownError as exc:
            self.error_page(exc.status, exc.title, exc.message)
            return
        self.redirect(outcome.url)


class ConsentHandler(BaseHandler):
    """GET shows the consent page (or skips it when remembered); POST decides."""

    is_page = True

    async def get(self) -> None:
        try:
            outcome = await self.services.authorizations.review(
                self.get_query_argument("req", None), self.current_user, self.request.uri
            )
        except ShownError as exc:
            self.error_page(exc.status, exc.title, exc.message)
            return
        if isinstance(outcome, Redirect):
            self.redirect(outcome.url)
        elif isinstance(outcome, Denied):
            self.page("denied.html", status=403, reason=outcome.reason, back_url=outcome.back_url)
        else:
            self.page("consent.html", **vars(outcome))

    async def post(self) -> None:
        try:
            outcome = await self.services.authorizations.decide(
                self.get_body_argument("req", None),
                self.current_user,
                approve=self.get_body_argument("decision", "") == "approve",
            )
        except ShownError as exc:
            self.error_page(exc.status, exc.title, exc.message)
            return
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
        try:
            start = await self.services.accounts.begin(
                target, self.get_query_argument("force", "") == "1", self.login_binding()
            )
        except SignInError as exc:
            self.error_page(exc.status, exc.title, exc.message)
            return
        self.set_login_binding(start.browser_key)
        self.redirect(start.url)

    async def post(self) -> None:
        if not self.config.dev_login:
            self.error_page(404, "Not found", "There is no local sign-in on this gateway.")
            return
        email = self.get_body_argument("email", "")
        target = local_path(self.get_body_argument("next", None))
        try:
            user = await self.services.accounts.dev_sign_in(email)
        except SignInError as exc:
            self.page("login_dev.html", status=exc.status, next=target, error=exc.message, email=email.strip())
            return
        await self.set_signin_cookie(user.sub, user.email, user.name)
        self.redirect(target)


class CallbackHandler(BaseHandler):
    """GET /oauth/callback: the identity provider sends the browser back here; only the
    browser holding the login cookie set at /login may finish (services.identity)."""

    is_page = True

    async def get(self) -> None:
        try:
            user, target = await self.services.accounts.finish(
                self.get_query_argument("state", ""),
                self.get_query_argument("code", ""),
                self.get_query_argument("error", None),
                self.login_binding(),
            )
        except SignInError as exc:
            self.error_page(exc.status, exc.title, exc.message)
            return
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


def over_client_limit(handler: BaseHandler, form: dict) -> bool:
    """The /token and /revoke rate limit, checked before the client is looked up: a URL
    client_id makes authentication fetch its metadata document, and that must cost the
    caller, not the gateway (or the document's host). Keyed by the client_id as sent and
    the address: one client_id may serve many users (a CIMD client such as VS Code's, a
    pre-registered one), so never by client alone. Answers the 429 itself."""
    claimed = handler.services.clients.claimed_client_id(
        form.get("client_id"), handler.request.headers.get("Authorization")
    )
    if handler.services.limits.allow("token", f"{claimed}|{handler.client_ip()}"):
        return False
    handler.set_header("Retry-After", "10")
    handler.oauth_error("slow_down", "too many requests for this client", 429)
    return True


class TokenHandler(BaseHandler):
    cors = True

    async def post(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Pragma", "no-cache")
        try:
            form = self.form_body()
            if over_client_limit(self, form):
                return
            client = await self.services.clients.authenticate(
                form.get("client_id"), form.get("client_secret"), self.request.headers.get("Authorization")
            )
            grant_type = form.get("grant_type")
            tokens = self.services.tokens
            if grant_type == "authorization_code":
                if not form.get("code") or not form.get("code_verifier"):
                    raise OAuthError("invalid_request", "code and code_verifier are required")
                body = await tokens.exchange_code(
                    client, form["code"], form.get("redirect_uri"), form["code_verifier"], form.get("resource")
                )
            elif grant_type == "refresh_token":
                if not form.get("refresh_token"):
                    raise OAuthError("invalid_request", "refresh_token is required")
                body = await tokens.refresh(client, form["refresh_token"], form.get("scope"), form.get("resource"))
            elif not grant_type:
                raise OAuthError("invalid_request", "grant_type is required")
            else:
                raise OAuthError("unsupported_grant_type", "use authorization_code or refresh_token")
        except BadRequest as exc:
            self.oauth_error("invalid_request", str(exc))
            return
        except ClientError as exc:
            if exc.status == 401 and self.request.headers.get("Authorization"):
                self.set_header("WWW-Authenticate", 'Basic realm="token"')
            self.oauth_error(exc.error, exc.description, exc.status)
            return
        except OAuthError as exc:
            self.oauth_error(exc.error, exc.description, exc.status)
            return
        await self.services.clients.touch(client)
        self.write_json(body)


class RevokeHandler(BaseHandler):
    cors = True

    async def post(self) -> None:
        self.set_header("Cache-Control", "no-store")
        try:
            form = self.form_body()
            if over_client_limit(self, form):
                return
            client = await self.services.clients.authenticate(
                form.get("client_id"), form.get("client_secret"), self.request.headers.get("Authorization")
            )
        except BadRequest as exc:
            self.oauth_error("invalid_request", str(exc))
            return
        except ClientError as exc:
            if exc.status == 401 and self.request.headers.get("Authorization"):
                self.set_header("WWW-Authenticate", 'Basic realm="revoke"')
            self.oauth_error(exc.error, exc.description, exc.status)
            return
        token = form.get("token")
        if not token:
            self.oauth_error("invalid_request", "token is required")
            return
        await self.services.tokens.revoke(client, token, form.get("token_type_hint"))
        self.set_status(200)
        self.finish()
