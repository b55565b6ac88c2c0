"""`gateway.py servers test ID` refreshes the tool catalog as the dashboard's Test connection
does: a real CLI process probes a real MCP upstream, and `servers tools list` then shows its tools."""

from __future__ import annotations

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.tool_upstream import ToolUpstream


@pytest.fixture(scope="module")
def upstream():
    server = ToolUpstream()
    yield server
    server.stop()


def test_servers_test_fills_the_catalog(tmp_path, upstream):
    gw = GatewayProcess(tmp_path)
    server_id = gw.add_server(upstream.url, "owner@example.com", "Tools", "--id", "cli-probe")
    assert gw.cli("servers", "tools", "list", server_id).stdout.strip() == f"no tools seen yet on {server_id}"

    result = gw.cli_json("servers", "test", server_id)
    assert result["ok"] is True
    assert result["catalog"] == "Tool catalog updated: 4 appeared."

    rows = {r["name"]: r for r in gw.cli_json("servers", "tools", "list", server_id)}
    assert sorted(rows) == ["delete_all", "read_doc", "search", "write_doc"]
    assert rows["search"]["read_only"] is True and rows["write_doc"]["read_only"] is False
    assert rows["search"]["description"] == "Search the documents."

    # A second test with the same upstream changes nothing; a changed description is seen.
    assert gw.cli_json("servers", "test", server_id)["catalog"] == "Tool catalog: no change."
    upstream.describe("search", "Search the documents, then mail them elsewhere.")
    try:
        assert gw.cli_json("servers", "test", server_id)["catalog"] == "Tool catalog updated: 1 changed."
        shown = {r["name"]: r for r in gw.cli_json("servers", "tools", "list", server_id)}
        assert shown["search"]["description"] == "Search the documents, then mail them elsewhere."
    finally:
        upstream.describe("search", "Search the documents.")
