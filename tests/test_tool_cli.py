"""The tool policy commands of the admin CLI, run as real processes against their own
storage: `servers edit` sets the default rule and pinning, `grants add|edit` a grant's rule,
`grants list` shows each rule, `servers tools list|approve` the catalog; bad input is one
line on stderr and a non-zero exit, with nothing changed."""

from __future__ import annotations

import asyncio

import pytest

from services.proxy.tools.catalog import diff, tool_hash
from storage import SqliteStorage
from tests.support.gateway import GatewayProcess


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    return GatewayProcess(tmp_path_factory.mktemp("toolcli"))


def fails(result) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    return lines[0]


def add_server(gw: GatewayProcess, server_id: str) -> str:
    return gw.add_server("http://127.0.0.1:9/mcp", "owner@example.com", "Tools", "--id", server_id)


def list_tools(gw: GatewayProcess, server_id: str, tools: list[dict]) -> None:
    """What the proxy does when an upstream answers tools/list: record it in the catalog."""

    async def record() -> None:
        store = SqliteStorage(gw.env["MCPGW_STORAGE"].removeprefix("sqlite:///"))
        await store.open()
        try:
            stored = {e.name: e for e in await store.tools.tool_catalog(server_id)}
            await store.tools.apply_tool_changes(
                server_id, diff(server_id, stored, tools, [tool_hash(t) for t in tools], 1.8e9, complete=True))
        finally:
            await store.close()

    asyncio.run(record())


def test_servers_edit_sets_the_default_rule_and_show_prints_it(gw):
    server_id = add_server(gw, "tools-edit")
    view = gw.cli_json("servers", "edit", server_id, "--tools-allow", "search, github_*", "--tools-deny", "github_delete*",
                       "--read-only")
    assert (view["tools_allow"], view["tools_deny"], view["tools_read_only"]) == (
        ["search", "github_*"], ["github_delete*"], True)
    assert view["name"] == "Tools"  # the rest of the server as it was
    shown = gw.cli_json("servers", "show", server_id)
    assert shown["tools_allow"] == ["search", "github_*"] and shown["tools_pinned"] is False
    # Given parts change, the others stay; --tools-clear empties the rule.
    assert gw.cli_json("servers", "edit", server_id, "--no-read-only")["tools_allow"] == ["search", "github_*"]
    assert gw.cli_json("servers", "edit", server_id, "--name", "Renamed", "--tools-deny", "rm")["tools_deny"] == ["rm"]
    cleared = gw.cli_json("servers", "edit", server_id, "--tools-clear")
    assert (cleared["tools_allow"], cleared["tools_deny"], cleared["tools_read_only"], cleared["name"]) == (
        [], [], False, "Renamed")


def test_grants_add_edit_and_list_show_each_rule(gw):
    server_id = add_server(gw, "tools-grants")
    gw.cli("grants", "add", server_id, "--email", "bob@example.com")
    added = gw.cli_json("grants", "add", server_id, "--domain", "example.org", "--tools-allow", "search,fetch*",
                        "--read-only")
    assert (added["value"], added["tools_allow"], added["tools_read_only"]) == ("example.org", ["search", "fetch*"], True)
    edited = gw.cli_json("grants", "edit", server_id, "--email", "Bob@Example.com", "--tools-deny", "delete_*")
    assert (edited["value"], edited["tools_deny"], edited["tools_allow"]) == ("bob@example.com", ["delete_*"], [])
    human = gw.cli("grants", "list", server_id).stdout.splitlines()
    assert human == ["domain\texample.org\tallow search,fetch*; read-only", "email\tbob@example.com\tdeny delete_*"]
    listed = gw.cli_json("grants", "list", server_id)
    assert [(g["kind"], g["tools_deny"]) for g in listed] == [("domain", []), ("email", ["delete_*"])]
    gw.cli("grants", "edit", server_id, "--email", "bob@example.com", "--tools-clear")
    assert gw.cli("grants", "list", server_id).stdout.splitlines()[1] == "email\tbob@example.com\tevery tool"
    # A rule on an add for a grant that exists would silently not apply: refused.
    assert "grants edit" in fails(gw.cli("grants", "add", server_id, "--domain", "example.org", "--tools-deny", "x",
                                         check=False))


