"""Token endpoint and verification figures (not part of the test run).

Starts one real gateway process (dev sign-in, SQLite) and measures, in the same run:
  - GET /healthz                  the framework floor (baseline),
  - POST /token refresh_token     rotation: one conditional write per request,
  - POST /token authorization_code (codes prepared beforehand),
and in-process: access-token verification cold (RS256) vs warm (verified-token cache).
Figures are printed as ratios against the baseline measured in the same run.

Run: .venv/bin/python bench/token_endpoint.py [N]
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.gateway import GatewayProcess  # noqa: E402

REDIRECT = "http://127.0.0.1:9/cb"


def pkce():
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def spoof_address(request: httpx.Request) -> None:
    request.headers["X-Forwarded-For"] = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.1"


def timed(label: str, fn, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def report(label: str, samples: list[float], baseline: float | None) -> float:
    p50 = statistics.median(samples)
    rps = 1000 / statistics.mean(samples)
    ratio = f"  ({p50 / baseline:.2f}x the /healthz floor)" if baseline else ""
    print(f"{label:<40} p50 {p50:7.3f} ms   {rps:8.0f} req/s sequential{ratio}")
    return p50


def main(n: int = 500) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Each request comes "from" its own address so the per-address rate limits
        # (which this benchmark is not about) stay out of the figures.
        gateway = GatewayProcess(Path(tmp), extra_env={"MCPGW_TRUST_FORWARDED": "1"}).start()
        try:
            http = httpx.Client(base_url=gateway.url, event_hooks={"request": [spoof_address]})
            client_id = http.post(
                "/register",
                json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", "client_name": "bench"},
            ).json()["client_id"]
            http.get("/login")
            http.post("/login", data={"email": "bench@example.com", "next": "/", "_xsrf": http.cookies["_xsrf"]})

            def new_code() -> tuple[str, str]:
                verifier, challenge = pkce()
                page = http.get("/authorize", params={
                    "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT,
                    "code_challenge": challenge, "code_challenge_method": "S256", "state": "s",
                })
                location = page.headers["location"]
                page = http.get(location)
                if page.status_code == 200:  # first time: the consent page
                    req = re.search(r'name="req" value="([^"]+)"', page.text).group(1)
                    page = http.post("/authorize/consent", data={
                        "req": req, "decision": "approve", "_xsrf": http.cookies["_xsrf"]})
                code = re.search(r"code=([^&]+)", page.headers["location"]).group(1)
                return code, verifier

            codes = [new_code() for _ in range(n)]
            floor = report("GET /healthz (baseline)", timed("h", lambda: http.get("/healthz"), n), None)

            tokens = []
            iterator = iter(codes)

            def exchange():
                code, verifier = next(iterator)
                response = http.post("/token", data={
                    "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                    "client_id": client_id, "redirect_uri": REDIRECT})
                tokens.append(response.json())

            report("POST /token authorization_code", timed("c", exchange, n), floor)
            refresh = tokens[0]["refresh_token"]

            def rotate():
                nonlocal refresh
                response = http.post("/token", data={
                    "grant_type": "refresh_token", "refresh_token": refresh, "client_id": client_id})
                assert response.status_code == 200, response.text
                refresh = response.json()["refresh_token"]

            report("POST /token refresh_token (rotation)", timed("r", rotate, n), floor)
            access_token = tokens[-1]["access_token"]
        finally:
            gateway.stop()
        asyncio.run(verification(gateway, access_token, n))


async def verification(gateway: GatewayProcess, token: str, n: int) -> None:
    """In-process: the proxy's verification cost, cold and warm, on the same key set."""
    import os

    from config import Config
    from services import build_services

    os.environ.update({k: v for k, v in gateway.env.items() if k.startswith("MCPGW_")})
    services = build_services(Config.from_env())
    await services.start(background=False)
    try:
        cold = []
        for _ in range(n):
            services.tokens._verified.clear()  # force the RS256 path
            start = time.perf_counter()
            await services.tokens.verify_access_token(token)
            cold.append((time.perf_counter() - start) * 1e6)
        warm = []
        for _ in range(n):
            start = time.perf_counter()
            await services.tokens.verify_access_token(token)
            warm.append((time.perf_counter() - start) * 1e6)
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"verify access token, cold (RS256)        p50 {c:7.1f} µs")
        print(f"verify access token, warm (cache hit)    p50 {w:7.1f} µs   ({c / w:.0f}x faster than cold)")
    finally:
        await services.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
