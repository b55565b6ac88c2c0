"""systemd with the standard library: sd_notify(3) (READY=1, STOPPING=1, a WATCHDOG=1 heartbeat
from the event loop, as datagrams to $NOTIFY_SOCKET) and sd_listen_fds(3) (listening sockets
handed over by a socket unit or a parent process: $LISTEN_FDS, fd 3 onwards)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("gateway.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first handed-over descriptor


class Notifier:
    """Messages to the service manager. `address` is None outside systemd (Type=notify).
    `sock`: a connected datagram socket instead (a worker's line to its supervisor)."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None,
                 sock: socket.socket | None = None):
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._sock: socket.socket | None = sock
        self._connected = sock is not None
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
        if self.address is None and not self._connected:
            return False
        try:
            if self._connected:
                if self._sock is None:
                    return False  # closed
                self._sock.send("\n".join(fields).encode())
                return True
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            if not self._failed:  # once: a heartbeat must not flood the log
                self._failed = True
                where = "the supervisor" if self._connected else "systemd at " + self.address.replace("\0", "@")
                log.warning("could not notify %s: %s", where, exc)
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


def listen_fds(env: dict[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets handed over by the parent (sd_listen_fds(3) with
    unset_environment=1): $LISTEN_FDS descriptors from fd 3 on, taken when $LISTEN_PID is
    this process's pid **or unset**; [] when $LISTEN_FDS is unset.

    systemd always sets LISTEN_PID. Accepting it unset lets a parent that cannot know the
    child's pid before exec (``subprocess.Popen(pass_fds=...)`` without a preexec_fn) hand
    over a socket; a stray LISTEN_FDS cannot make us serve a wrong descriptor, because each
    one must be a listening stream socket or serving stops with a ConfigError. The
    variables are removed from `env` (default: os.environ) so that nothing started later
    takes the descriptors again. The sockets come back non-blocking and close-on-exec."""
    from config import ConfigError

    env = os.environ if env is None else env
    count, pid = env.get("LISTEN_FDS", "").strip(), env.get("LISTEN_PID", "").strip()
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not count:
        return []
    if not count.isascii() or not count.isdigit() or not 0 < int(count) <= 64:
        raise ConfigError(f"LISTEN_FDS: {count!r} is not a number of sockets (1 to 64)")
    if pid and pid != str(os.getpid()):
        log.info("LISTEN_FDS is meant for process %s, not this one (%d): binding MCPGW_LISTEN", pid, os.getpid())
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
            listening = (sock.type == socket.SOCK_STREAM
                         and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
        except OSError as exc:
            raise ConfigError(f"LISTEN_FDS: descriptor {fd} is not a socket ({exc.strerror})") from None
        if not listening:
            sock.detach()  # not ours to close
            raise ConfigError(f"LISTEN_FDS: descriptor {fd} is not a listening stream socket")
        sock.setblocking(False)
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def socket_address(sock: socket.socket) -> str:
    """HOST:PORT (or the Unix path) a listening socket is bound to, for log lines."""
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
