"""Configuration and the admin command line: a bad setting stops with one line naming the
variable; every CLI command prints what DESIGN.md promises (the new id last, --json),
and fails with a non-zero exit and one line on stderr."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from config import Config, ConfigError
from tests.support.gateway import ROOT, GatewayProcess

SECRET = "k" * 40


def base_env(tmp_path) -> dict[str, str]:
    return {"MCPGW_STATE_DIR": str(tmp_path / "state"), "MCPGW_SECRET_KEY": SECRET}


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("env, variable", [
    ({"MCPGW_PUBLIC_URL": "ftp://gw.example"}, "MCPGW_PUBLIC_URL"),
    ({"MCPGW_PUBLIC_URL": "http://gw.example"}, "MCPGW_PUBLIC_URL"),  # http off loopback
    ({"MCPGW_PUBLIC_URL": "https://gw.example/prefix"}, "MCPGW_PUBLIC_URL"),
    ({"MCPGW_PUBLIC_URL": "https://gw.example?x=1"}, "MCPGW_PUBLIC_URL"),
    ({"MCPGW_PUBLIC_URL": "https://user@gw.example"}, "MCPGW_PUBLIC_URL"),
    ({"MCPGW_PUBLIC_URL": "https://gw.example:99999"}, "MCPGW_PUBLIC_URL"),
    ({"MCPGW_PUBLIC_URL": "https://gw.example:http"}, "MCPGW_PUBLIC_URL"),
    ({"MCPGW_PUBLIC_URL": "http://[::1"}, "MCPGW_PUBLIC_URL"),
    ({"MCPGW_LISTEN": "8080"}, "MCPGW_LISTEN"),
    ({"MCPGW_LISTEN": "127.0.0.1:70000"}, "MCPGW_LISTEN"),
    ({"MCPGW_LISTEN": "127.0.0.1:0"}, "MCPGW_LISTEN"),
    ({"MCPGW_LISTEN": "127.0.0.1:\u00b2"}, "MCPGW_LISTEN"),  # a "digit" int() refuses
    ({"MCPGW_OIDC_ISSUER": "http://idp.example"}, "MCPGW_OIDC_ISSUER"),
    ({"MCPGW_OIDC_ISSUER": "accounts.google.com"}, "MCPGW_OIDC_ISSUER"),
    ({"MCPGW_OIDC_ISSUER": "https://[idp"}, "MCPGW_OIDC_ISSUER"),
    ({"MCPGW_OIDC_ISSUER": "https://idp.example:65536"}, "MCPGW_OIDC_ISSUER"),
    ({"MCPGW_DEV_LOGIN": "1", "MCPGW_LISTEN": "0.0.0.0:8080"}, "MCPGW_DEV_LOGIN"),
    ({"MCPGW_DEV_LOGIN": "1", "MCPGW_PUBLIC_URL": "https://gw.example"}, "MCPGW_DEV_LOGIN"),
    ({"MCPGW_DEV_LOGIN": "maybe"}, "MCPGW_DEV_LOGIN"),
    ({"MCPGW_TRUST_FORWARDED": "2"}, "MCPGW_TRUST_FORWARDED"),
    ({"MCPGW_ACCESS_TOKEN_TTL": "10"}, "MCPGW_ACCESS_TOKEN_TTL"),
    ({"MCPGW_ACCESS_TOKEN_TTL": "1h"}, "MCPGW_ACCESS_TOKEN_TTL"),
    ({"MCPGW_ACCESS_TOKEN_TTL": "\u00b2"}, "MCPGW_ACCESS_TOKEN_TTL"),
    ({"MCPGW_REFRESH_IDLE_TTL": "-5"}, "MCPGW_REFRESH_IDLE_TTL"),
    ({"MCPGW_REFRESH_ABSOLUTE_TTL": "1.5"}, "MCPGW_REFRESH_ABSOLUTE_TTL"),
    ({"MCPGW_SIGNIN_TTL": "99999999999"}, "MCPGW_SIGNIN_TTL"),
    ({"MCPGW_UPSTREAM_ALLOW": "10.0.0.0/33"}, "MCPGW_UPSTREAM_ALLOW"),
    ({"MCPGW_ALLOWED_ORIGINS": "example.com"}, "MCPGW_ALLOWED_ORIGINS"),
    ({"MCPGW_ALLOWED_ORIGINS": "https://a.example/path"}, "MCPGW_ALLOWED_ORIGINS"),
    ({"MCPGW_SECRET_KEY": "too-short"}, "MCPGW_SECRET_KEY"),
    ({"MCPGW_SECRET_KEY": "", "MCPGW_SECRET_KEY_FILE": "/nonexistent/key"}, "MCPGW_SECRET_KEY_FILE"),
    ({"MCPGW_OIDC_CLIENT_SECRET_FILE": "/nonexistent/secret"}, "MCPGW_OIDC_CLIENT_SECRET_FILE"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path, env, variable):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**base_env(tmp_path), **env})
    message = str(caught.value)
    assert message.startswith(variable + ":"), message
    assert "\n" not in message


def test_an_undecodable_secret_file_is_one_line_naming_the_variable(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**base_env(tmp_path), "MCPGW_OIDC_CLIENT_SECRET_FILE": str(path)})
    assert str(caught.value).startswith("MCPGW_OIDC_CLIENT_SECRET_FILE:")


def test_defaults_and_canonical_public_url(tmp_path):
    config = Config.from_env(base_env(tmp_path))
    assert config.public_url == config.issuer == "http://127.0.0.1:8080"
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.oidc_issuer == "https://accounts.google.com"
    assert config.base_resource == "http://127.0.0.1:8080/mcp/"
    config = Config.from_env({**base_env(tmp_path), "MCPGW_PUBLIC_URL": "HTTPS://GW.Example:8443/"})
    assert config.public_url == "https://gw.example:8443"
    assert config.server_resource("srv_x") == "https://gw.example:8443/mcp/srv_x"
    assert config.secure_cookies


def test_secrets_may_come_from_files(tmp_path):
    (tmp_path / "oidc").write_text("from-a-file\n")
    (tmp_path / "master").write_text("m" * 40 + "\n")
    env = {"MCPGW_STATE_DIR": str(tmp_path / "state"), "MCPGW_OIDC_CLIENT_SECRET_FILE": str(tmp_path / "oidc"),
           "MCPGW_SECRET_KEY_FILE": str(tmp_path / "master")}
    config = Config.from_env(env)
    assert config.oidc_client_secret == "from-a-file"
    assert config.secret_key == b"m" * 40
    assert "from-a-file" not in repr(config) and "mmmm" not in repr(config)


def test_the_generated_master_secret_is_private_and_stable(tmp_path):
    env = {"MCPGW_STATE_DIR": str(tmp_path / "state")}
    first = Config.from_env(env).secret_key
    second = Config.from_env(env).secret_key
    assert first == second and len(first) >= 32
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "secret.key").st_mode)
    assert mode == 0o600


def test_serving_needs_an_idp_client_or_the_dev_login(tmp_path):
    with pytest.raises(ConfigError) as caught:
        Config.from_env(base_env(tmp_path)).check_can_serve()
    assert str(caught.value).startswith("MCPGW_OIDC_CLIENT_ID:")
    Config.from_env({**base_env(tmp_path), "MCPGW_DEV_LOGIN": "1"}).check_can_serve()
    Config.from_env({**base_env(tmp_path), "MCPGW_OIDC_CLIENT_ID": "abc"}).check_can_serve()


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """The CLI against its own storage; nothing needs to be serving."""
    return GatewayProcess(tmp_path_factory.mktemp("cli"))


def fails(result, *, code: int | None = None) -> str:
    """A failed command: non-zero exit, exactly one line on stderr, nothing on stdout."""
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


def last_line(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_servers_add_prints_the_id_last_and_show_list_remove_work(gw):
    server_id = last_line(gw.cli("servers", "add", "--name", "Alpha", "--upstream", "http://127.0.0.1:9/mcp",
                                 "--owner", "Owner@Example.com"))
    assert server_id.startswith("srv_")
    chosen = last_line(gw.cli("servers", "add", "--name", "Beta", "--upstream", "https://mcp.example/mcp",
                              "--owner", "owner@example.com", "--id", "beta-1"))
    assert chosen == "beta-1"
    shown = gw.cli_json("servers", "show", server_id)
    assert shown["server_id"] == server_id and shown["name"] == "Alpha"
    assert shown["owner_email"] == "owner@example.com"
    assert shown["mcp_url"] == f"{gw.url}/mcp/{server_id}"
    listed = {row["server_id"] for row in gw.cli_json("servers", "list")}
    assert {server_id, "beta-1"} <= listed
    human = gw.cli("servers", "list").stdout
    assert server_id in human and "beta-1" in human
    assert gw.cli("servers", "remove", "beta-1").returncode == 0
    assert "beta-1" not in {row["server_id"] for row in gw.cli_json("servers", "list")}
    assert "beta-1" in fails(gw.cli("servers", "remove", "beta-1", check=False))
    assert "beta-1" in fails(gw.cli("servers", "show", "beta-1", check=False))


def test_servers_add_json_and_header_values_stay_secret(gw):
    view = gw.cli_json("servers", "add", "--name", "Headers", "--upstream", "https://mcp.example/mcp",
                       "--owner", "o@example.com", "--header", "Authorization: Bearer sekrit-value")
    assert view["server_id"].startswith("srv_") and view["upstream_headers"] == ["Authorization"]
    for args in (("servers", "show", view["server_id"]), ("--json", "servers", "show", view["server_id"]),
                 ("servers", "list")):
        assert "sekrit-value" not in gw.cli(*args).stdout
    stored = b"".join(p.read_bytes() for p in gw.state_dir.glob("gateway.db*"))
    assert b"sekrit-value" not in stored  # encrypted at rest


def test_json_flag_works_after_the_subcommand_too(gw):
    result = gw.cli("servers", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


@pytest.mark.parametrize("args", [
    ("servers", "add", "--name", "X", "--upstream", "ftp://mcp.example", "--owner", "o@example.com"),
    ("servers", "add", "--name", "X", "--upstream", "https://u:p@mcp.example/", "--owner", "o@example.com"),
    ("servers", "add", "--name", "X", "--upstream", "https://mcp.example/", "--owner", "not-an-email"),
    ("servers", "add", "--name", "X", "--upstream", "https://mcp.example/", "--owner", "o@example.com", "--id", "a"),
    ("servers", "add", "--name", "", "--upstream", "https://mcp.example/", "--owner", "o@example.com"),
    ("servers", "add", "--name", "X", "--upstream", "https://mcp.example/", "--owner", "o@example.com",
     "--header", "Host: evil"),
    ("servers", "add", "--name", "X"),  # missing required options
    ("servers", "frobnicate"),
    ("grants", "add", "srv_missing", "--email", "a@example.com"),
    ("grants", "list", "srv_missing"),
    ("clients", "add", "--name", "C", "--redirect-uri", "http://app.example/cb"),
    ("clients", "add", "--name", "C", "--redirect-uri", "javascript:alert(1)"),
    ("keys", "shred"),
])
def test_failures_exit_non_zero_with_one_line_on_stderr(gw, args):
    assert fails(gw.cli(*args, check=False)).startswith(("error:", "gateway.py"))


@pytest.mark.parametrize("upstream", [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://10.0.0.1/mcp",  # private
    "http://[::1]:8000/mcp",  # IPv6 loopback: 127.0.0.0/8 covers IPv4 only
    "http://0xa9fea9fe/mcp",  # 169.254.169.254 spelled as one hex number
    "http://[::ffff:169.254.169.254]/mcp",  # the same inside IPv6
])
def test_servers_add_and_edit_refuse_upstreams_the_address_guard_refuses(gw, upstream):
    """The allow-list here is 127.0.0.0/8: the CLI refuses what the dashboard and the proxy
    refuse, before anything is stored (finding 19)."""
    before = gw.cli_json("servers", "list")
    line = fails(gw.cli("servers", "add", "--name", "Inside", "--upstream", upstream, "--owner", "o@example.com",
                        check=False), code=1)
    assert "address guard" in line and "refused" in line, line
    assert gw.cli_json("servers", "list") == before  # nothing stored
    server_id = gw.add_server("http://127.0.0.1:9/mcp", "o@example.com", "Loopback is allow-listed")
    line = fails(gw.cli("servers", "edit", server_id, "--upstream", upstream, check=False), code=1)
    assert "address guard" in line, line
    assert gw.cli_json("servers", "show", server_id)["upstream_url"] == "http://127.0.0.1:9/mcp"
    gw.cli("servers", "remove", server_id)


@pytest.mark.parametrize("args, field", [
    (("--name", "x\udc80y"), "name"),  # argv bytes that are not UTF-8 arrive as lone surrogates
    (("--owner", "o\udc80@example.com"), "e-mail"),
    (("--header", "X-Key: \udc80"), "header"),
])
def test_servers_add_refuses_text_that_is_not_unicode(gw, args, field):
    base = {"--name": "Text", "--upstream": "http://127.0.0.1:9/mcp", "--owner": "o@example.com"}
    base.update({args[0]: args[1]})
    argv = [item for pair in base.items() for item in pair]
    env = {**gw.env, "PYTHONUTF8": "1"}
    before = gw.cli_json("servers", "list")
    # Passed as bytes: the child decodes argv with surrogateescape, as a shell would give it.
    result = subprocess.run([sys.executable, str(ROOT / "gateway.py"), "servers", "add",
                             *[a.encode("utf-8", "surrogateescape") for a in argv]],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    line = fails(result, code=1)
    assert field in line, line
    assert gw.cli_json("servers", "list") == before


def test_duplicate_server_id_is_refused(gw):
    args = ("servers", "add", "--name", "Dup", "--upstream", "https://mcp.example/", "--owner", "o@example.com",
            "--id", "dup-1")
    assert last_line(gw.cli(*args)) == "dup-1"
    assert "dup-1" in fails(gw.cli(*args, check=False))


def test_grants_add_list_remove(gw):
    server_id = gw.add_server("https://mcp.example/mcp", "owner@example.com", "Shared")
    gw.cli("grants", "add", server_id, "--email", "Friend@Example.com")
    gw.cli("grants", "add", server_id, "--domain", "@Corp.Example")
    grants = {(g["kind"], g["value"]) for g in gw.cli_json("grants", "list", server_id)}
    assert grants == {("email", "friend@example.com"), ("domain", "corp.example")}
    assert "friend@example.com" in gw.cli("grants", "list", server_id).stdout
    gw.cli("grants", "remove", server_id, "--email", "friend@example.com")
    assert {(g["kind"], g["value"]) for g in gw.cli_json("grants", "list", server_id)} == {("domain", "corp.example")}
    fails(gw.cli("grants", "remove", server_id, "--email", "friend@example.com", check=False))
    fails(gw.cli("grants", "add", server_id, "--domain", "not a domain", check=False))
    fails(gw.cli("grants", "add", server_id, "--email", "x@example.com", "--domain", "example.com", check=False))
    fails(gw.cli("grants", "add", server_id, check=False))


def test_clients_add_public_and_confidential(gw):
    public = gw.cli("clients", "add", "--name", "Desk", "--redirect-uri", "http://127.0.0.1/cb",
                    "--redirect-uri", "claude://callback")
    client_id = last_line(public)
    assert client_id.startswith("static_") and "secret" not in public.stdout
    confidential = gw.cli("clients", "add", "--name", "Web", "--redirect-uri", "https://app.example/cb", "--confidential")
    lines = confidential.stdout.strip().splitlines()
    assert lines[-1].startswith("static_")
    (secret_line,) = [line for line in lines if "secret" in line]
    secret = secret_line.rsplit(" ", 1)[-1]
    assert len(secret) >= 32
    stored = b"".join(p.read_bytes() for p in gw.state_dir.glob("gateway.db*"))
    assert secret.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored
    as_json = gw.cli_json("clients", "add", "--name", "Json", "--redirect-uri", "https://app.example/cb", "--confidential")
    assert as_json["client_id"].startswith("static_") and as_json["client_secret"]
    assert as_json["token_endpoint_auth_method"] == "client_secret_basic"


def test_keys_list_and_rotate(gw):
    before = gw.cli_json("keys", "list")
    active = [k["kid"] for k in before if k["status"] == "active"]
    assert len(active) == 1
    new_kid = last_line(gw.cli("keys", "rotate"))
    after = {k["kid"]: k["status"] for k in gw.cli_json("keys", "list")}
    assert after[new_kid] == "active" and after[active[0]] == "retiring"
    assert new_kid in gw.cli("keys", "list").stdout
    assert gw.cli_json("keys", "rotate")["kid"] not in after


def test_a_bad_setting_stops_the_cli_with_exit_2_and_one_line(tmp_path):
    broken = GatewayProcess(tmp_path / "broken", extra_env={"MCPGW_PUBLIC_URL": "http://gw.example"})
    assert fails(broken.cli("servers", "list", check=False), code=2).startswith("error: MCPGW_PUBLIC_URL:")
    storage = GatewayProcess(tmp_path / "storage", extra_env={"MCPGW_STORAGE": "postgres://db/x"})
    assert "MCPGW_STORAGE" in fails(storage.cli("servers", "list", check=False))


def test_an_unusable_storage_path_is_one_line_not_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    broken = GatewayProcess(tmp_path / "gw", extra_env={"MCPGW_STORAGE": f"sqlite:///{blocker}/sub/gateway.db"})
    assert "storage" in fails(broken.cli("servers", "list", check=False)).lower()


def test_serve_without_an_idp_client_stops_with_one_line(tmp_path):
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"MCPGW_DEV_LOGIN": "0"})
    assert fails(gateway.cli("serve", check=False), code=2).startswith("error: MCPGW_OIDC_CLIENT_ID:")