def test_servers_tools_list_and_approve_on_a_pinned_server(gw):
    server_id = add_server(gw, "tools-pinned")
    assert gw.cli("servers", "tools", "list", server_id).stdout.strip() == f"no tools seen yet on {server_id}"
    search = {"name": "search", "inputSchema": {"type": "object"}, "annotations": {"readOnlyHint": True}}
    write = {"name": "write", "inputSchema": {"type": "object"}}
    list_tools(gw, server_id, [search, write])
    assert gw.cli_json("servers", "edit", server_id, "--pin")["tools_pinned"] is True  # approves what is there
    rows = {r["name"]: r for r in gw.cli_json("servers", "tools", "list", server_id)}
    assert rows["search"]["approved"] and rows["write"]["approved"] and rows["search"]["read_only"]
    assert not rows["write"]["read_only"] and rows["search"]["hash"] == tool_hash(search)
    list_tools(gw, server_id, [{**search, "description": "now sends your files away"}, write,
                               {"name": "new", "inputSchema": {}}])
    human = gw.cli("servers", "tools", "list", server_id).stdout.splitlines()
    assert [line.split("\t")[:3] for line in human] == [
        ["new", "read-write", "awaiting approval"], ["search", "read-only", "awaiting approval"],
        ["write", "read-write", "approved"]]
    assert gw.cli_json("servers", "tools", "approve", server_id, "search") == {"approved": ["search"]}
    assert gw.cli("servers", "tools", "approve", server_id).stdout.strip() == f"approved 1 tool(s) on {server_id}: new"
    assert gw.cli_json("servers", "tools", "approve", server_id) == {"approved": []}
    assert "not in the catalog" in fails(gw.cli("servers", "tools", "approve", server_id, "nope", check=False))


def test_a_rule_matching_no_catalog_tool_is_kept_with_a_warning(gw):
    server_id = add_server(gw, "tools-warn")
    list_tools(gw, server_id, [{"name": "search", "inputSchema": {}}])
    result = gw.cli("servers", "edit", server_id, "--tools-allow", "search,nothing_*")
    assert result.returncode == 0
    assert result.stderr.strip() == f"warning: 'nothing_*' matches no tool of {server_id} yet (1 in its catalog)"


@pytest.mark.parametrize("args, expected", [
    (("servers", "edit", "{id}", "--tools-allow", "[a-z]*"), "not a tool name or glob"),
    (("servers", "edit", "{id}", "--name", "Changed", "--tools-deny", "a|b"), "not a tool name or glob"),
    (("servers", "edit", "{id}", "--tools-allow", "x" * 200), "not a tool name or glob"),
    (("servers", "edit", "{id}", "--tools-allow", "ok\x01"), "not a tool name or glob"),
    (("servers", "edit", "nope-nope", "--tools-allow", "a"), "no server nope-nope"),
    (("grants", "edit", "{id}", "--email", "nobody@example.com", "--tools-allow", "a"), "no email grant"),
    (("grants", "edit", "{id}", "--email", "nobody@example.com"), "nothing to change"),
    (("grants", "add", "{id}", "--domain", "not a domain", "--read-only"), "not a domain"),
    (("servers", "tools", "list", "nope-nope"), "no server nope-nope"),
    (("servers", "tools", "approve", "nope-nope"), "no server nope-nope"),
])
def test_bad_input_is_one_line_and_changes_nothing(gw, args, expected):
    server_id = "tools-bad"
    if gw.cli("servers", "show", server_id, check=False).returncode != 0:
        add_server(gw, server_id)
    before = gw.cli_json("servers", "show", server_id)
    line = fails(gw.cli(*(a.replace("{id}", server_id) for a in args), check=False))
    assert expected in line
    assert gw.cli_json("servers", "show", server_id) == before
    assert gw.cli_json("grants", "list", server_id) == []
