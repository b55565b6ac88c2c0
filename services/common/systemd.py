"""sd_notify(3) with the standard library: READY=1, STOPPING=1 and a WATCHDOG=1 heartbeat
from the event loop, sent as datagrams to $NOTIFY_SOCKET (a no-op when it is not set)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("gateway.systemd")


class Notifier:
    """Messages to the service manager. `address` is None outside systemd (Type=notify)."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None):
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._sock: socket.socket | None = None
        self._failed = False
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        address = None
        if path.startswith("@"):
            address = "\0" + path[1:]  # the abstract namespace
        elif path.startswith("/"):
            address = path
        elif path:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket path; not notifying systemd", path)
        return cls(address, watchdog_interval(env) if address else None)

    def notify(self, *fields: str) -> bool:
        """Send `fields` ("READY=1", ...) as one datagram; False when not sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            if not self._failed:  # once: a heartbeat must not flood the log
                self._failed = True
                log.warning("could not notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
            return False

    def start_watchdog(self) -> None:
        """WATCHDOG=1 every half WATCHDOG_USEC from the running event loop: a loop that is
        stuck stops the heartbeat and systemd restarts the service."""
        if self.watchdog_interval is None or self._watchdog is not None:
            return
        loop = asyncio.get_running_loop()

        def beat() -> None:
            self.notify("WATCHDOG=1")
            self._watchdog = loop.call_later(self.watchdog_interval, beat)

        beat()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between heartbeats (half of WATCHDOG_USEC), or None when no watchdog is set
    for this process (WATCHDOG_PID, when present, names another process)."""
    usec, pid = env.get("WATCHDOG_USEC", "").strip(), env.get("WATCHDOG_PID", "").strip()
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
