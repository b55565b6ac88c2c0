"""The owner's side of connected accounts (issue 11) with real processes: `servers add|edit|show|test`
with --upstream-auth oauth, `connections list|remove`, the dashboard's server form and page, and
upstream credentials deleted when a user loses access, against the SDK-built OAuth upstream."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from config import Config
from services.authserver.keys import SecretBox
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream_auth.clients import UpstreamAuthSettings
from services.proxy.upstream_auth.sealing import TokenSet, seal_tokens
from services.proxy.upstream_auth.service import UpstreamAuth
from storage import open_storage
from storage.base import RefreshFamily, RefreshToken, Storage, User
from storage.upstream_auth import UpstreamCredential
from tests.support.dashboard_client import api, post, sign_in
from tests.support.gateway import GatewayProcess
from tests.support.oauth_upstream import OAuthUpstream

SECRET = "k" * 40
CLIENT_SECRET = "gw-static-secret-Zq81xTT0pR"  # must never be printed or stored in clear
OWNER = "owner@example.org"


@pytest.fixture(scope="module")
def upstream():
    process = OAuthUpstream().wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    # The dashboard's owners are administrators: only they may register a loopback upstream.
    gateway = GatewayProcess(tmp_path_factory.mktemp("gw"), extra_env={
        "MCPGW_SECRET_KEY": SECRET, "MCPGW_ADMIN_EMAILS": "dash-owner@example.org,probe-owner@example.org"}).start()
    yield gateway
    gateway.stop()


def in_storage(gw: GatewayProcess, scenario):
    """Run `scenario(storage, box)` against the gateway's own SQLite file and master secret."""

    async def main():
        config = Config.from_env(gw.env)
        storage = open_storage(config.storage_url)
        await storage.open()
        try:
            return await scenario(storage, SecretBox(config.secret_key))
        finally:
            await storage.close()

    return asyncio.run(main())


def seed_credential(storage: Storage, box, sub: str, server_id: str, issuer: str, subject: str = "") -> UpstreamCredential:
    credential = UpstreamCredential(sub, server_id, issuer, seal_tokens(box, sub, server_id, issuer,
                                                                        TokenSet(f"at-{sub}", f"rt-{sub}")),
                                    expires_at=time.time() + 3600, scope="mcp", upstream_subject=subject,
                                    updated_at=time.time())
    return credential


async def put_users_and_credentials(storage: Storage, box, server_id: str, issuer: str, users: dict[str, str]):
    for sub, email in users.items():
        await storage.upsert_user(User(sub, email, True, email.split("@")[1] if email.endswith("@corp.org") else "",
                                       created_at=time.time(), last_login_at=time.time()))
        await storage.upstream_auth.put_credential(seed_credential(storage, box, sub, server_id, issuer, f"up-{sub}"))


def credential_holders(gw: GatewayProcess, server_id: str) -> set[str]:
    async def scenario(storage, box):
        return {c.user_sub for c in await storage.upstream_auth.credentials_of_server(server_id)}

    return in_storage(gw, scenario)


def database_bytes(gw: GatewayProcess) -> bytes:
    return b"".join(p.read_bytes() for p in gw.state_dir.glob("gateway.db*"))


# --------------------------------------------------------------------------- CLI


