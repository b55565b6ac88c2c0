"""/metrics is not for anyone who can reach the port (issue 7, finding 22): loopback
callers, or callers with `Authorization: Bearer <MCPGW_METRICS_TOKEN>`. Behind a reverse
proxy on the same host (MCPGW_TRUST_FORWARDED=1) a forwarded request is not loopback."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import GatewayProcess

TOKEN = "metrics-secret-0123456789abcdef"
FORWARDED = {"X-Forwarded-For": "203.0.113.9"}


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory):
    state = tmp_path_factory.mktemp("metrics")
    token_file = state / "metrics.token"
    token_file.write_text(TOKEN + "\n")  # the _FILE variant, as systemd credentials give it
    gateway = GatewayProcess(state / "gw", extra_env={
        "MCPGW_TRUST_FORWARDED": "1", "MCPGW_METRICS_TOKEN_FILE": str(token_file)}).start()
    try:
        with httpx.Client(base_url=gateway.url, trust_env=False, timeout=20) as http:
            yield http
    finally:
        gateway.stop()


def test_a_forwarded_caller_without_the_token_is_refused(behind_proxy):
    response = behind_proxy.get("/metrics", headers=FORWARDED)
    assert response.status_code == 403
    assert "mcpgw_" not in response.text and "MCPGW_METRICS_TOKEN" in response.text


@pytest.mark.parametrize("credentials", ["Bearer wrong-token", f"Basic {TOKEN}", "Bearer", TOKEN])
def test_a_wrong_token_is_refused(behind_proxy, credentials):
    response = behind_proxy.get("/metrics", headers={**FORWARDED, "Authorization": credentials})
    assert response.status_code == 403


def test_the_bearer_token_opens_metrics_to_a_forwarded_caller(behind_proxy):
    response = behind_proxy.get("/metrics", headers={**FORWARDED, "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert response.headers["cache-control"] == "no-store"
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert "mcpgw_http_requests" in names  # at least the harness's start-up /healthz probe


def test_a_client_written_x_real_ip_is_not_loopback(behind_proxy):
    assert behind_proxy.get("/metrics", headers={"X-Real-Ip": "127.0.0.1"}).status_code == 403


def test_loopback_without_the_token_is_served(behind_proxy):
    response = behind_proxy.get("/metrics")
    assert response.status_code == 200
    assert "# TYPE mcpgw_" in response.text
