"""What the MCPGW_WORKERS tests share: a gateway started with N workers, their pids from
/proc, requests pinned to one worker (the others stopped), and small HTTP helpers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from contextlib import contextmanager
from urllib.parse import urlencode

import httpx

from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.tokens import REDIRECT, pkce, register_public_client

ALICE = {"sub": "alice-workers", "email": "alice.workers@example.com"}
BOB = {"sub": "bob-workers", "email": "bob.workers@example.com"}
LEGACY = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


def start_workers(gw: GatewayProcess, count: int = 2) -> list[int]:
    """Start `gw` with MCPGW_WORKERS=count; return the worker pids once all serve."""
    gw.env["MCPGW_WORKERS"] = str(count)
    gw.start()
    wait_for(lambda: f"{count} workers serving" in gw.log_text(), 30, "every worker to serve")
    pids = workers_of(gw)
    assert len(pids) == count, (pids, gw.log_text())
    return pids


def _is_usage_writer(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"writer_main" in handle.read()
    except OSError:
        return False


def child_processes(pid: int) -> list[tuple[int, list[str]]]:
    """The child processes of `pid` from /proc: (child pid, the fields of its stat line after
    the command name: state, ppid, …)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append((int(entry), fields))
    return children


def workers_of(gw: GatewayProcess) -> list[int]:
    """The gateway's live child processes (its workers; not a dead one not yet reaped, not the
    SQLite usage writer a serving process starts), from /proc."""
    return sorted(child for child, fields in child_processes(gw.pid)
                  if fields[0] != "Z" and not _is_usage_writer(child))


def replaced(gw: GatewayProcess, gone: int) -> bool:
    """Two workers again, `gone` not among them (one look at /proc)."""
    pids = workers_of(gw)
    return len(pids) == 2 and gone not in pids


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def only(worker: int, workers: list[int]):
    """Every fresh connection goes to `worker`: the others are stopped meanwhile."""
    others = [pid for pid in workers if pid != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def resume(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def mcp(gw: GatewayProcess, server_id: str, token: str, message: dict, session: str | None = None):
    """One MCP POST on a fresh connection."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Accept": ACCEPT, "MCP-Protocol-Version": LEGACY}
    if session:
        headers["Mcp-Session-Id"] = session
    return httpx.post(f"{gw.listen_url}/mcp/{server_id}", content=json.dumps(message), headers=headers,
                      timeout=20, trust_env=False)


def answer(response: httpx.Response) -> dict:
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])
    return response.json()


def token_request(gw: GatewayProcess, form: dict) -> httpx.Response:
    return httpx.post(f"{gw.listen_url}/token", data=form, timeout=20, trust_env=False)


async def authorization_code(gw: GatewayProcess, client_id: str, who: dict, resource: str) -> tuple[str, str]:
    """Dev sign-in and consent through /authorize: (code, PKCE verifier)."""
    verifier, challenge = pkce()
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s",
             "code_challenge": challenge, "code_challenge_method": "S256", "resource": resource}
    async with ScriptedBrowser() as browser:
        result = await browser.authorize(f"{gw.url}/authorize?{urlencode(query)}", stop_at=REDIRECT,
                                         idp_login=who)
    return result["code"], verifier


def register(gw: GatewayProcess) -> str:
    async def run() -> str:
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=20) as http:
            return await register_public_client(http, "Workers")
    return asyncio.run(run())


def usage_count(gw: GatewayProcess) -> int:
    with sqlite3.connect(gw.state_dir / "gateway.db") as db:
        return db.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0]


def sockets_of(pid: int) -> int:
    """Sockets the process holds open (an accepted connection adds one)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
