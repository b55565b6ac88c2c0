"""A real OpenID Connect provider (the `oidc-provider-mock` package) run as a separate process.

The gateway's identity broker talks to it over loopback exactly as it talks to Google.

What the provider (oidc-provider-mock 0.3.4, Flask + Authlib, served by uvicorn) does:

- Started here as ``python -m oidc_provider_mock --host H --port P [-r] [-n] [-f]
  [-e SECS] [--user-claims JSON]...`` (the mock's own CLI, unpatched); ``-r`` requires
  registered clients, ``-n`` requires a ``nonce``, ``-f`` stops issuing refresh tokens,
  ``-e`` sets the access/ID-token lifetime. ``IdpProcess(id_token_kid=True)`` runs the one
  varied provider instead (tests/support/idp_app.py: the same CLI, ``kid`` in ID-token
  headers, as Google sends it).
- ``issuer`` is ``request.host_url`` without the trailing slash, so it follows the Host
  header: always address it as ``http://127.0.0.1:PORT`` (``localhost`` is another issuer).
- Endpoints: discovery ``/.well-known/openid-configuration``, ``/oauth2/authorize`` (GET
  shows a form, POST decides), ``/oauth2/token``, ``/userinfo``, ``/jwks`` (one RS256 key
  per process), ``/oauth2/clients`` (registration), ``/oauth2/end_session``, and the
  test-control endpoints ``PUT /users/{sub}`` and ``POST /users/{sub}/revoke-tokens``.
- Clients: ``POST /oauth2/clients`` with JSON ``{"redirect_uris": [...],
  "token_endpoint_auth_method": "client_secret_basic" | "client_secret_post" | "none",
  "scope": "..."}`` returns 201 with ``client_id`` and ``client_secret``; redirect URIs then
  match exactly. Without ``-r`` any unknown ``client_id`` is accepted with any secret, any
  redirect URI and any auth method.
- PKCE is *not* enforced: ``code_challenge``/``code_verifier`` are accepted and ignored,
  and discovery lists no ``code_challenge_methods_supported``. The redirect back carries
  ``code`` and ``state`` only (no RFC 9207 ``iss``).
- Users: ``PUT /users/{sub}`` with a JSON object of claims replaces that user's claims
  (answer 204). The ID token and userinfo carry every non-standard claim as is (so ``hd``
  always comes through) and the standard OIDC claims only when their scope was granted:
  ``email``/``email_verified`` need scope ``email``, ``name`` needs ``profile``. A ``sub``
  typed into the form that was never PUT becomes a user with claims ``{"email": sub}``
  (no ``email_verified``). So ``hd`` needs no patch.
- ID tokens: RS256, ``aud`` is a one-element *list* ``[client_id]``, ``iss``, ``iat``, ``exp``,
  ``auth_time``, ``at_hash``, ``nonce`` (when sent), plus the user's claims. The JWS header
  has no ``kid`` (the JWKS lists the key with one); OIDC Core §10.1 allows that.
- The authorization page (GET ``/oauth2/authorize?...``) has several ``<form method="post">``
  without ``action`` (so they post back to the same URL, query string included):
  1. ``<input type="text" name="sub" required>`` + an unnamed ``Authorize`` submit button;
  2. ``<button name="action" value="deny">`` (the IdP redirects with ``error=access_denied``);
  3. (only with predefined users) one ``<button name="sub" value=SUB>`` per user;
  4. (after some logins) one ``<button name="sub" value=SUB>`` per recently used subject.
  Posting ``sub=SUB`` answers 302 to ``redirect_uri?code=...&state=...``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = ["IdpClient", "IdpError", "IdpProcess", "free_port"]

# The varied provider: the mock's own CLI plus a `kid` in ID-token headers (see idp_app.py).
_KID_VARIANT = Path(__file__).with_name("idp_app.py")


class IdpError(RuntimeError):
    """The identity provider process failed to start or refused a control request."""


@dataclass(frozen=True)
class IdpClient:
    """A client registered at the identity provider (the gateway's own client there)."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago: racy, for a peer that cannot take a socket (this
    IdP) and retries on EADDRINUSE. Anything else binds with tests/support/ports.py."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_was_taken(log: str) -> bool:
    # uvicorn's line when its bind fails: "[Errno 98] error while attempting to bind on
    # address (...): address already in use", then exit 1.
    return f"[Errno {errno.EADDRINUSE}]" in log and "address already in use" in log.lower()


