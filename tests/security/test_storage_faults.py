"""Storage faults from the outside (issue 7, finding 9), against real gateway processes:
another process holding the SQLite write lock, a full disk (a small tmpfs) and a database
the gateway can only read (a read-only bind mount). Each time warm proxied calls keep
working, writes answer 503 with Retry-After and a spec-shaped body at once, /readyz says
the store cannot write, nothing is logged as a traceback, and everything recovers by
itself when the fault ends. Then the AccessPolicy cache rules, on a real SQLite store.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from services.common.access import AccessPolicy, Principal
from storage.base import Grant, Server, StorageError
from storage.sqlite import SqliteStorage
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import GatewayProcess
from tests.support.jsonrpc import rpc
from tests.support.tokens import access_token, register_public_client

ALICE = {"sub": "alice-faults", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
ADMIN = "ops@example.com"
ACCEPT = "application/json, text/event-stream"
VERSION = "2025-11-25"
REGISTRATION = {"client_name": "Fault test", "redirect_uris": ["http://127.0.0.1:9/cb"],
                "token_endpoint_auth_method": "none"}

# A second process that takes the write lock and keeps it until told to let go.
LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@contextmanager
def write_lock_held_elsewhere(db: Path) -> Iterator[None]:
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        yield
    finally:
        try:
            locker.stdin.write("\n")
            locker.stdin.close()
        except OSError:
            pass
        locker.wait(10)


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"needs mount (root): {result.stderr.strip()}")


def fill(path: Path) -> None:
    """Take every byte left on the file system of `path`, down to the last one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


# ------------------------------------------------------------------- HTTP helpers


def headers(token: str, session: str | None = None) -> dict[str, str]:
    found = {"Accept": ACCEPT, "Content-Type": "application/json", "MCP-Protocol-Version": VERSION,
             "Authorization": f"Bearer {token}"}
    if session:
        found["Mcp-Session-Id"] = session
    return found


def answer(response: httpx.Response, request_id: int) -> dict:
    text = response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in text.replace("\r\n", "\n").split("\n"):
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("id") == request_id:
                    return message
        raise AssertionError(f"no answer to {request_id} in {text[:300]!r}")
    return response.json()


def open_session(http: httpx.Client, server_id: str, token: str) -> str:
    init = rpc("initialize", 1, protocolVersion=VERSION, capabilities={},
               clientInfo={"name": "faults", "version": "1"})
    response = http.post(f"/mcp/{server_id}", content=json.dumps(init), headers=headers(token))
    assert response.status_code == 200, response.text
    session = response.headers["mcp-session-id"]
    done = http.post(f"/mcp/{server_id}", content=json.dumps(rpc("notifications/initialized", None)),
                     headers=headers(token, session))
    assert done.status_code == 202, done.text
    return session


def list_tools(http: httpx.Client, server_id: str, token: str, session: str, request_id: int) -> httpx.Response:
    return http.post(f"/mcp/{server_id}", content=json.dumps(rpc("tools/list", request_id)),
                     headers=headers(token, session))


def assert_unavailable_oauth(response: httpx.Response) -> None:
    """RFC 6749 shape: 503, Retry-After, {"error": "temporarily_unavailable", …}."""
    assert response.status_code == 503, (response.status_code, response.text)
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == "temporarily_unavailable", body
    assert body["error_description"]


def assert_not_ready(http: httpx.Client, why: str) -> None:
    response = http.get("/readyz")
    assert response.status_code == 503, response.text
    assert "cannot write" in response.text and why in response.text, response.text


def wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "did not recover in time"
        time.sleep(0.1)


def sign_in(gateway: GatewayProcess, email: str) -> httpx.Client:
    client = httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=30, trust_env=False)
    client.get("/login")
    signed = client.post("/login", data={"email": email, "next": "/dashboard", "_xsrf": client.cookies["_xsrf"]})
    assert signed.status_code == 302, signed.text
    client.get("/api/me")  # hands out the _xsrf cookie the API wants echoed
    return client


def api_create_server(client: httpx.Client, name: str, upstream: str) -> httpx.Response:
    return client.post("/api/servers", json={"name": name, "upstream_url": upstream},
                       headers={"X-XSRFToken": client.cookies["_xsrf"]})


def page_create_server(client: httpx.Client, name: str, upstream: str) -> httpx.Response:
    return client.post("/dashboard/servers", data={"name": name, "upstream_url": upstream,
                                                   "headers": "", "_xsrf": client.cookies["_xsrf"]})


def assert_every_kind_of_write_is_503(http: httpx.Client, browser: httpx.Client, upstream: str) -> None:
    assert_unavailable_oauth(http.post("/register", json=REGISTRATION))
    api = api_create_server(browser, "During the fault", upstream)
    assert_unavailable_oauth(api)  # /api/ speaks the same {"error", "error_description"} shape
    page = page_create_server(browser, "During the fault", upstream)
    assert page.status_code == 503 and int(page.headers["Retry-After"]) > 0
    assert page.headers["content-type"].startswith("text/html")
    assert "temporarily unavailable" in page.text


