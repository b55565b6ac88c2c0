"""A browser-less dashboard user: an httpx client signed in with the local (dev) sign-in,
and the two ways it changes state — an XSRF-carrying form post and an /api call."""

from __future__ import annotations

import httpx


def sign_in(gw, email: str) -> httpx.Client:
    """A client signed in as `email` at the gateway `gw` (MCPGW_DEV_LOGIN)."""
    client = httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30, trust_env=False)
    client.get("/login")
    response = client.post("/login", data={"email": email, "next": "/dashboard", "_xsrf": client.cookies["_xsrf"]})
    assert response.status_code == 302, response.text
    return client


def post(client: httpx.Client, path: str, **data) -> httpx.Response:
    """A dashboard form submission, with its XSRF field."""
    return client.post(path, data={**data, "_xsrf": client.cookies["_xsrf"]})


def api(client: httpx.Client, method: str, path: str, body=None) -> httpx.Response:
    """A JSON /api call with the X-XSRFToken header."""
    client.get("/api/me")  # makes sure the _xsrf cookie is set
    return client.request(method, path, json=body, headers={"X-XSRFToken": client.cookies["_xsrf"]})