def test_cli_registers_an_oauth_server_shows_its_redirect_uri_and_authorization_server_never_the_secret(
    gw: GatewayProcess, upstream: OAuthUpstream, tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    added = gw.cli("servers", "add", "--name", "Static", "--upstream", upstream.mcp_url, "--owner", OWNER,
                   "--id", "srv_static", "--upstream-auth", "oauth", "--upstream-client-id", "gw-static",
                   "--upstream-client-secret-file", str(secret_file), "--upstream-scope", "mcp  read",
                   "--upstream-audience", "https://api.example.org", "--no-upstream-resource")
    assert f"upstream redirect URI: {gw.url}/oauth/upstream/callback" in added.stdout
    assert f"upstream authorization server: {upstream.issuer}" in added.stdout
    assert "warning" not in added.stderr
    shown = gw.cli_json("servers", "show", "srv_static")
    assert shown["upstream_auth"] == "oauth"
    assert (shown["upstream_client_id"], shown["upstream_scope"], shown["upstream_audience"]) == (
        "gw-static", "mcp read", "https://api.example.org")
    assert shown["upstream_send_resource"] is False
    assert shown["upstream_client_secret"] == "set" and "upstream_client_secret_enc" not in shown
    assert shown["upstream_authorization"]["redirect_uri"] == f"{gw.url}/oauth/upstream/callback"
    assert shown["upstream_authorization"]["authorization_server"].rstrip("/") == upstream.issuer
    assert shown["upstream_authorization"]["client"] == "static"
    outputs = [added, gw.cli("servers", "show", "srv_static"), gw.cli("servers", "list"),
               gw.cli("--json", "servers", "list")]
    for out in outputs:
        assert CLIENT_SECRET not in out.stdout + out.stderr
    assert CLIENT_SECRET.encode() not in database_bytes(gw)

    async def sealed(storage, box):  # sealed for this server: the proxy's settings open it
        return UpstreamAuthSettings.of(await storage.get_server("srv_static"), box)

    settings = in_storage(gw, sealed)
    assert (settings.client_id, settings.client_secret, settings.send_resource) == ("gw-static", CLIENT_SECRET, False)


def test_cli_edit_switches_upstream_auth_and_refuses_bad_or_inconsistent_settings(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    gw.cli("servers", "add", "--name", "Edit me", "--upstream", upstream.mcp_url, "--owner", OWNER, "--id", "srv_edit",
           "--header", "Authorization: Bearer shared-token")
    refused = gw.cli("servers", "edit", "srv_edit", "--upstream-auth", "oauth", check=False)
    assert refused.returncode == 1 and "remove the static Authorization header" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert gw.cli_json("servers", "show", "srv_edit")["upstream_auth"] == "none"
    edited = gw.cli("servers", "edit", "srv_edit", "--clear-headers", "--upstream-auth", "oauth",
                    "--upstream-scope", "mcp")
    assert f"upstream authorization server: {upstream.issuer}" in edited.stdout
    shown = gw.cli_json("servers", "show", "srv_edit")
    assert (shown["upstream_auth"], shown["upstream_scope"], shown["upstream_send_resource"]) == ("oauth", "mcp", True)
    for args, message in [
        (["--upstream-scope", 'bad"scope'], "scope names separated by spaces"),
        (["--upstream-client-secret", "s3cret"], "needs the client ID"),
        (["--upstream-issuer", "ftp://as.example.org"], "http(s) issuer URL"),
        (["--header", "Authorization: Bearer again"], "remove the static Authorization header"),
    ]:
        out = gw.cli("servers", "edit", "srv_edit", *args, check=False)
        assert out.returncode == 1 and message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    out = gw.cli("servers", "add", "--name", "x", "--upstream", upstream.mcp_url, "--owner", OWNER,
                 "--upstream-client-id", "c", check=False)
    assert out.returncode == 1 and "need --upstream-auth oauth" in out.stderr
    out = gw.cli("servers", "add", "--name", "x", "--upstream", upstream.mcp_url, "--owner", OWNER,
                 "--upstream-auth", "oauth", "--upstream-client-secret-file", "/nonexistent/secret", check=False)
    assert out.returncode == 1 and "cannot read --upstream-client-secret-file" in out.stderr
    back = gw.cli("servers", "edit", "srv_edit", "--upstream-auth", "none")
    assert "upstream authorization server" not in back.stdout
    assert gw.cli_json("servers", "show", "srv_edit")["upstream_auth"] == "none"


def test_turning_upstream_auth_off_deletes_the_users_upstream_credentials(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    gw.cli("servers", "add", "--name", "Off", "--upstream", upstream.mcp_url, "--owner", OWNER, "--id", "srv_off",
           "--upstream-auth", "oauth")

    async def seed(storage, box):
        await put_users_and_credentials(storage, box, "srv_off", upstream.issuer, {"u-off": "off@example.org"})

    in_storage(gw, seed)
    assert credential_holders(gw, "srv_off") == {"u-off"}
    gw.cli("servers", "edit", "srv_off", "--name", "Still oauth")
    assert credential_holders(gw, "srv_off") == {"u-off"}
    gw.cli("servers", "edit", "srv_off", "--upstream-auth", "none")
    assert credential_holders(gw, "srv_off") == set()


def test_registration_while_the_authorization_server_is_down_warns_and_keeps_the_server(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    upstream.stop_as()
    try:
        out = gw.cli("servers", "add", "--name", "AS down", "--upstream", upstream.mcp_url, "--owner", OWNER,
                     "--id", "srv_asdown", "--upstream-auth", "oauth")
        assert out.returncode == 0
        assert re.search(r"warning: the upstream's authorization server could not be discovered \(.+\)", out.stderr)
        assert "the server is saved" in out.stderr and "Traceback" not in out.stderr
        assert gw.cli_json("servers", "show", "srv_asdown")["upstream_auth"] == "oauth"
        test = gw.cli("servers", "test", "srv_asdown")
        assert test.returncode == 0 and "needs a user account" in test.stdout
    finally:
        upstream.start_as()
        upstream.wait_ready()
    shown = gw.cli("servers", "show", "srv_asdown")
    assert f"upstream authorization server: {upstream.issuer}" in shown.stdout and "warning" not in shown.stderr


def test_test_connection_of_an_oauth_server_says_it_needs_a_user_account(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    gw.cli("servers", "add", "--name", "Probe", "--upstream", upstream.mcp_url, "--owner", OWNER, "--id", "srv_probe",
           "--upstream-auth", "oauth")
    out = gw.cli("servers", "test", "srv_probe")
    assert out.returncode == 0
    assert out.stdout.startswith("needs a user account:") and upstream.issuer in out.stdout
    result = gw.cli_json("servers", "test", "srv_probe")
    assert result["needs_account"] is True and result["ok"] is False
    assert result["authorization_server"].rstrip("/") == upstream.issuer
    # Without oauth the same upstream's 401 is a failure (exit 1): the difference is the setting.
    gw.cli("servers", "edit", "srv_probe", "--upstream-auth", "none")
    failed = gw.cli("servers", "test", "srv_probe", check=False)
    assert failed.returncode == 1 and failed.stdout.startswith("failed:")


def test_an_authorization_server_on_another_host_is_shown(gw: GatewayProcess, upstream: OAuthUpstream) -> None:
    # The owner names the AS (127.0.0.1) of an upstream reached as localhost: another host.
    local = upstream.mcp_url.replace("127.0.0.1", "localhost")
    out = gw.cli("servers", "add", "--name", "Foreign", "--upstream", local, "--owner", OWNER, "--id", "srv_foreign",
                 "--upstream-auth", "oauth", "--upstream-issuer", upstream.issuer)
    assert "the authorization server is on another host (127.0.0.1) than the upstream" in out.stdout
    assert gw.cli_json("servers", "show", "srv_foreign")["upstream_authorization"][
        "foreign_authorization_server"] == "127.0.0.1"
    admin = sign_in(gw, "dash-owner@example.org")
    form = admin.get("/dashboard/servers/srv_foreign/edit").text
    assert re.search(r'data-testid="upstream-foreign-as">The authorization server is on another host than the '
                     r'upstream: <code>127\.0\.0\.1</code>', form)
    assert 'data-testid="server-foreign-as"' in admin.get("/dashboard/servers/srv_foreign").text


def test_the_json_api_sets_upstream_auth_and_never_returns_the_secret(gw: GatewayProcess, upstream: OAuthUpstream):
    owner = sign_in(gw, "dash-owner@example.org")
    created = api(owner, "POST", "/api/servers", {"name": "Api", "upstream_url": upstream.mcp_url,
                                                  "upstream_auth": "oauth", "upstream_client_id": "api-client",
                                                  "upstream_client_secret": CLIENT_SECRET,
                                                  "upstream_send_resource": False})
    assert created.status_code == 201, created.text
    server_id = created.json()["server_id"]
    found = created.json()["upstream_auth"]
    assert (found["mode"], found["client_id"], found["client_secret_set"], found["send_resource"]) == (
        "oauth", "api-client", True, False)
    assert found["redirect_uri"] == f"{gw.url}/oauth/upstream/callback"
    assert CLIENT_SECRET not in created.text
    bad = api(owner, "PATCH", f"/api/servers/{server_id}", {"upstream_auth": "saml"})
    assert bad.status_code == 400 and "must be none or oauth" in bad.text
    off = api(owner, "PATCH", f"/api/servers/{server_id}", {"upstream_auth": "none"})
    assert off.status_code == 200 and off.json()["upstream_auth"] == {"mode": "none"}


# ------------------------------------------------------------------- access removal


def test_removing_a_grant_deletes_exactly_the_credentials_of_users_who_lost_access(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    gw.cli("servers", "add", "--name", "Shared", "--upstream", upstream.mcp_url, "--owner", OWNER, "--id", "srv_shared",
           "--upstream-auth", "oauth")
    gw.cli("servers", "add", "--name", "Other", "--upstream", upstream.mcp_url, "--owner", OWNER, "--id", "srv_other",
           "--upstream-auth", "oauth")
    for kind, value in [("--email", "alice@example.org"), ("--domain", "corp.org"), ("--email", "carol@corp.org")]:
        gw.cli("grants", "add", "srv_shared", kind, value)
    gw.cli("grants", "add", "srv_other", "--email", "alice@example.org")
    users = {"u-alice": "alice@example.org", "u-bob": "bob@corp.org", "u-carol": "carol@corp.org", "u-owner": OWNER}

    async def seed(storage, box):
        await put_users_and_credentials(storage, box, "srv_shared", upstream.issuer, users)
        await storage.upstream_auth.put_credential(seed_credential(storage, box, "u-alice", "srv_other", upstream.issuer))
        await storage.bind_owner(OWNER, "u-owner")

    in_storage(gw, seed)
    assert credential_holders(gw, "srv_shared") == set(users)
    removed = gw.cli("grants", "remove", "srv_shared", "--email", "alice@example.org")
    assert credential_holders(gw, "srv_shared") == {"u-bob", "u-carol", "u-owner"}
    assert removed.stderr.count("connected accounts deleted with the users' access") == 1  # a security event
    assert credential_holders(gw, "srv_other") == {"u-alice"}  # her other server is untouched
    gw.cli("grants", "remove", "srv_shared", "--domain", "corp.org")
    assert credential_holders(gw, "srv_shared") == {"u-carol", "u-owner"}  # carol keeps her own grant
    gw.cli("servers", "remove", "srv_shared")
    assert credential_holders(gw, "srv_shared") == set()
    assert credential_holders(gw, "srv_other") == {"u-alice"}


def test_revoking_a_users_authorization_deletes_their_credential_for_that_server_only(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    for server_id in ("srv_rv1", "srv_rv2"):
        gw.cli("servers", "add", "--name", server_id, "--upstream", upstream.mcp_url, "--owner", OWNER,
               "--id", server_id, "--upstream-auth", "oauth")
        gw.cli("grants", "add", server_id, "--email", "dana@example.org")
    now = time.time()

    async def seed(storage, box):
        await put_users_and_credentials(storage, box, "srv_rv1", upstream.issuer, {"u-dana": "dana@example.org"})
        await storage.upstream_auth.put_credential(seed_credential(storage, box, "u-dana", "srv_rv2", upstream.issuer))
        for family_id, client_id, server_id in (("fam-1", "client-a", "srv_rv1"), ("fam-2", "client-b", "srv_rv2")):
            audience = f"{gw.url}/mcp/{server_id}"
            await storage.create_family(
                RefreshFamily(family_id, client_id, "u-dana", audience, "mcp", now, now + 3600),
                RefreshToken(f"hash-{family_id}", family_id, client_id, "u-dana", "mcp", audience, now, now + 3600,
                             now + 3600))

    in_storage(gw, seed)
    out = gw.cli("authorizations", "revoke", "--user", "dana@example.org", "--client", "client-a")
    assert "revoked client-a" in out.stdout
    assert credential_holders(gw, "srv_rv1") == set()
    assert credential_holders(gw, "srv_rv2") == {"u-dana"}  # still authorized through client-b


def test_connections_list_shows_servers_and_upstream_identities_never_tokens_and_remove_disconnects(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    gw.cli("servers", "add", "--name", "Conn", "--upstream", upstream.mcp_url, "--owner", OWNER, "--id", "srv_conn",
           "--upstream-auth", "oauth")

    async def seed(storage, box):
        await put_users_and_credentials(storage, box, "srv_conn", upstream.issuer, {"u-erin": "erin@example.org"})
        return (await storage.upstream_auth.get_credential("u-erin", "srv_conn")).token_enc

    sealed = in_storage(gw, seed)
    listed = gw.cli("connections", "list", "--user", "erin@example.org")
    assert listed.stdout.startswith(f"srv_conn\t{upstream.issuer}\tup-u-erin\texpires ")
    rows = gw.cli_json("connections", "list", "--user", "u-erin")
    assert [(r["server_id"], r["issuer"], r["upstream_subject"]) for r in rows] == [
        ("srv_conn", upstream.issuer, "up-u-erin")]
    for out in (listed.stdout, str(rows)):
        assert "at-u-erin" not in out and "rt-u-erin" not in out and sealed not in out
    removed = gw.cli("connections", "remove", "--user", "erin@example.org", "--server", "srv_conn")
    assert removed.stdout.strip() == "disconnected erin@example.org from srv_conn"
    assert credential_holders(gw, "srv_conn") == set()
    again = gw.cli("connections", "remove", "--user", "erin@example.org", "--server", "srv_conn", check=False)
    assert again.returncode == 1 and "has no connected account for srv_conn" in again.stderr
    nobody = gw.cli("connections", "list", "--user", "nobody@example.org", check=False)
    assert nobody.returncode == 1 and "nobody has signed in as nobody@example.org" in nobody.stderr


# ------------------------------------------------------------------- dashboard


def form_values(html: str) -> dict[str, str]:
    return dict(re.findall(r'name="([a-z_]+)"[^>]*?value="([^"]*)"', html))


def test_dashboard_server_form_round_trip(gw: GatewayProcess, upstream: OAuthUpstream) -> None:
    owner = sign_in(gw, "dash-owner@example.org")
    new = owner.get("/dashboard/servers/new")
    assert f"{gw.url}/oauth/upstream/callback" in new.text and 'value="oauth"' in new.text
    fields = {"name": "Dash", "upstream_url": upstream.mcp_url, "upstream_auth": "oauth",
              "upstream_client_id": "dash-client", "upstream_client_secret": CLIENT_SECRET,
              "upstream_scope": 'no"quotes', "upstream_resource": "omit"}
    refused = post(owner, "/dashboard/servers", **fields)
    assert refused.status_code == 400 and "scope names separated by spaces" in refused.text
    assert CLIENT_SECRET not in refused.text  # a password field is never filled in again
    assert form_values(refused.text)["upstream_client_id"] == "dash-client"
    created = post(owner, "/dashboard/servers", **{**fields, "upstream_scope": "mcp"})
    assert created.status_code == 302, created.text
    page_path = created.headers["location"].split("?")[0]
    server_id = page_path.rsplit("/", 1)[1]
    page = owner.get(page_path).text
    assert "each user connects their own account" in page and upstream.issuer in page
    assert re.search(r'data-testid="server-connected-users">0<', page)

    async def seed_and_read(storage, box):
        user = (await storage.users_matching("email", "dash-owner@example.org"))[0]
        await storage.upstream_auth.put_credential(seed_credential(storage, box, "u-dash-1", server_id, upstream.issuer))
        return user.sub, UpstreamAuthSettings.of(await storage.get_server(server_id), box)

    _, settings = in_storage(gw, seed_and_read)
    assert (settings.client_id, settings.client_secret, settings.scope, settings.send_resource) == (
        "dash-client", CLIENT_SECRET, "mcp", False)
    page = owner.get(page_path).text
    assert re.search(r'data-testid="server-connected-users">1<', page)
    edit = owner.get(page_path + "/edit").text
    assert CLIENT_SECRET not in edit and "A secret is set; leave empty to keep it." in edit
    values = form_values(edit)
    assert (values["upstream_client_id"], values["upstream_scope"]) == ("dash-client", "mcp")
    assert re.search(r'<option value="omit" selected>', edit)
    saved = post(owner, page_path + "/edit", name="Dash 2", upstream_url=upstream.mcp_url, upstream_auth="oauth",
                 upstream_client_id="dash-client", upstream_client_secret="", upstream_scope="mcp extra",
                 upstream_audience="", upstream_issuer="", upstream_resource="send")
    assert saved.status_code == 302, saved.text
    _, settings = in_storage(gw, seed_and_read)
    assert (settings.client_secret, settings.scope, settings.send_resource) == (CLIENT_SECRET, "mcp extra", True)
    cleared = post(owner, page_path + "/edit", name="Dash 2", upstream_url=upstream.mcp_url, upstream_auth="oauth",
                   upstream_client_id="", clear_upstream_client_secret="1", upstream_resource="send")
    assert cleared.status_code == 302, cleared.text
    _, settings = in_storage(gw, seed_and_read)
    assert (settings.client_id, settings.client_secret) == ("", "")
    probe = post(owner, page_path + "/test")
    assert probe.status_code == 200
    assert "The upstream needs a user account" in probe.text and 'data-testid="probe-needs-account"' in probe.text
    api = owner.get(f"/api/servers/{server_id}").json()
    assert api["upstream_auth"]["mode"] == "oauth" and api["upstream_auth"]["connected_users"] == 1
    assert "client_secret" not in str(api).replace("client_secret_set", "")


def test_test_connection_with_the_owners_own_connected_account_lists_the_tools(
    gw: GatewayProcess, upstream: OAuthUpstream,
) -> None:
    """The owner connected their own account (the browser trip, in this process against the
    gateway's storage): Test connection then speaks MCP to the upstream with that account."""
    owner = sign_in(gw, "probe-owner@example.org")
    created = post(owner, "/dashboard/servers", name="Own", upstream_url=upstream.mcp_url, upstream_auth="oauth")
    assert created.status_code == 302, created.text
    page_path = created.headers["location"].split("?")[0]
    server_id = page_path.rsplit("/", 1)[1]

    async def connect(storage, box):
        sub = (await storage.users_matching("email", "probe-owner@example.org"))[0].sub
        server = await storage.get_server(server_id)
        svc = UpstreamAuth(storage, box, AddressPolicy(["127.0.0.0/8"]), gw.url)
        try:
            url = await svc.begin(sub, server, browser="b")
            async with httpx.AsyncClient(trust_env=False) as browser:
                await browser.get(f"{upstream.issuer}/signin", params={"user": "owner-at-upstream"})
                answer = await browser.get(url)
            params = dict(parse_qsl(urlsplit(answer.headers["location"]).query))

            async def server_of(_):
                return server

            await svc.complete(params, sub, "b", server_of)
        finally:
            svc.close()

    in_storage(gw, connect)
    probe = post(owner, page_path + "/test")
    assert 'data-ok="true"' in probe.text, probe.text
    assert "<code>whoami</code>" in probe.text
