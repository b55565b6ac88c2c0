"""/mcp/ on LeanHandler (handlers/lean.py), through a real gateway process: what it answers
outside MCP itself is what a Tornado RequestHandler answered (methods, bad paths, errors)."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support.gateway import GatewayProcess

GENERATED_ID = re.compile(r"[0-9a-f]{16}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = GatewayProcess(tmp_path_factory.mktemp("lean")).start()
    yield gw
    gw.stop()


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway.url, trust_env=False, timeout=10) as client:
        yield client


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD"])
def test_methods_mcp_does_not_take_are_405_with_the_json_error_and_a_request_id(http, method):
    response = http.request(method, "/mcp/srv_anything", headers={"X-Request-Id": "lean-405"})
    assert response.status_code == 405
    assert response.headers["x-request-id"] == "lean-405"
    assert response.headers["x-content-type-options"] == "nosniff"
    if method != "HEAD":
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == {"error": "invalid_request", "error_description": "Method Not Allowed"}
    else:
        assert response.content == b""


def test_a_server_id_that_is_not_utf8_is_a_400_json_error(http):
    response = http.post("/mcp/%ff%fe", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])


def test_paths_below_a_server_are_not_the_proxy(http):
    """Only /mcp/{serverId} is the proxy: /mcp/{id}/more falls to the route table's 404."""
    response = http.post("/mcp/srv_x/extra", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 404
    assert "www-authenticate" not in response.headers


def test_unauthenticated_call_answers_as_before_with_date_and_no_etag(http):
    """The 401 challenge, the default headers every answer carries, and no ETag on a GET."""
    response = http.get("/mcp/srv_x")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert response.headers["date"].endswith(" GMT") and "etag" not in response.headers
    assert response.headers["referrer-policy"] == "no-referrer"
    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])


def test_keep_alive_connection_serves_mcp_and_other_routes_in_turn(http):
    """One connection: the lean path and Tornado's routes answer one after the other."""
    statuses = [http.get(path).status_code for path in ("/mcp/srv_x", "/healthz", "/mcp/srv_x", "/healthz")]
    assert statuses == [401, 200, 401, 200]
