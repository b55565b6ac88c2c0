"""`gateway.py doctor` (issue 9) against real peers: a gateway's configuration and SQLite
file, the real OIDC provider process, the real MCP upstream; each fault gives its FAIL line
and a non-zero exit; clock skew is checked by handing the doctor a clock."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from config import Config
from services import build_services
from services.ops.doctor import FAIL, OK, SKIP, WARN, Doctor
from tests.support.gateway import ROOT, GatewayProcess
from tests.support.ports import HeldPort

OWNER = "doctor.owner@example.com"


def doctor(env: dict[str, str], *args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "gateway.py"), *args, "doctor"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec_fn)


def lines(result: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail), from the human output."""
    found = {}
    for line in result.stdout.splitlines()[:-1]:
        status, _, rest = line.partition("  ")
        name, _, detail = rest.strip().partition(": ")
        found[name] = (status.strip(), detail)
    return found


def test_all_ok_with_real_idp_and_upstream(gateway, upstream):
    """A serving gateway's configuration, the real IdP and a real MCP upstream: every check
    ok, exit 0; --json says the same."""
    server_id = gateway.add_server(upstream.url, OWNER)
    result = doctor(gateway.env)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines(result)
    for name in ("public url", "config", "secrets", "storage", "schema", "storage write", "master secret",
                 "idp discovery", "idp keys", "clock", f"upstream {server_id}"):
        assert checks[name][0] == OK, (name, checks[name])
    assert {status for status, _ in checks.values()} == {OK}, result.stdout
    assert checks["schema"][1].endswith("(current)")
    assert "Traceback" not in result.stderr

    report = json.loads(doctor(gateway.env, "--json").stdout)
    assert report["ok"] is True
    assert {c["status"] for c in report["checks"]} == {OK}


def test_idp_down_fails(tmp_path, idp):
    """The issuer's port refuses connections: FAIL on discovery, exit 1, the rest still
    checked (storage ok)."""
    gw = GatewayProcess(tmp_path / "gw", idp=idp)
    with HeldPort() as down:
        gw.env.update(MCPGW_OIDC_ISSUER=down.url, MCPGW_OIDC_CLIENT_ID="c", MCPGW_OIDC_CLIENT_SECRET="s")
        result = doctor(gw.env)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines(result)
    assert checks["idp discovery"][0] == FAIL
    assert "unreachable" in checks["idp discovery"][1] or "closed the connection" in checks["idp discovery"][1]
    assert checks["clock"][0] == SKIP
    assert checks["storage write"][0] == OK
    assert result.stdout.splitlines()[-1].startswith("FAILED")
    assert "Traceback" not in result.stderr


def test_upstream_on_forbidden_address_fails(tmp_path, upstream):
    """An upstream registered while loopback was allow-listed: ok through the guard with the
    allow-list, FAIL (refused by the SSRF guard, a loopback address) once it is gone."""
    gw = GatewayProcess(tmp_path / "gw")  # dev sign-in; CLI only
    gw.state_dir.mkdir(parents=True)
    server_id = gw.add_server(upstream.url, OWNER)
    allowed = doctor(gw.env)
    assert allowed.returncode == 0, allowed.stdout
    assert lines(allowed)[f"upstream {server_id}"][0] == OK

    refused = doctor({**gw.env, "MCPGW_UPSTREAM_ALLOW": ""})
    assert refused.returncode == 1, refused.stdout
    status, detail = lines(refused)[f"upstream {server_id}"]
    assert status == FAIL
    assert "refused by the SSRF guard" in detail and "loopback" in detail


def test_another_master_secret_fails(tmp_path, upstream):
    """The storage was made with one master secret, the doctor runs with another: FAIL on
    the signing key and on the server's sealed upstream headers."""
    gw = GatewayProcess(tmp_path / "gw")
    gw.state_dir.mkdir(parents=True)
    server_id = gw.add_server(upstream.url, OWNER, "Sealed", "--header", "X-Api-Key: k")
    assert doctor(gw.env).returncode == 0
    result = doctor({**gw.env, "MCPGW_SECRET_KEY": "another-master-secret-of-enough-length-0123"})
    assert result.returncode == 1
    checks = lines(result)
    assert checks["master secret"][0] == FAIL and "another MCPGW_SECRET_KEY" in checks["master secret"][1]
    assert checks[f"upstream {server_id}"][0] == FAIL
    assert "do not decrypt" in checks[f"upstream {server_id}"][1]


