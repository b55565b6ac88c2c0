"""BaseHandler: what every handler shares: services, JSON and HTML errors, CORS, security
headers, the request id, the signed sign-in cookie and strict form/JSON body parsing."""

from __future__ import annotations

import json
import logging
import re
import time
from http import HTTPStatus
from urllib.parse import parse_qsl

import tornado.web
from tornado.log import app_log, gen_log

from services.authserver.authorization import signin_time
from services.authserver.signin import LOGIN_TTL
from services.common.errors import ApiError, BadRequest, GatewayError, OAuthError, PageError
from services.common.logs import REQUEST_ID_HEADER, accept_request_id, request_id
from services.common.validation import media_type
from storage.base import StorageUnavailable

log = logging.getLogger("gateway.http")

MAX_FORM_BODY = 64 * 1024
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, "
    "Last-Event-ID, Mcp-Method, Mcp-Name, X-Request-Id"
)
CORS_EXPOSE_HEADERS = "Mcp-Session-Id, WWW-Authenticate, MCP-Protocol-Version, X-Request-Id"
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data: https:; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# On every answer of every handler (BaseHandler's and LeanHandler's).
SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))

__all__ = ["Answers", "BadRequest", "BaseHandler", "StaticHandler", "error_description", "unique_params"]

# The route group of a handler module: the `route` label of the request metrics and the
# access log (a fixed set, never a path).
ROUTE_GROUPS = {
    "handlers.proxy": "mcp",
    "handlers.oauth": "oauth",
    "handlers.discovery": "discovery",
    "handlers.dashboard": "dashboard",
    "handlers.api": "api",
    "handlers.ops": "ops",
}


class RequestIdentity:
    """The request id and the access log's fields, for any RequestHandler subclass.

    `request_id`: the client's X-Request-Id when sane, else a new one (services.common.logs),
    sent back as X-Request-Id on every answer, errors included (Tornado's clear() re-applies
    the default headers). `log_fields`: what the access log adds to its line (user_sub,
    client_id, server_id); handlers fill it as they learn them, never with a secret."""

    route_group = "other"
    time_to_head: float | None = None  # seconds from the request's start to the answer's head

    def __init__(self, application, request, **kwargs) -> None:
        # Before Tornado's __init__, which sets the default headers.
        self.request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        self.log_fields: dict[str, object] = {}
        super().__init__(application, request, **kwargs)

    def set_default_headers(self) -> None:
        self.set_header(REQUEST_ID_HEADER, self.request_id)

    def flush(self, *args, **kwargs):
        # Every answer's head goes out through the first flush (finish() flushes too). The
        # latency histogram takes this time: an SSE stream may stay open for hours.
        if self.time_to_head is None:
            self.time_to_head = self.request.request_time()
        return super().flush(*args, **kwargs)


