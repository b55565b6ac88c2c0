"""`gateway.py backup PATH` (issue 9) while a real gateway process serves MCP calls and
writes their usage: the copy is private, passes integrity_check and holds what was written
before it began; the copy is one snapshot (never restarted by the gateway's commits); an
existing file is kept without --force; a restored copy serves a token issued before it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from storage.sqlite.backup import BackupError, backup_database
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import access_token, register_public_client

OWNER = {"sub": "backup-owner", "email": "backup.owner@example.com"}
SERVER = "srv_backup"


@dataclass
class Rig:
    gateway: GatewayProcess
    token: str
    session: str = ""  # the gateway's Mcp-Session-Id (the upstream is the stateful MCP server)
    calls: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.gateway.state_dir / "gateway.db"

    def post(self, message: dict) -> httpx.Response:
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
                   "MCP-Protocol-Version": "2025-11-25", "Authorization": f"Bearer {self.token}"}
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        with httpx.Client(trust_env=False, timeout=30) as http:
            return http.post(f"{self.gateway.listen_url}/mcp/{SERVER}", headers=headers,
                             content=json.dumps(message))

    def open_session(self) -> None:
        self.session = ""
        response = self.post(rpc("initialize", 1, protocolVersion="2025-11-25", capabilities={},
                                 clientInfo={"name": "backup-test", "version": "1"}))
        assert response.status_code == 200, response.text
        self.session = response.headers["mcp-session-id"]
        assert self.post(rpc("notifications/initialized", None)).status_code == 202

    def call(self, text: str) -> httpx.Response:
        return self.post(rpc("tools/call", 1, name="echo", arguments={"text": text}))


def start_rig(state_dir: Path, upstream_url: str) -> Rig:
    gateway = GatewayProcess(state_dir).start()  # dev sign-in
    gateway.add_server(upstream_url, OWNER["email"], "Backup", "--id", SERVER)

    async def token() -> str:
        async with httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=20) as http:
            client_id = await register_public_client(http, "Backup")
            async with ScriptedBrowser() as browser:
                return await access_token(gateway.url, http, browser, client_id, OWNER)

    rig = Rig(gateway, asyncio.run(token()))
    rig.open_session()
    return rig


class Writer:
    """MCP calls in a loop on a thread: each call's usage record is written by the gateway."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            response = self.rig.call(f"call {self.rig.calls}")
            if response.status_code != 200 or "echo: call" not in response.text:
                self.rig.failures.append(f"{response.status_code} {response.text[:200]}")
            self.rig.calls += 1

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def usage_ids(db: Path) -> set[int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM usage_events")}


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def integrity(path: Path) -> str:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, upstream):
    rig = start_rig(tmp_path_factory.mktemp("backup") / "gw", upstream.url)
    yield rig
    rig.gateway.stop()


def test_cli_backup_while_serving(rig, tmp_path):
    """Calls keep flowing (and being recorded) while `gateway.py backup` copies: exit 0, a
    0600 file that passes integrity_check and holds every usage row written before the
    backup began, the servers and the signing keys; no call failed."""
    target = tmp_path / "copy.db"
    with Writer(rig):
        wait_for(lambda: len(usage_ids(rig.db)) >= 5, "usage rows from the calls")
        before = usage_ids(rig.db)
        result = rig.gateway.cli("--json", "backup", str(target), check=False)
        calls_at_backup_end = rig.calls
        wait_for(lambda: rig.calls > calls_at_backup_end + 3, "calls after the backup")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"] == str(target) and report["integrity"] == "ok"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert integrity(target) == "ok"
    assert before <= usage_ids(target)
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT server_id FROM servers").fetchall() == [(SERVER,)]
        assert copy.execute("SELECT count(*) FROM signing_keys").fetchone()[0] >= 1
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
    assert sorted(os.listdir(tmp_path)) == ["copy.db"]  # no temp file left behind
    assert rig.failures == []


