"""Signing people in: the identity provider's leg bound to the browser that started it, the
local dev sign-in, the user row it updates, and server-side sign-in sessions."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.authserver.identity import IdentityClaims, OidcIdentityProvider
from services.common.cache import TtlCache
from services.common.errors import IdentityError, InvalidInput, PageError
from services.common.logs import security_event
from services.common.servers import check_email
from storage.base import Pending, User


def dev_subject(email: str) -> str:
    """The stable subject of a local dev sign-in (no IdP to issue one)."""
    return "dev-" + hashlib.sha256(email.lower().encode()).hexdigest()[:24]


LOGIN_TTL = 600  # a person may take ten minutes at the identity provider
SESSION_CHECK_TTL = 1.0  # a positive session check is reused this long, on this instance only
SESSION_CACHE_SIZE = 10000
_BROWSER_KEY = re.compile(r"[A-Za-z0-9_-]{32,64}")


def secret_digest(secret: str) -> str:
    """What storage keeps of a browser secret (a session id, a login binding): a reader
    of the database cannot replay it."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class LoginRedirect:
    """Where to send the browser, and the value of the login-binding cookie that must come
    back with the IdP's answer (RFC 6749 §10.12: the state is bound to this browser)."""

    url: str
    browser_key: str


@dataclass(frozen=True)
class SignInSession:
    """A browser sign-in: the cookie carries `sid`; storage holds its digest (Pending kind
    "signin"), so logout, "sign out everywhere" and user removal end it server-side."""

    sid: str
    started_at: float
    expires_at: float


