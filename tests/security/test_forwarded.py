"""Rate limits behind a trusted reverse proxy (issue 7, finding 10): the key is the address
the proxy saw (the right-most X-Forwarded-For entry), never an entry the client wrote."""

from __future__ import annotations

import httpx
import pytest

from tests.support.gateway import GatewayProcess

REGISTRATION = {"client_name": "Spoofer", "redirect_uris": ["http://127.0.0.1:9/cb"],
                "token_endpoint_auth_method": "none"}
BURST = 60  # services.ratelimit DEFAULT_RULES["register"]


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory):
    gateway = GatewayProcess(tmp_path_factory.mktemp("forwarded"),
                             extra_env={"MCPGW_TRUST_FORWARDED": "1"}).start()
    try:
        with httpx.Client(base_url=gateway.url, trust_env=False, timeout=20) as http:
            yield gateway, http
    finally:
        gateway.stop()


def test_client_chosen_forwarded_entries_do_not_escape_the_register_limit(behind_proxy):
    _, http = behind_proxy
    statuses = []
    for n in range(BURST + 20):
        # What a proxy that appends ($proxy_add_x_forwarded_for) sends on: the client's
        # own header first, then the address the proxy saw.
        spoofed = f"10.{n // 250}.{n % 250}.1, 198.51.100.7"
        response = http.post("/register", json=REGISTRATION, headers={"X-Forwarded-For": spoofed})
        statuses.append(response.status_code)
    assert statuses[:BURST] == [201] * BURST
    assert set(statuses[BURST:]) == {429}
    refused = http.post("/register", json=REGISTRATION, headers={"X-Forwarded-For": "1.2.3.4, 198.51.100.7"})
    assert refused.json()["error"] == "slow_down"
    assert refused.headers["Retry-After"] == "60"


def test_x_real_ip_from_the_client_is_not_the_key(behind_proxy):
    _, http = behind_proxy
    # 198.51.100.8 is a fresh proxy-seen address; X-Real-Ip (which Tornado's xheaders
    # would prefer) changes on every request and must not reset the bucket.
    statuses = [
        http.post("/register", json=REGISTRATION,
                  headers={"X-Forwarded-For": "198.51.100.8", "X-Real-Ip": f"10.0.{n}.1"}).status_code
        for n in range(BURST + 5)
    ]
    assert statuses.count(201) == BURST and statuses[-1] == 429