def test_existing_file_is_kept_without_force(rig, tmp_path):
    """A second backup to the same path: exit 1 and a one-line refusal naming --force, the
    first copy untouched; with --force it is replaced by a newer copy."""
    target = tmp_path / "copy.db"
    rig.gateway.cli("backup", str(target))
    first, first_max = digest(target), max(usage_ids(target), default=0)
    wait_for(lambda: rig.call("more").status_code == 200 and max(usage_ids(rig.db)) > first_max,
             "a usage row newer than the first copy")

    refused = rig.gateway.cli("backup", str(target), check=False)
    assert refused.returncode == 1
    assert "exists" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
    assert digest(target) == first
    assert sorted(os.listdir(tmp_path)) == ["copy.db"]

    forced = rig.gateway.cli("backup", "--force", str(target), check=False)
    assert forced.returncode == 0, forced.stderr
    assert max(usage_ids(target)) > first_max
    assert digest(target) != first
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_copy_is_one_snapshot_despite_commits_between_steps(rig, tmp_path):
    """One page per step; after the first step the test waits until the serving gateway has
    committed a new usage row. The copy is not restarted (the remaining page count falls
    at every step) and holds the database as it was when it began: the rows before, not that one."""
    steps: list[int] = []
    committed_during: list[int] = []
    start_max = max(usage_ids(rig.db), default=0)

    def on_step(remaining: int, _total: int) -> None:
        if not steps:
            wait_for(lambda: max(usage_ids(rig.db), default=0) > start_max, "a commit by the gateway")
            committed_during.append(max(usage_ids(rig.db)))
        steps.append(remaining)

    with Writer(rig):
        result = backup_database(str(rig.db), str(tmp_path / "stepped.db"), pages=1, pause=0, on_step=on_step)
    restarts = sum(later >= earlier for earlier, later in zip(steps, steps[1:], strict=False))
    assert restarts == 0, steps
    assert len(steps) == result.pages > 1
    copied = usage_ids(tmp_path / "stepped.db")
    assert max(copied, default=0) >= start_max
    assert committed_during[0] not in copied
    assert integrity(tmp_path / "stepped.db") == "ok"
    assert rig.failures == []


def test_refusals_name_the_problem(rig, tmp_path):
    """No copy, and a sentence saying why: the live database itself, a directory, a missing
    directory, a missing source."""
    cases = [
        ((str(rig.db), str(rig.db)), {"force": True}, "live database itself"),
        ((str(rig.db), str(tmp_path)), {}, "is a directory"),
        ((str(rig.db), str(tmp_path / "nowhere" / "copy.db")), {}, "does not exist"),
        ((str(tmp_path / "missing.db"), str(tmp_path / "copy.db")), {}, "no database at"),
    ]
    for args, kwargs, words in cases:
        with pytest.raises(BackupError, match=words):
            backup_database(*args, **kwargs)
    assert os.listdir(tmp_path) == []


def test_dynamodb_points_to_its_own_backups(tmp_path):
    """On DynamoDB: exit 1, a message naming point-in-time recovery and on-demand backup,
    no traceback, no file."""
    gw = GatewayProcess(tmp_path / "gw")
    gw.env["MCPGW_STORAGE"] = "dynamodb://gateway-table?region=us-east-1&endpoint=http://127.0.0.1:9"
    result = gw.cli("backup", str(tmp_path / "copy.db"), check=False)
    assert result.returncode == 1
    assert "point-in-time recovery" in result.stderr and "create-backup" in result.stderr
    assert "gateway-table" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "copy.db").exists()


def test_restore_serves_a_token_issued_before_the_backup(tmp_path, upstream):
    """Backup while serving; the server is then removed; stop, copy the backup back (mode
    0600, stale -wal/-shm removed), start: the server is back and the token issued before
    the backup still works through it."""
    rig = start_rig(tmp_path / "gw", upstream.url)
    try:
        assert rig.call("before").status_code == 200
        backup = tmp_path / "gateway-backup.db"
        with Writer(rig):
            rig.gateway.cli("backup", str(backup))
        rig.gateway.cli("servers", "remove", SERVER)
        assert rig.gateway.cli_json("servers", "list") == []
        rig.gateway.stop()

        for suffix in ("", "-wal", "-shm"):
            Path(f"{rig.db}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(backup, rig.db)
        os.chmod(rig.db, 0o600)
        rig.gateway.start()

        response = rig.call("after restore")
        assert response.status_code == 200, response.text
        assert "echo: after restore" in response.text
        assert [s["server_id"] for s in rig.gateway.cli_json("servers", "list")] == [SERVER]
        with sqlite3.connect(rig.db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # the gateway's mode again
    finally:
        rig.gateway.stop()
