"""Access tokens obtained the real way, over HTTP: /register, then /authorize with PKCE
through the IdP sign-in and the consent page (a ScriptedBrowser), then /token."""

from __future__ import annotations

import base64
import hashlib
import secrets
from urllib.parse import urlencode

import httpx

from .browser import ScriptedBrowser

# Nothing listens here: the browser stops at the redirect, as a CLI client's listener would.
REDIRECT = "http://127.0.0.1:9/callback"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def register_public_client(http: httpx.AsyncClient, name: str) -> str:
    registered = await http.post("/register", json={
        "client_name": name, "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
    })
    assert registered.status_code == 201, registered.text
    return registered.json()["client_id"]


async def access_token(gateway_url: str, http: httpx.AsyncClient, browser: ScriptedBrowser,
                       client_id: str, who: dict, *, resource: str | None = None,
                       scope: str | None = None) -> str:
    """One real authorization: /authorize → IdP sign-in → consent → /token."""
    verifier, challenge = pkce()
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT,
             "state": secrets.token_hex(6), "code_challenge": challenge, "code_challenge_method": "S256"}
    if resource:
        query["resource"] = resource
    if scope:
        query["scope"] = scope
    result = await browser.authorize(f"{gateway_url}/authorize?{urlencode(query)}", stop_at=REDIRECT,
                                     idp_login=who)
    assert "code" in result, result
    response = await http.post("/token", data={
        "grant_type": "authorization_code", "code": result["code"], "code_verifier": verifier,
        "redirect_uri": REDIRECT, "client_id": client_id,
    })
    assert response.status_code == 200, response.text
    return response.json()["access_token"]
