"""OAuth endpoints: /register, /authorize (+ consent), sign-in (/login, /oauth/callback,
/logout), /token and /revoke. Parsing and responses only; the rules live in services."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from urllib.parse import urlencode, urlsplit

from handlers.base import BadRequest, BaseHandler
from services.clients import (
    ClientError,
    is_loopback_redirect,
    redirect_host,
    redirect_uri_matches,
    registration_response,
)
from services.identity import IdentityClaims, IdentityError, dev_subject
from services.tokens import OAuthError, parse_scope
from storage.base import Consent, Pending

log = logging.getLogger("gateway.oauth")

PENDING_TTL = 600  # an /authorize or a sign-in may take ten minutes
CHALLENGE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
MAX_JSON_BODY = 64 * 1024
PROMPTS = {"none", "login", "consent", "select_account"}


def local_path(target: str | None, default: str = "/dashboard") -> str:
    """Only same-origin paths may be a post-sign-in destination (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def signin_time() -> float:
    """The clock of the sign-in cookie's auth_time (see BaseHandler.set_signin_cookie)."""
    return round(time.time(), 3)


def signed_in_after(user: dict, payload: dict) -> bool:
    return float(user.get("auth_time", 0)) >= float(payload.get("login_after", 0))


def add_query(uri: str, params: dict[str, str]) -> str:
    parts = urlsplit(uri)
    query = urlencode({k: v for k, v in params.items() if v is not None})
    joined = f"{parts.query}&{query}" if parts.query else query
    return parts._replace(query=joined).geturl()


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
    """GET /authorize: validates the request, parks it, and sends the browser to sign-in
    or straight to consent."""

    is_page = True

    async def get(self) -> None:
        try:
            params = self.query_params()
        except BadRequest as exc:
            self.error_page(400, "Invalid authorization request", str(exc))
            return
        # Errors about the client or the redirect URI are shown, never redirected.
        try:
            client = await self.services.clients.get(params.get("client_id", ""))
        except ClientError as exc:
            self.error_page(400, "Unknown application", exc.description)
            return
        redirect_uri = params.get("redirect_uri")
        if redirect_uri is None:
            if len(client.redirect_uris) != 1:
                self.error_page(400, "Invalid authorization request", "redirect_uri is required")
                return
            redirect_uri = client.redirect_uris[0]
        if not redirect_uri_matches(client.redirect_uris, redirect_uri):
            self.error_page(
                400,
                "Invalid redirect URI",
                "The redirect URI is not registered for this application.",
            )
            return

        state = params.get("state")
        try:
            request = await self._validate(params)
        except OAuthError as exc:
            self.redirect(self._error_redirect(redirect_uri, state, exc.error, exc.description))
            return
        await self.services.clients.touch(client)
        key = secrets.token_urlsafe(24)
        await self.services.storage.put_pending(
            Pending(
                kind="authorize",
                key=key,
                payload={
                    **request,
                    "client_id": client.client_id,
                    "redirect_uri": redirect_uri,
                    "state": state,
                    # prompt=login: only a sign-in completed after this request counts.
                    "login_after": signin_time() if request["prompt"] == "login" else 0,
                },
                expires_at=time.time() + PENDING_TTL,
            )
        )
        consent_url = "/authorize/consent?" + urlencode({"req": key})
        user = self.current_user
        if request["prompt"] == "none" and user is None:
            self.redirect(self._error_redirect(redirect_uri, state, "login_required", "sign-in needed"))
            return
        if user is None or request["prompt"] == "login":
            force = "1" if request["prompt"] == "login" else ""
            self.redirect("/login?" + urlencode({"next": consent_url, "force": force}))
            return
        self.redirect(consent_url)

    async def _validate(self, params: dict[str, str]) -> dict:
        if params.get("response_type") != "code":
            raise OAuthError("unsupported_response_type", "response_type must be code")
        challenge = params.get("code_challenge")
        if not challenge:
            raise OAuthError("invalid_request", "PKCE is required: send code_challenge (S256)")
        if params.get("code_challenge_method") != "S256":
            raise OAuthError("invalid_request", "code_challenge_method must be S256")
        if not CHALLENGE_RE.match(challenge):
            raise OAuthError("invalid_request", "code_challenge is not a base64url SHA-256 digest")
        prompt = params.get("prompt", "")
        if prompt and not set(prompt.split()) <= PROMPTS:
            raise OAuthError("invalid_request", "unsupported prompt value")
        if "none" in prompt.split() and len(prompt.split()) > 1:
            raise OAuthError("invalid_request", "prompt=none cannot be combined")
        scope = parse_scope(params.get("scope"))
        audience = await self.services.tokens.resolve_audience(params.get("resource"))
        for name in ("state", "nonce"):
            if len(params.get(name) or "") > 2000:
                raise OAuthError("invalid_request", f"{name} is too long")
        words = prompt.split()
        return {
            "code_challenge": challenge,
            "scope": scope,
            "audience": audience.value,
            "server_id": audience.server_id,
            "prompt": "login" if "login" in words else "consent" if "consent" in words else prompt,
        }

    def _error_redirect(self, redirect_uri: str, state, error: str, description: str) -> str:
        return add_query(
            redirect_uri,
            {"error": error, "error_description": description, "state": state, "iss": self.config.issuer},
        )


class ConsentHandler(BaseHandler):
    """GET shows the consent page (or skips it when remembered); POST decides."""

    is_page = True

    async def _pending(self, key: str | None, take: bool):
        storage = self.services.storage
        if not key:
            return None
        if take:
            return await storage.take_pending("authorize", key, time.time())
        return await storage.get_pending("authorize", key, time.time())

    def _gone(self) -> None:
        self.error_page(
            400,
            "This sign-in request has expired",
            "Go back to your application and connect again.",
        )

    def _finish_redirect(self, payload: dict, params: dict) -> None:
        self.redirect(
            add_query(payload["redirect_uri"], {**params, "state": payload.get("state"), "iss": self.config.issuer})
        )

    async def get(self) -> None:
        key = self.get_query_argument("req", None)
        pending = await self._pending(key, take=False)
        if pending is None:
            self._gone()
            return
        user = self.current_user
        payload = pending.payload
        if user is None or not signed_in_after(user, payload):
            force = "1" if user is not None else ""
            self.redirect("/login?" + urlencode({"next": self.request.uri, "force": force}))
            return
        decision = await self._decide_access(user, payload)
        if decision is not None:
            await self._pending(key, take=True)
            self.page(
                "denied.html",
                status=403,
                reason=decision,
                back_url=add_query(
                    payload["redirect_uri"],
                    {
                        "error": "access_denied",
                        "error_description": decision,
                        "state": payload.get("state"),
                        "iss": self.config.issuer,
                    },
                ),
            )
            return
        if payload["prompt"] != "consent":
            consent = await self.services.storage.get_consent(
                user["sub"], payload["client_id"], payload["audience"]
            )
            if consent and set(payload["scope"].split()) <= set(consent.scope.split()):
                if await self._pending(key, take=True) is None:
                    self._gone()
                    return
                await self._issue(user, payload)
                return
        if payload["prompt"] == "none":
            await self._pending(key, take=True)
            self._finish_redirect(payload, {"error": "consent_required"})
            return
        client = await self.services.clients.get(payload["client_id"])
        server = None
        if payload["server_id"]:
            server = await self.services.access.server(payload["server_id"])
        self.page(
            "consent.html",
            req=key,
            client=client,
            redirect_host=redirect_host(payload["redirect_uri"]),
            loopback=is_loopback_redirect(payload["redirect_uri"]),
            custom_scheme=urlsplit(payload["redirect_uri"]).scheme not in ("http", "https"),
            server=server,
            scopes=payload["scope"].split(),
        )

    async def post(self) -> None:
        user = self.current_user
        pending = await self._pending(self.get_body_argument("req", None), take=True)
        if pending is None:
            self._gone()
            return
        payload = pending.payload
        if user is None or not signed_in_after(user, payload):
            self.error_page(401, "Not signed in", "Sign in again from your application.")
            return
        if self.get_body_argument("decision", "") != "approve":
            self._finish_redirect(payload, {"error": "access_denied", "error_description": "the user declined"})
            return
        reason = await self._decide_access(user, payload)
        if reason is not None:
            self._finish_redirect(payload, {"error": "access_denied", "error_description": reason})
            return
        await self.services.storage.put_consent(
            Consent(user["sub"], payload["client_id"], payload["audience"], payload["scope"], time.time())
        )
        await self._issue(user, payload)

    async def _decide_access(self, user: dict, payload: dict) -> str | None:
        """None when the user may use the requested server; else why not."""
        record = await self.services.storage.get_user(user["sub"])
        if record is None:
            return "your account is unknown here; sign in again"
        try:
            await self.services.tokens.check_access(
                record, self.services.tokens.audience_for(payload["audience"])
            )
        except OAuthError as exc:
            return exc.description
        return None

    async def _issue(self, user: dict, payload: dict) -> None:
        code = await self.services.tokens.issue_code(
            client_id=payload["client_id"],
            redirect_uri=payload["redirect_uri"],
            code_challenge=payload["code_challenge"],
            user_sub=user["sub"],
            scope=payload["scope"],
            audience=payload["audience"],
        )
        self._finish_redirect(payload, {"code": code})


class LoginHandler(BaseHandler):
    """GET /login: the local dev form, or a redirect to the identity provider.
    POST /login: the dev form's submission (only when MCPGW_DEV_LOGIN is on)."""

    is_page = True

    async def get(self) -> None:
        target = local_path(self.get_query_argument("next", None))
        force = self.get_query_argument("force", "") == "1"
        if self.config.dev_login:
            self.page("login_dev.html", next=target, error=None, email="")
            return
        identity = self.services.identity
        try:
            start = await identity.start_login(force_login=force)
        except IdentityError as exc:
            self.error_page(502, "Sign-in is unavailable", str(exc))
            return
        # The IdP state is single-use and server-side, created right before the redirect.
        await self.services.storage.put_pending(
            Pending(
                kind="login",
                key=start.state,
                payload={"nonce": start.nonce, "verifier": start.code_verifier, "next": target},
                expires_at=time.time() + PENDING_TTL,
            )
        )
        self.redirect(start.url)

    async def post(self) -> None:
        if not self.config.dev_login:
            self.error_page(404, "Not found", "There is no local sign-in on this gateway.")
            return
        email = self.get_body_argument("email", "").strip().lower()
        target = local_path(self.get_body_argument("next", None))
        if not EMAIL_RE.match(email):
            self.page("login_dev.html", status=400, next=target, error="Enter a valid e-mail address.", email=email)
            return
        claims = IdentityClaims(
            sub=dev_subject(email), email=email, email_verified=True, hd="", name=email.split("@")[0], picture=""
        )
        await self.services.accounts.sign_in(claims)
        self.set_signin_cookie(claims.sub, claims.email, claims.name)
        self.redirect(target)


class CallbackHandler(BaseHandler):
    """GET /oauth/callback: the identity provider sends the browser back here."""

    is_page = True

    async def get(self) -> None:
        state = self.get_query_argument("state", "")
        pending = await self.services.storage.take_pending("login", state, time.time()) if state else None
        error = self.get_query_argument("error", None)
        if error:  # some IdPs send no state with an error: nothing to look up then
            self.error_page(403, "Sign-in was cancelled", f"The identity provider answered: {error[:100]}")
            return
        if pending is None:
            self.error_page(400, "This sign-in has expired", "Start again from your application or the dashboard.")
            return
        code = self.get_query_argument("code", "")
        if not code:
            self.error_page(400, "Sign-in failed", "The identity provider sent no code.")
            return
        try:
            claims = await self.services.identity.finish_login(
                code, pending.payload["verifier"], pending.payload["nonce"]
            )
        except IdentityError as exc:
            self.error_page(502, "Sign-in failed", str(exc))
            return
        await self.services.accounts.sign_in(claims)
        self.set_signin_cookie(claims.sub, claims.email, claims.name)
        self.redirect(local_path(pending.payload.get("next")))


class LogoutHandler(BaseHandler):
    is_page = True

    def post(self) -> None:
        self.clear_signin_cookie()
        self.redirect("/")


class TokenHandler(BaseHandler):
    cors = True

    async def post(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Pragma", "no-cache")
        try:
            form = self.form_body()
            client = await self.services.clients.authenticate(
                form.get("client_id"), form.get("client_secret"), self.request.headers.get("Authorization")
            )
            # Keyed by client and address: one client_id may serve many users (a CIMD
            # client such as VS Code's, a pre-registered one), so never by client alone.
            if not self.services.limits.allow("token", f"{client.client_id}|{self.client_ip()}"):
                self.set_header("Retry-After", "10")
                self.oauth_error("slow_down", "too many token requests for this client", 429)
                return
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