class Accounts:
    """Signing people in: the identity provider's leg (a single-use, server-side state
    created right before the redirect and bound to the browser that started it), the local
    dev sign-in, what a successful sign-in changes (the user row keyed by `sub`; servers
    registered for this e-mail before the person ever signed in get bound to them), and
    the server-side sign-in sessions behind the browser cookie."""

    def __init__(self, storage, identity: OidcIdentityProvider | None, access=None, signin_ttl: int = 43200, *,
                 now: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic):
        self._storage = storage
        self._identity = identity
        self._access = access  # AccessPolicy: told at once when a sign-in binds servers
        self._signin_ttl = signin_ttl
        self._now = now
        # sid digest -> sub, for sessions found live in the last SESSION_CHECK_TTL
        self._live = TtlCache(SESSION_CACHE_SIZE, SESSION_CHECK_TTL, clock=clock)

    # ------------------------------------------------------------- the IdP's leg

    async def begin(self, next_path: str, force_login: bool, browser_key: str | None = None) -> LoginRedirect:
        """The identity provider URL to send the browser to. `browser_key` is the login
        cookie the browser already holds (reused, so that two tabs signing in at once
        both finish), else a new one is made."""
        if not isinstance(browser_key, str) or not _BROWSER_KEY.fullmatch(browser_key):
            browser_key = secrets.token_urlsafe(32)
        try:
            start = await self._identity.start_login(force_login=force_login)
        except IdentityError as exc:
            raise PageError(exc.status, "Sign-in is unavailable", str(exc)) from None
        await self._storage.put_pending(
            Pending(
                kind="login",
                key=start.state,
                payload={"nonce": start.nonce, "verifier": start.code_verifier, "next": next_path,
                         "browser": secret_digest(browser_key)},
                expires_at=self._now() + LOGIN_TTL,
            )
        )
        return LoginRedirect(start.url, browser_key)

    async def finish(self, state: str, code: str, error: str | None,
                     browser_key: str | None = None) -> tuple[User, str]:
        """The return from the identity provider: the signed-in user and where to go next.

        The state must have been started by this browser (its login cookie). A callback
        URL opened in another browser is refused without consuming the state, so the
        browser it belongs to can still finish; nothing is signed in either way."""
        now = self._now()
        pending = await self._storage.get_pending("login", state, now) if state else None
        if pending is not None:
            expected = str(pending.payload.get("browser", ""))
            offered = secret_digest(browser_key) if isinstance(browser_key, str) and browser_key else ""
            if not expected or not secrets.compare_digest(expected, offered):
                security_event("signin_refused", "sign-in refused: the callback came to another browser than "
                                                 "the one that started it (login CSRF?)", reason="browser_mismatch")
                raise PageError(
                    403, "This sign-in was started in another browser",
                    "A sign-in must end in the browser where it began. "
                    "Start again from your application or the dashboard, in this browser.",
                )
            pending = await self._storage.take_pending("login", state, now)  # single use
        if error:  # some IdPs send no state with an error: nothing to look up then
            raise PageError(403, "Sign-in was cancelled", f"The identity provider answered: {error[:100]}")
        if pending is None:
            raise PageError(400, "This sign-in has expired", "Start again from your application or the dashboard.")
        if not code:
            raise PageError(400, "Sign-in failed", "The identity provider sent no code.")
        try:
            claims = await self._identity.finish_login(code, pending.payload["verifier"], pending.payload["nonce"])
        except IdentityError as exc:
            title = "Sign-in timed out" if exc.status == 504 else "Sign-in failed"
            raise PageError(exc.status, title, str(exc)) from None
        return await self.sign_in(claims), pending.payload.get("next", "")

    async def dev_sign_in(self, email: str) -> User:
        """The local sign-in (MCPGW_DEV_LOGIN, loopback only): the address is trusted as typed."""
        try:
            email = check_email(email)
        except InvalidInput:
            raise PageError(400, "Sign in", "Enter a valid e-mail address.") from None
        return await self.sign_in(
            IdentityClaims(sub=dev_subject(email), email=email, email_verified=True, hd="",
                           name=email.split("@")[0], picture="")
        )

    async def sign_in(self, claims: IdentityClaims) -> User:
        now = self._now()
        previous = await self._storage.get_user(claims.sub)
        user = await self._storage.upsert_user(
            User(
                sub=claims.sub,
                email=claims.email,
                email_verified=claims.email_verified,
                hd=claims.hd,
                name=claims.name,
                picture=claims.picture,
                created_at=previous.created_at if previous else now,
                last_login_at=now,
            )
        )
        if claims.email and claims.email_verified:
            bound = await self._storage.bind_owner(claims.email, claims.sub)
            if bound:
                security_event("owner_bound", "servers registered for this e-mail are now owned by the account "
                                              "that signed in with it", user_sub=claims.sub, servers=bound)
            if bound and self._access is not None:
                # Until now the e-mail alone made its holder the owner; from now on only
                # this `sub` is. The cached rules must not grant another account with the
                # same e-mail for the rest of their TTL.
                for server in await self._storage.servers_owned_by(claims.sub):
                    self._access.forget(server.server_id)
        return user

    # --------------------------------------------------------- browser sessions

    async def start_session(self, sub: str) -> SignInSession:
        now = self._now()
        sid = secrets.token_urlsafe(32)
        await self._storage.put_pending(
            Pending(kind="signin", key=secret_digest(sid), payload={"sub": sub, "started_at": now},
                    expires_at=now + self._signin_ttl)
        )
        return SignInSession(sid, now, now + self._signin_ttl)

    async def session_is_live(self, sid, sub) -> bool:
        """Whether the cookie's session still stands: not logged out, not older than the
        user's last "sign out everywhere", and the user still exists. Three key lookups,
        reused for SESSION_CHECK_TTL when positive."""
        if not isinstance(sid, str) or not sid or not isinstance(sub, str) or not sub:
            return False
        key = secret_digest(sid)
        if self._live.get(key) == sub:
            return True
        now = self._now()
        session, epoch, user = await asyncio.gather(
            self._storage.get_pending("signin", key, now),
            self._storage.get_pending("signout-all", sub, now),
            self._storage.get_user(sub),
        )
        live = (
            session is not None
            and session.payload.get("sub") == sub
            and user is not None
            and (epoch is None or float(session.payload.get("started_at", 0)) > float(epoch.payload.get("at", 0)))
        )
        if live:
            self._live.set(key, sub)
        else:
            self._live.pop(key, None)
        return live

    async def end_session(self, sid) -> None:
        """Logout: the session stops working at once here, and on other instances within
        SESSION_CHECK_TTL."""
        if not isinstance(sid, str) or not sid:
            return
        key = secret_digest(sid)
        self._live.pop(key, None)
        await self._storage.take_pending("signin", key, self._now())

    async def end_all_sessions(self, sub: str) -> None:
        """"Sign out everywhere": every session of `sub` started before now stops working.
        Stored as an epoch (Pending kind "signout-all"), kept as long as a session lives."""
        now = self._now()
        for key, owner in self._live.items():
            if owner == sub:
                self._live.pop(key)
        await self._storage.put_pending(
            Pending(kind="signout-all", key=sub, payload={"at": now}, expires_at=now + self._signin_ttl + 60)
        )
        security_event("signout_all", "signed out everywhere: every earlier sign-in session ended", user_sub=sub)