def assert_writes_work_again(http: httpx.Client, browser: httpx.Client, upstream: str) -> None:
    wait_until(lambda: http.get("/readyz").status_code == 200)
    assert http.post("/register", json=REGISTRATION).status_code == 201
    assert api_create_server(browser, "After the fault", upstream).status_code == 201
    assert page_create_server(browser, "After the fault, page", upstream).status_code == 302


# ------------------------------------------------------------- the write lock


@pytest.fixture(scope="module")
def proxied(idp, upstream, tmp_path_factory):
    """A gateway signing in at the real IdP, one server, and Alice's access token."""
    gateway = GatewayProcess(tmp_path_factory.mktemp("storage-lock"), idp=idp)
    gateway.use_idp_client(idp)
    gateway.start()

    async def token_for(server_id: str) -> str:
        async with httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=20) as http:
            client_id = await register_public_client(http, "Storage faults")
            async with ScriptedBrowser() as browser:
                return await access_token(gateway.url, http, browser, client_id, ALICE,
                                          resource=f"{gateway.url}/mcp/{server_id}")

    try:
        server_id = gateway.add_server(upstream.url, ALICE["email"], "Locked")
        token = asyncio.run(token_for(server_id))
        with httpx.Client(base_url=gateway.url, trust_env=False, timeout=60) as http:
            yield gateway, http, server_id, token
    finally:
        gateway.stop()


def test_a_write_lock_held_by_another_process(proxied):
    """The lock held for longer than any budget: warm proxied calls keep working (reads
    have their own connection; sharing rules come from the cache), writes get 503 +
    Retry-After, /readyz says so at once, and all of it ends with the lock."""
    gateway, http, server_id, token = proxied
    db = gateway.state_dir / "gateway.db"
    session = open_session(http, server_id, token)
    assert "result" in answer(list_tools(http, server_id, token, session, 2), 2)
    with write_lock_held_elsewhere(db):
        started = time.monotonic()
        # Writes keep coming meanwhile, as in life: each waits out its budget on the lock.
        stop = threading.Event()
        writes: list[httpx.Response] = []

        def keep_writing() -> None:
            with httpx.Client(base_url=gateway.url, trust_env=False, timeout=60) as writer:
                while not stop.is_set():
                    writes.append(writer.post("/register", json=REGISTRATION))

        writer = threading.Thread(target=keep_writing)
        writer.start()
        latencies = []
        try:
            for n in range(3, 15):  # spans the 3 s freshness of the sharing rules
                sent = time.monotonic()
                response = list_tools(http, server_id, token, session, n)
                latencies.append(time.monotonic() - sent)
                assert response.status_code == 200, response.text
                assert "tools" in answer(response, n)["result"]
                time.sleep(0.4)
        finally:
            stop.set()
            writer.join()
        # The warm path never waits on storage: no call took anything like a write's wait.
        assert max(latencies) < 1.0, latencies
        assert writes
        for response in writes:
            assert_unavailable_oauth(response)
        asked = time.monotonic()
        assert_not_ready(http, "locked")
        assert time.monotonic() - asked < 1.5  # /readyz answers at once, not after a busy wait
        assert time.monotonic() - started < 30  # the lock is still held: nothing waited it out
    wait_until(lambda: http.get("/readyz").status_code == 200)
    assert http.post("/register", json=REGISTRATION).status_code == 201
    assert "result" in answer(list_tools(http, server_id, token, session, 99), 99)
    log = gateway.log_text()
    assert "Traceback" not in log
    assert "503, sqlite: the database is locked" in log  # one line per refused request


# -------------------------------------------------------------- a full disk


