"""systemd integration (issue 9): the notify messages a real gateway process sends on a
datagram socket this test binds (READY=1 once the port answers, WATCHDOG=1 every half
WATCHDOG_USEC, STOPPING=1 at SIGTERM), the abstract namespace and WATCHDOG_PID rules, socket
activation (a listening socket this test binds, handed over as fd 3 with LISTEN_FDS), and
the units' `systemd-analyze security` exposure when the tool is installed."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from services.common.systemd import Notifier, watchdog_interval
from tests.support.gateway import ROOT, GatewayProcess

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "mcp-gateway.service"
MAX_EXPOSURE = 2.0


class NotifyListener:
    """A bound AF_UNIX datagram socket: the service manager's end of $NOTIFY_SOCKET."""

    def __init__(self, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"mcpgw-test-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="mcpgw-notify-")  # short: sun_path is 108 bytes
            path = os.path.join(self._dir, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.messages: list[tuple[float, str]] = []

    def receive(self, until: float) -> None:
        """Collect messages until the monotonic time `until`."""
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, field: str, timeout: float) -> float:
        """When a message carrying `field` (e.g. READY=1) arrived, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for at, message in self.messages:
                if field in message.split("\n"):
                    return at
            assert time.monotonic() < deadline, f"no {field} in {self.messages}"
            self.receive(min(deadline, time.monotonic() + 0.1))

    def count(self, field: str) -> int:
        return sum(field in message.split("\n") for _, message in self.messages)

    def close(self) -> None:
        self.sock.close()


def test_gateway_notifies_ready_watchdog_and_stopping(tmp_path):
    listener = NotifyListener(abstract=True)
    gw = GatewayProcess(tmp_path / "gw", extra_env={"NOTIFY_SOCKET": listener.env_value,
                                                    "WATCHDOG_USEC": "400000"})
    try:
        gw.start()  # returns once /healthz answers
        ready_at = listener.wait_for("READY=1", 5)
        # READY=1 came once the port was bound: the process answered /healthz by then.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=2):
            pass
        first = [m for _, m in listener.messages if "READY=1" in m.split("\n")][0]
        assert f"STATUS=listening on 127.0.0.1:{gw.port}" in first
        listener.receive(time.monotonic() + 1.5)
        beats = [at for at, m in listener.messages if "WATCHDOG=1" in m.split("\n") and at >= ready_at]
        assert len(beats) >= 5, listener.messages  # every 0.2 s
        gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
        assert max(gaps) < 0.45, gaps
        os.kill(gw.pid, signal.SIGTERM)
        listener.wait_for("STOPPING=1", 5)
        assert gw._process.wait(15) == 0
        assert listener.count("READY=1") == 1
    finally:
        gw.stop()
        listener.close()


def test_no_watchdog_for_another_pid_and_path_sockets(tmp_path):
    """WATCHDOG_PID naming another process: no heartbeat; a filesystem NOTIFY_SOCKET works."""
    listener = NotifyListener(abstract=False)
    gw = GatewayProcess(tmp_path / "gw", extra_env={"NOTIFY_SOCKET": listener.env_value,
                                                    "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    try:
        gw.start()
        listener.wait_for("READY=1", 5)
        listener.receive(time.monotonic() + 0.8)
        assert listener.count("WATCHDOG=1") == 0, listener.messages
        os.kill(gw.pid, signal.SIGTERM)
        listener.wait_for("STOPPING=1", 5)
        assert gw._process.wait(15) == 0
    finally:
        gw.stop()
        listener.close()


def test_watchdog_interval_rules():
    me = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    # Outside systemd nothing is sent and nothing fails.
    quiet = Notifier.from_env({})
    assert quiet.address is None and not quiet.notify("READY=1")


# ------------------------------------------------------------------ socket activation


# Moves descriptor argv[1] to 3 (sd_listen_fds' first), sets LISTEN_PID as argv[2] says,
# then execs the rest: the same pid, so "own" is the gateway's pid as systemd would set it.
LAUNCHER = """
import os, sys
fd, pid = int(sys.argv[1]), sys.argv[2]
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
if pid != "unset":
    os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "own" else pid
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def handover_command(fd: int, pid: str) -> list[str]:
    """`gateway.py serve` with descriptor `fd` handed over as fd 3 and LISTEN_PID the
    gateway's own pid ("own"), unset ("unset") or another process's ("1")."""
    return [sys.executable, "-c", LAUNCHER, str(fd), pid, str(ROOT / "gateway.py"), "serve"]


def start_with_socket(gw: GatewayProcess, sock: socket.socket, pid: str, env: dict[str, str] | None = None):
    gw.state_dir.mkdir(parents=True, exist_ok=True)
    log = open(gw.state_dir / "handover.log", "wb")
    try:
        return subprocess.Popen(handover_command(sock.fileno(), pid), cwd=ROOT, pass_fds=(sock.fileno(),),
                                env={**gw.env, "LISTEN_FDS": "1", **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/healthz", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not serving:\n{log.read_text()}")


def stop_process(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.mark.parametrize("pid", ["own", "unset"])
def test_serves_a_handed_over_listening_socket(tmp_path, pid):
    """LISTEN_FDS=1 with LISTEN_PID equal to the gateway's pid (systemd) or unset (a parent
    using Popen(pass_fds=...)): the gateway serves the socket this test bound on a port the
    kernel chose, and binds nothing else (MCPGW_LISTEN names a port that is then free);
    READY=1 names the socket's address; once the test's copy is closed, the drain closes
    the socket: new connections are refused."""
    listener = NotifyListener(abstract=True)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    gw = GatewayProcess(tmp_path / "gw", extra_env={"NOTIFY_SOCKET": listener.env_value,
                                                    "MCPGW_PUBLIC_URL": f"http://127.0.0.1:{port}"})
    process = start_with_socket(gw, sock, pid)
    try:
        sock.close()  # the gateway holds the only copy now
        wait_healthy(f"http://127.0.0.1:{port}", process, gw.state_dir / "handover.log")
        listener.wait_for("READY=1", 5)
        ready = [m for _, m in listener.messages if "READY=1" in m.split("\n")][0]
        assert f"STATUS=listening on 127.0.0.1:{port}" in ready, ready
        # MCPGW_LISTEN's port was not bound: nothing answers there.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        log = (gw.state_dir / "handover.log").read_text()
        assert "handed over by the parent (LISTEN_FDS)" in log and "Traceback" not in log, log
    finally:
        stop_process(process)
        listener.close()


def test_sockets_for_another_pid_are_not_taken(tmp_path):
    """LISTEN_PID naming another process (the variables leaked to a child): the descriptor
    is left alone and the gateway binds MCPGW_LISTEN as usual."""
    sock = socket.create_server(("127.0.0.1", 0))
    gw = GatewayProcess(tmp_path / "gw")
    process = start_with_socket(gw, sock, "1")
    try:
        wait_healthy(gw.url, process, gw.state_dir / "handover.log")
        assert "LISTEN_FDS is meant for process 1" in (gw.state_dir / "handover.log").read_text()
    finally:
        sock.close()
        assert stop_process(process) == 0


@pytest.mark.parametrize("what", ["file", "connected", "public"])
def test_bad_handover_is_one_line_error(tmp_path, what):
    """fd 3 a regular file, a socket that is not listening, or (dev sign-in) a listening
    socket on a non-loopback address: exit 2 with one line naming the variable."""
    gw = GatewayProcess(tmp_path / "gw")
    gw.state_dir.mkdir(parents=True, exist_ok=True)
    keep = []
    if what == "file":
        handle = open(gw.state_dir / "not-a-socket", "wb")
        keep.append(handle)
        fd, expected = handle.fileno(), "LISTEN_FDS: descriptor 3 is not a socket"
    elif what == "connected":
        left, right = socket.socketpair()
        keep += [left, right]
        fd, expected = left.fileno(), "LISTEN_FDS: descriptor 3 is not a listening stream socket"
    else:
        server = socket.create_server(("0.0.0.0", 0))
        keep.append(server)
        fd, expected = server.fileno(), "MCPGW_DEV_LOGIN: refused on the handed-over socket 0.0.0.0:"
    try:
        result = subprocess.run(handover_command(fd, "own"), cwd=ROOT, pass_fds=(fd,),
                                env={**gw.env, "LISTEN_FDS": "1"}, capture_output=True, text=True, timeout=60)
    finally:
        for item in keep:
            item.close()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: {expected}"), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unit_exposure_at_most_2():
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): exposure not measured")
    result = subprocess.run([tool, "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout
    unit = UNIT.read_text()
    for line in ("Type=notify", "KillMode=mixed", "UMask=0077", "StateDirectory=mcp-gateway",
                 "ProtectSystem=strict", "CapabilityBoundingSet=\n",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service"):
        assert line in unit, line
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    assert stop > 30, "TimeoutStopSec must exceed the default MCPGW_DRAIN_TIMEOUT"
    assert re.search(r"^WatchdogSec=\d+", unit, re.M)


def test_socket_unit_hands_one_listening_socket_to_the_service():
    """systemd/mcp-gateway.socket: one stream socket for the whole service (Accept=no, what
    listen_fds expects), checked by `systemd-analyze verify` when the tool is installed."""
    unit = UNIT.with_suffix(".socket")
    text = unit.read_text()
    assert re.search(r"^ListenStream=127\.0\.0\.1:8080$", text, re.M)
    assert re.search(r"^Accept=no$", text, re.M)
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: unit not verified")
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "mcp-gateway" in line and "Command" not in line]
    assert problems == [], result.stderr
