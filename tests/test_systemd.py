"""systemd integration (issue 9): the notify messages a real gateway process sends on a
datagram socket this test binds (READY=1 once the port answers, WATCHDOG=1 every half
WATCHDOG_USEC, STOPPING=1 at SIGTERM), the abstract namespace and WATCHDOG_PID rules, and
the unit's `systemd-analyze security` exposure when the tool is installed."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from services.common.systemd import Notifier, watchdog_interval
from tests.support.gateway import GatewayProcess

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