def test_a_full_disk(tmp_path, upstream):
    """The database on a small tmpfs that another file fills: SQLite's own SQLITE_FULL."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk))
    gateway = GatewayProcess(tmp_path / "gw", extra_env={
        "MCPGW_STORAGE": f"sqlite:///{disk}/gateway.db", "MCPGW_ADMIN_EMAILS": ADMIN})
    try:
        gateway.start()
        http = httpx.Client(base_url=gateway.url, trust_env=False, timeout=60)
        browser = sign_in(gateway, ADMIN)
        assert http.get("/readyz").status_code == 200
        filler = disk / "filler"
        fill(filler)
        assert_every_kind_of_write_is_503(http, browser, upstream.url)
        assert_not_ready(http, "full")
        assert browser.get("/dashboard").status_code == 200  # reads still work
        filler.unlink()
        assert_writes_work_again(http, browser, upstream.url)
        assert "Traceback" not in gateway.log_text()
    finally:
        gateway.stop()
        umount(disk)


# ------------------------------------------------------- a read-only database


def test_a_database_the_gateway_can_only_read(tmp_path, upstream):
    """Started on a read-only mount of its database (as after a volume remounted read-only):
    it serves what it can read, refuses writes with 503, and takes writes again, without a
    restart, once the mount is writable."""
    real, readonly = tmp_path / "db", tmp_path / "db-ro"
    real.mkdir()
    readonly.mkdir()
    state = tmp_path / "state"
    env = {"MCPGW_ADMIN_EMAILS": ADMIN, "MCPGW_STATE_DIR": str(state)}
    first = GatewayProcess(state, extra_env={**env, "MCPGW_STORAGE": f"sqlite:///{real}/gateway.db"})
    first.start()
    try:
        browser = sign_in(first, ADMIN)
        assert api_create_server(browser, "Before", upstream.url).status_code == 201
        # kill -9: the -wal and -shm files stay, as a crashed or still-running writer leaves them.
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.stop()
    mount("--bind", str(real), str(readonly))
    try:
        mount("-o", "remount,ro,bind", str(readonly))
        gateway = GatewayProcess(state, port=first.port, extra_env={
            **env, "MCPGW_STORAGE": f"sqlite:///{readonly}/gateway.db"})
        try:
            gateway.start()
            http = httpx.Client(base_url=gateway.url, trust_env=False, timeout=60)
            browser.cookies.pop("_xsrf", None)
            browser.get("/api/me")
            assert "Before" in browser.get("/dashboard").text  # reads are served
            assert_every_kind_of_write_is_503(http, browser, upstream.url)
            assert_not_ready(http, "read-only")
            mount("-o", "remount,rw,bind", str(readonly))
            assert_writes_work_again(http, browser, upstream.url)
            assert "Traceback" not in gateway.log_text()
        finally:
            gateway.stop()
    finally:
        umount(readonly)


# ------------------------------------------------------------ the access cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStorage(SqliteStorage):
    """The real SQLite backend, counting server reads and holding them at a gate: storage
    that is slow to answer, as under a long checkpoint or a slow disk."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def get_server(self, server_id: str):
        self.reads += 1
        await self.gate.wait()
        return await super().get_server(server_id)


BOB = Principal(sub="bob", email="bob@example.com")


async def shared_server(storage: SqliteStorage) -> None:
    await storage.create_server(Server("srv_cache", "Cache", "http://127.0.0.1:9/mcp", owner_sub="alice"))
    await storage.add_grant(Grant("srv_cache", "email", BOB.email))


def test_access_cache_serves_stale_rules_within_the_bound_and_refreshes_once(tmp_path):
    async def scenario() -> None:
        storage = CountingStorage(str(tmp_path / "gateway.db"))
        await storage.open()
        await shared_server(storage)
        clock = Clock()
        policy = AccessPolicy(storage, clock=clock, ttl=3, stale_for=30)
        # Cold: fifty concurrent callers, one storage read.
        storage.gate.clear()
        cold = [asyncio.ensure_future(policy.decide(BOB, "srv_cache")) for _ in range(50)]
        await asyncio.sleep(0.05)
        assert storage.reads == 1 and not any(task.done() for task in cold)
        storage.gate.set()
        assert all(decision.allowed for decision in await asyncio.gather(*cold))
        # Past the TTL with storage slow: answered from the cache after a short wait, one refresh.
        await storage.remove_grant("srv_cache", "email", BOB.email)
        clock.now += 10
        storage.gate.clear()
        stale = await asyncio.wait_for(asyncio.gather(*(policy.decide(BOB, "srv_cache") for _ in range(50))), 1)
        assert all(decision.allowed for decision in stale)  # the rules as last read
        assert storage.reads == 2
        storage.gate.set()
        await asyncio.sleep(0.05)  # the background refresh lands
        assert not (await policy.decide(BOB, "srv_cache")).allowed  # the removed grant is seen
        assert storage.reads == 2
        await storage.close()

    asyncio.run(scenario())


def test_access_cache_fails_closed_beyond_the_bound(tmp_path):
    async def scenario() -> None:
        storage = SqliteStorage(str(tmp_path / "gateway.db"))
        await storage.open()
        await shared_server(storage)
        clock = Clock()
        policy = AccessPolicy(storage, clock=clock, ttl=3, stale_for=30)
        assert (await policy.decide(BOB, "srv_cache")).allowed
        await storage.close()  # storage that cannot answer at all
        clock.now += 3 + 29
        assert (await policy.decide(BOB, "srv_cache")).allowed  # stale, within the bound
        await asyncio.sleep(0.01)  # its background refresh fails; the entry stays
        assert (await policy.decide(BOB, "srv_cache")).allowed
        clock.now += 2  # 34 s after the last good read: beyond 3 + 30
        with pytest.raises(StorageError):
            await policy.decide(BOB, "srv_cache")
        with pytest.raises(StorageError):
            await policy.server("srv_cache")
        await storage.open()  # storage is back: so are the answers, without a restart
        assert (await policy.decide(BOB, "srv_cache")).allowed
        await storage.close()

    asyncio.run(scenario())