class IdpProcess:
    """One oidc-provider-mock process on a free loopback port (picked again if taken).

    Usage::

        with IdpProcess() as idp:
            client = idp.register_client(["http://127.0.0.1:8080/oauth/callback"])
            idp.set_user("u-1", email="a@example.com", email_verified=True, hd="example.com")
            ...  # point MCPGW_OIDC_ISSUER at idp.issuer

    ``require_registration`` defaults to True so that a wrong client id or redirect URI
    fails the way it would at Google instead of being silently accepted.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        require_registration: bool = True,
        require_nonce: bool = False,
        issue_refresh_token: bool = True,
        token_max_age: int = 3600,
        users: Sequence[Mapping[str, Any]] = (),
        startup_timeout: float = 20.0,
        id_token_kid: bool = False,
    ) -> None:
        self.host = host
        self.require_registration = require_registration
        self.require_nonce = require_nonce
        self.issue_refresh_token = issue_refresh_token
        self.token_max_age = token_max_age
        self.users = [dict(user) for user in users]
        self.startup_timeout = startup_timeout
        self.id_token_kid = id_token_kid
        self.port: int | None = None
        self.last_log = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._discovery: dict[str, Any] | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Self:
        """Start the process and return once its discovery document answers."""
        if self._process is not None:
            raise IdpError("IdP already started")
        # The mock's CLI binds --port itself (uvicorn.run(host=, port=) in its __main__) and
        # has no option to take an inherited socket, so the port is picked free and another
        # process may take it before the mock binds it: then (and only then) pick again.
        for _attempt in range(5):
            self._spawn(free_port(self.host))
            try:
                self._wait_ready()
                return self
            except IdpError as exc:
                taken = _port_was_taken(self.log_text())
                self.stop()
                if not taken:
                    raise IdpError(f"identity provider did not start: {exc}") from None
        raise IdpError("identity provider did not start: its port was taken five times in a row")

    def stop(self) -> None:
        """Stop the process (only the one this object started) and keep its log."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log_file is not None:
            self.last_log = self.log_text()
            self._log_file.close()
            self._log_file = None
        self._discovery = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """The process's combined stdout/stderr so far (for failure messages)."""
        if self._log_file is None:
            return self.last_log
        self._log_file.flush()
        self._log_file.seek(0)
        return self._log_file.read().decode("utf-8", "replace")

    def _spawn(self, port: int) -> None:
        entry = [str(_KID_VARIANT)] if self.id_token_kid else ["-m", "oidc_provider_mock"]
        args = [
            sys.executable,
            *entry,
            "--host",
            self.host,
            "--port",
            str(port),
            "--token-max-age",
            str(self.token_max_age),
        ]
        # The mock's boolean options take an optional value: the bare flag means True.
        if self.require_registration:
            args.append("--require-registration")
        if self.require_nonce:
            args.append("--require-nonce")
        if not self.issue_refresh_token:
            args.append("--no-refresh-token")
        for user in self.users:
            if "sub" not in user:
                raise ValueError("every predefined user needs a 'sub'")
            args += ["--user-claims", json.dumps(user)]
        env = dict(
            os.environ, NO_COLOR="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore"
        )
        # A file rather than a pipe: nobody drains a pipe, and a full one would hang the IdP.
        self._log_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.port = port

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.issuer}/.well-known/openid-configuration"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if self._process.poll() is not None:
                    raise IdpError(
                        f"exited with {self._process.returncode}: {self.log_text()[-2000:]}"
                    )
                try:
                    response = client.get(url)
                    if response.status_code == 200:
                        self._discovery = response.json()
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise IdpError(
                        f"not ready after {self.startup_timeout}s: {self.log_text()[-2000:]}"
                    )
                time.sleep(0.05)

    # -- addresses ---------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """``http://127.0.0.1:PORT``, exactly the ``iss`` of its ID tokens."""
        if self.port is None:
            raise IdpError("IdP not started")
        return f"http://{self.host}:{self.port}"

    @property
    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            raise IdpError("IdP not started")
        return self._discovery

    @property
    def authorization_endpoint(self) -> str:
        return self.discovery["authorization_endpoint"]

    @property
    def token_endpoint(self) -> str:
        return self.discovery["token_endpoint"]

    @property
    def jwks_uri(self) -> str:
        return self.discovery["jwks_uri"]

    @property
    def userinfo_endpoint(self) -> str:
        return self.discovery["userinfo_endpoint"]

    # -- test control --------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # Blocking is fine even inside a test's event loop: the peer is another process.
        with httpx.Client(timeout=10.0, trust_env=False) as client:
            return client.request(method, f"{self.issuer}{path}", **kwargs)

    def register_client(
        self,
        redirect_uris: Sequence[str],
        *,
        token_endpoint_auth_method: str = "client_secret_basic",
        scope: str | None = None,
    ) -> IdpClient:
        """Register a confidential client (dynamic registration at ``/oauth2/clients``)."""
        body: dict[str, Any] = {
            "redirect_uris": list(redirect_uris),
            "token_endpoint_auth_method": token_endpoint_auth_method,
        }
        if scope is not None:
            body["scope"] = scope
        response = self._request("POST", "/oauth2/clients", json=body)
        if response.status_code != 201:
            raise IdpError(
                f"client registration refused ({response.status_code}): {response.text}"
            )
        data = response.json()
        return IdpClient(
            client_id=data["client_id"],
            client_secret=data["client_secret"],
            redirect_uris=tuple(data["redirect_uris"]),
            token_endpoint_auth_method=data["token_endpoint_auth_method"],
        )

    def set_user(
        self,
        sub: str,
        *,
        email: str | None = None,
        email_verified: bool | None = None,
        hd: str | None = None,
        name: str | None = None,
        **claims: Any,
    ) -> dict[str, Any]:
        """Create or replace the user ``sub``; claims left as None are absent from its tokens.

        Returns the claims stored. Replaces, never merges: set every claim you need.
        """
        stored: dict[str, Any] = {
            key: value
            for key, value in {
                "email": email,
                "email_verified": email_verified,
                "hd": hd,
                "name": name,
            }.items()
            if value is not None
        }
        stored.update(claims)
        response = self._request("PUT", f"/users/{sub}", json=stored)
        if response.status_code != 204:
            raise IdpError(
                f"set_user refused ({response.status_code}): {response.text}"
            )
        return stored

    def revoke_user_tokens(self, sub: str) -> None:
        """Revoke every access and refresh token the IdP issued to ``sub``."""
        response = self._request("POST", f"/users/{sub}/revoke-tokens")
        if response.status_code != 204:
            raise IdpError(f"revoke refused ({response.status_code}): {response.text}")

    def jwks(self) -> dict[str, Any]:
        response = self._request("GET", "/jwks")
        response.raise_for_status()
        return response.json()