class Answers:
    """The services, and how errors are answered and logged: shared by BaseHandler and the
    hot path's LeanHandler (handlers/lean.py), which both provide RequestHandler's output API."""

    is_page = False
    basic_realm = ""  # the realm of WWW-Authenticate when HTTP Basic client authentication fails
    bad_request_title = "Bad request"  # the page title of a BadRequest

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "route_group" not in cls.__dict__:
            cls.route_group = ROUTE_GROUPS.get(cls.__module__, cls.route_group)

    @property
    def services(self):
        return self.application.settings["services"]

    @property
    def config(self):
        return self.services.config

    # ------------------------------------------------------------------ output

    def write_json(self, body: dict, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, separators=(",", ":")))

    def oauth_error(self, error: str, description: str, status: int = 400) -> None:
        self.write_json({"error": error, "error_description": error_description(description, error)}, status)

    def write_error(self, status_code: int, **kwargs) -> None:
        """Every error answer: a GatewayError in this handler's shape (render_error), else
        the status alone (a 503 with Retry-After for a passing storage fault)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError) and self.render_error(exc):
            return
        retry_after = None
        if isinstance(exc, StorageUnavailable):
            # A passing storage fault (locked, read-only, full): the client may retry,
            # so 503 + Retry-After in this handler's own error shape, never a 500.
            status_code, retry_after = 503, exc.retry_after
            self.set_status(503)
            self.set_header("Retry-After", str(retry_after))
        reason = HTTPStatus(status_code).phrase if status_code in HTTPStatus._value2member_map_ else "Error"
        message = exc.log_message if isinstance(exc, tornado.web.HTTPError) and exc.log_message else reason
        if retry_after is not None:
            message = f"Storage is temporarily unavailable; try again in {retry_after} seconds."
        elif status_code >= 500:
            message = "Something went wrong on our side. It has been logged."
        if self.is_page:
            self.clear_header("Content-Type")
            try:
                self.error_page(status_code, reason, message)
                return
            except Exception:  # a broken template must not hide the original error
                log.exception("error page failed")
        self.set_header("Content-Type", "application/json")
        code = "server_error" if status_code >= 500 else "invalid_request"
        if retry_after is not None:
            code = "temporarily_unavailable"  # RFC 6749 §4.1.2.1's name for it
        self.finish(json.dumps({"error": code, "error_description": error_description(message, code)}))

    def render_error(self, exc: GatewayError) -> bool:
        """Answer `exc` the way this kind of handler answers: a page shows its title and
        message, an OAuth endpoint the RFC 6749 JSON body (with the error's headers, and
        WWW-Authenticate when HTTP Basic client authentication failed). False when the
        error is not one this handler answers (a 500 then)."""
        if self.is_page:
            if not isinstance(exc, PAGE_ERRORS):
                return False
            title = self.bad_request_title if isinstance(exc, BadRequest) else exc.title
            self.error_page(exc.status, title, exc.message)
            return True
        if not isinstance(exc, OAuthError):
            return False
        for name, value in exc.headers.items():
            self.set_header(name, value)
        if exc.status == 401 and self.basic_realm and self.request.headers.get("Authorization"):
            self.set_header("WWW-Authenticate", f'Basic realm="{self.basic_realm}"')
        self.oauth_error(exc.error, exc.description, exc.status)
        return True

    def log_exception(self, typ, value, tb) -> None:
        # Tornado's own version logs the URI: its query may carry an authorization code or
        # state, which never go into a log. The path and the request id instead (this may
        # run before prepare() has set the request id's ContextVar: a 405, a failed XSRF check).
        method, path, extra = self.request.method, self.request.path, {"request_id": self.request_id}
        if isinstance(value, GatewayError):  # expected and answered: no traceback
            if value.status >= 500:
                log.warning("%s %s: %s, %s", method, path, value.status, value, extra=extra)
            return
        if isinstance(value, StorageUnavailable):
            # Expected while the fault lasts: one line, no traceback.
            log.warning("%s %s: 503, %s", method, path, value, extra=extra)
            return
        if isinstance(value, tornado.web.HTTPError):
            if value.log_message:
                try:
                    message = value.log_message % value.args if value.args else value.log_message
                except (TypeError, ValueError):
                    message = value.log_message
                gen_log.warning("%d %s %s: %s", value.status_code, method, path, message, extra=extra)
            return
        app_log.error("Uncaught exception %s %s", method, path, exc_info=(typ, value, tb), extra=extra)


class StaticHandler(RequestIdentity, tornado.web.StaticFileHandler):
    route_group = "static"


class BaseHandler(RequestIdentity, Answers, tornado.web.RequestHandler):
    """API handlers (the default) answer JSON, take no cookies and so need no XSRF token;
    `is_page` handlers are browser pages: HTML errors, CSP, XSRF-checked forms."""

    cors = False
    no_store = False  # Cache-Control: no-store on every answer, errors included

    def check_xsrf_cookie(self) -> None:
        if self.is_page:
            super().check_xsrf_cookie()

    def set_default_headers(self) -> None:
        super().set_default_headers()
        for name, value in SECURITY_HEADERS:
            self.set_header(name, value)
        if self.no_store:
            self.set_header("Cache-Control", "no-store")
        if self.is_page:
            self.set_header("Content-Security-Policy", PAGE_CSP)
            self.set_header("X-Frame-Options", "DENY")
        if self.cors:
            self.set_header("Access-Control-Allow-Origin", "*")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)
            self.set_header("Access-Control-Max-Age", "86400")

    def options(self, *args) -> None:
        # CORS preflight never needs authentication.
        self.set_status(204)

    def client_ip(self) -> str:
        """The address rate limits key on. Behind a trusted reverse proxy, the right-most
        X-Forwarded-For entry: the address that proxy saw. Entries to its left (and
        X-Real-Ip, which Tornado's xheaders would prefer) are whatever the client wrote."""
        if self.config.trust_forwarded:
            forwarded = self.request.headers.get("X-Forwarded-For", "")
            if forwarded:
                return forwarded.rsplit(",", 1)[-1].strip()
        return self.request.remote_ip or ""

    # ------------------------------------------------------------------ pages

    def page(self, template: str, status: int = 200, **context) -> None:
        env = self.application.settings["jinja"]
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        html = env.get_template(template).render(
            user=self.current_user,
            xsrf_form_html=self.xsrf_form_html,
            dev_login=self.config.dev_login,
            static_url=self.static_url,
            **context,
        )
        self.finish(html)

    def error_page(self, status: int, title: str, message: str) -> None:
        self.page("error.html", status=status, title=title, message=message)

    # ------------------------------------------------------------- sign-in cookie

    @property
    def signin_cookie_name(self) -> str:
        # __Host- binds the cookie to this exact origin (Secure, Path=/, no Domain).
        return "__Host-mcpgw_signin" if self.config.secure_cookies else "mcpgw_signin"

    @property
    def login_cookie_name(self) -> str:
        """The short-lived cookie binding an IdP sign-in in flight to this browser."""
        return "__Host-mcpgw_login" if self.config.secure_cookies else "mcpgw_login"

    async def prepare(self) -> None:
        # Log lines of this request (and of tasks it starts) carry its id. The ContextVar
        # lives in this request's own asyncio task, so it never leaks to the next request.
        request_id.set(self.request_id)
        # The cookie alone is not a sign-in: its server-side session must still stand
        # (logout, "sign out everywhere" and user removal end it). Checked here, where
        # awaiting is possible, so that handlers read `current_user` as before. Requests
        # without the cookie (every MCP call) cost nothing.
        data = self.signin_cookie_data()
        if data is not None and not await self.services.accounts.session_is_live(data.get("sid"), data.get("sub")):
            data = None
        if data is not None:
            self.log_fields["user_sub"] = data.get("sub")
        self.current_user = data

    def get_current_user(self):
        # Reached only when a handler's own prepare() replaced the one above: the session
        # was not checked, so nobody counts as signed in.
        return None

    def signin_cookie_data(self) -> dict | None:
        """The signed cookie's content ({"sid", "sub", "email", "name", "exp", "auth_time"}),
        unexpired; whether its session still stands is prepare()'s question."""
        raw = self.get_signed_cookie(
            self.signin_cookie_name, max_age_days=self.config.signin_ttl / 86400 + 1
        )
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int | float) or data["exp"] < time.time():
            return None
        return data

    async def set_signin_cookie(self, sub: str, email: str, name: str) -> None:
        session = await self.services.accounts.start_session(sub)
        # auth_time on the clock prompt=login compares with (services.authorization).
        value = json.dumps(
            {"sid": session.sid, "sub": sub, "email": email, "name": name, "auth_time": signin_time(),
             "exp": int(session.expires_at)}
        )
        self.set_signed_cookie(
            self.signin_cookie_name,
            value,
            expires_days=None,
            httponly=True,
            secure=self.config.secure_cookies,
            samesite="Lax",
            path="/",
        )

    def clear_signin_cookie(self) -> None:
        self.clear_cookie(self.signin_cookie_name, path="/", secure=self.config.secure_cookies)

    def set_login_binding(self, browser_key: str) -> None:
        # Binds an IdP sign-in to this browser (RFC 6749 §10.12). SameSite=Lax: the IdP
        # sends the browser back with a top-level GET, which carries it.
        self.set_signed_cookie(
            self.login_cookie_name, browser_key, expires_days=LOGIN_TTL / 86400,
            httponly=True, secure=self.config.secure_cookies, samesite="Lax", path="/",
        )

    def login_binding(self) -> str | None:
        value = self.get_signed_cookie(self.login_cookie_name, max_age_days=LOGIN_TTL / 86400)
        return value.decode("ascii", "replace") if value else None

    # --------------------------------------------------------------- body parsing

    def form_body(self) -> dict[str, str]:
        """application/x-www-form-urlencoded, UTF-8, each parameter at most once."""
        if self.body_media_type() != "application/x-www-form-urlencoded":
            raise BadRequest("the body must be application/x-www-form-urlencoded")
        if len(self.request.body) > MAX_FORM_BODY:
            raise BadRequest("the body is too large")
        try:
            text = self.request.body.decode("utf-8")
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the body is not valid UTF-8 form data") from None
        return unique_params(pairs)

    def body_media_type(self) -> str:
        return media_type(self.request.headers.get("Content-Type"))

    def query_params(self) -> dict[str, str]:
        try:
            pairs = [
                (name, value.decode("utf-8", "strict"))
                for name, values in self.request.query_arguments.items()
                for value in values
            ]
        except UnicodeDecodeError:
            raise BadRequest("the query is not valid UTF-8") from None
        return unique_params(pairs)


# What a page shows: its own errors, malformed input, the dashboard's refusals.
PAGE_ERRORS = (PageError, BadRequest, ApiError)


def unique_params(pairs) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise BadRequest(f"{_parameter(name)} is repeated")
        if "\x00" in value:
            raise BadRequest(f"{_parameter(name)} contains a NUL character")
        params[name] = value
    return params


def _parameter(name: str) -> str:
    """How a message names a request parameter: by name when it is a plain one (every
    OAuth parameter is), else without echoing it."""
    return f"the parameter {name}" if _PLAIN_NAME.fullmatch(name) else "a parameter"


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# RFC 6749 §5.2 (and §4.1.2.1): error_description is %x20-21 / %x23-5B / %x5D-7E, i.e.
# printable ASCII without '"' and '\'.
_NOT_DESCRIPTION_CHAR = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def error_description(description: str, error: str = "error") -> str:
    """`description` as RFC 6749 allows it in error_description: each other character
    (control, non-ASCII, '"', '\\') becomes '?'. Every OAuth error body goes through here
    (oauth_error, write_error), whatever a message happens to quote."""
    text = _NOT_DESCRIPTION_CHAR.sub("?", str(description)).strip()
    return text or error.replace("_", " ")