def _without_dac_override() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the child's bounding set before
    exec: root then meets the permission bits like the service user would."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unwritable_storage_directory_fails(tmp_path):
    """The state directory (and the database in it) cannot be written by the doctor's
    process: a storage FAIL line, exit 1."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux capabilities to make root meet permission bits")
    gw = GatewayProcess(tmp_path / "gw")
    gw.state_dir.mkdir(parents=True)
    assert doctor(gw.env).returncode == 0  # creates the database and secret.key
    privileged = os.geteuid() == 0
    os.chmod(gw.state_dir / "gateway.db", 0o400)
    os.chmod(gw.state_dir, 0o500)
    try:
        result = doctor(gw.env, preexec_fn=_without_dac_override if privileged else None)
    finally:
        os.chmod(gw.state_dir, 0o700)
        os.chmod(gw.state_dir / "gateway.db", 0o600)
    assert result.returncode == 1, result.stdout + result.stderr
    status, detail = lines(result)["storage"]
    assert status == FAIL and "cannot open" in detail and "not writable by this user" in detail, result.stdout
    assert lines(result)["upstreams"][0] == SKIP
    assert "Traceback" not in result.stderr


def test_http_public_url_fails(tmp_path, idp):
    """A public URL on plain http off loopback: FAIL saying why, exit 1; the same host on
    https passes that check."""
    gw = GatewayProcess(tmp_path / "gw", idp=idp)
    gw.env.update(MCPGW_OIDC_CLIENT_ID="c", MCPGW_OIDC_CLIENT_SECRET="s")
    plain = doctor({**gw.env, "MCPGW_PUBLIC_URL": "http://gateway.example.com"})
    assert plain.returncode == 1
    status, detail = lines(plain)["public url"]
    assert status == FAIL and "not https" in detail and "unencrypted" in detail
    assert "Traceback" not in plain.stderr

    tls = doctor({**gw.env, "MCPGW_PUBLIC_URL": "https://gateway.example.com"})
    assert lines(tls)["public url"][0] == OK


@pytest.mark.parametrize(("offset", "status", "words"), [
    (0, OK, ""),
    (45, WARN, "ahead of the identity provider"),
    (-45, WARN, "behind the identity provider"),
    (90, FAIL, "beyond the 60 s leeway"),
    (-90, FAIL, "beyond the 60 s leeway"),
])
def test_clock_skew_against_the_idps_date(tmp_path, idp, offset, status, words):
    """The doctor's clock moved against the real IdP's Date header: ok within 30 s, warn up
    to the 60 s ID-token leeway, FAIL beyond it."""
    gw = GatewayProcess(tmp_path / "gw", idp=idp)
    env = {**gw.env, "MCPGW_OIDC_CLIENT_ID": "c", "MCPGW_OIDC_CLIENT_SECRET": "s"}

    async def skew_check():
        services = build_services(Config.from_env(env))
        try:
            checks = await Doctor(services, clock=lambda: time.time() + offset).identity_provider()
        finally:
            await services.stop()
        return {c.name: c for c in checks}

    checks = asyncio.run(skew_check())
    assert checks["idp keys"].status == OK
    assert checks["clock"].status == status, checks["clock"]
    if offset:
        assert words in checks["clock"].detail


def test_dynamodb_table_checked(tmp_path, dynamodb_endpoint):
    """On DynamoDB (moto as a real server): the table opens ACTIVE with its indexes and a
    probe record is written and read back, exit 0; an endpoint with nothing behind it FAILs."""
    gw = GatewayProcess(tmp_path / "gw")
    gw.env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                  MCPGW_STORAGE=f"dynamodb://doctor-{secrets.token_hex(4)}?region=us-east-1&endpoint={dynamodb_endpoint}")
    gw.env.pop("AWS_SESSION_TOKEN", None)
    gw.env.pop("AWS_PROFILE", None)
    result = doctor(gw.env)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines(result)
    assert checks["dynamodb table"][0] == OK and "ACTIVE" in checks["dynamodb table"][1]
    assert checks["storage write"][0] == OK

    with HeldPort() as held:
        down = doctor({**gw.env, "MCPGW_STORAGE": f"dynamodb://doctor?region=us-east-1&endpoint={held.url}"})
    assert down.returncode == 1
    assert lines(down)["storage"][0] == FAIL
    assert "Traceback" not in down.stderr
