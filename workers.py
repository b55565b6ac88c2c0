"""The worker supervisor of MCPGW_WORKERS=N: N forked serving processes sharing the listening
sockets, one parent that restarts a worker that dies, watches their heartbeats and drains them
all on SIGTERM. Standard library only; the parent runs no event loop and opens no storage."""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.systemd import Notifier

log = logging.getLogger("gateway.workers")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0  # seconds before restarting a worker that keeps dying
STABLE_AFTER = 30.0  # a worker that served this long had no start-up problem: back-off resets
TICK = 1.0  # the parent's longest sleep between looking at its timers
KILL_AFTER_DRAIN = 10.0  # seconds past MCPGW_DRAIN_TIMEOUT before a worker still alive is killed
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


@dataclass
class WorkerLink:
    """What a forked worker gets from its supervisor: where its notify messages go (READY=1,
    WATCHDOG=1, STOPPING=1, as to systemd) and the read end of a pipe that reaches end of
    file when the supervisor is gone (the worker then drains and exits)."""

    index: int
    notifier: Notifier
    lifeline: int


@dataclass
class _Worker:
    index: int
    pid: int
    channel: socket.socket  # the parent's end of the worker's notify socket pair
    started: float
    ready: bool = False
    heard: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs `serve(link) -> exit code` in `count` forked workers (`run()` returns the
    parent's exit code). `sockets`: the listening sockets, bound before; `notifier`:
    systemd's; `where`: the address for log lines."""

    def __init__(self, count: int, serve: Callable[[WorkerLink], int], sockets: list[socket.socket],
                 notifier: Notifier, where: str, drain_timeout: float):
        self.count = count
        self._drain_timeout = drain_timeout
        self._kill_at: float | None = None  # while draining: when to kill what is left
        self._serve = serve
        self._sockets = sockets
        self._notifier = notifier
        self._where = where
        self._workers: dict[int, _Worker] = {}  # pid -> worker
        self._restart_at: dict[int, float] = {}  # slot index -> when to fork its replacement
        self._failures = [0] * count  # consecutive short lives per slot
        self._draining = False
        self._all_ready = False
        self._exit_code = 0
        self._metrics = None  # services.common.metrics, once multi-process mode is on
        self._restarts = None  # the parent's Metrics, made at the first restart
        self._metrics_dir: str | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._lifeline_r, self._lifeline_w = os.pipe()
        # A worker beats every half of systemd's watchdog period, and one silent for a whole
        # period is killed and replaced: a stuck worker is restarted alone, the service stays.
        self._beat = notifier.watchdog_interval
        self._next_beat = time.monotonic()

    # ------------------------------------------------------------------------ parent

    def run(self) -> int:
        self._prepare_metrics()
        self._install_signals()
        try:
            for index in range(self.count):
                self._spawn(index)
            while self._workers or not self._draining:
                self._selector.select(self._timeout())
                self._read_wakeups()
                self._read_messages()
                self._reap()
                self._on_timers()
            log.info("all %d workers stopped", self.count)
            return self._exit_code
        finally:
            self._notifier.close()
            self._remove_metrics()

    def _remove_metrics(self) -> None:
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _prepare_metrics(self) -> None:
        """Prometheus multi-process mode: every worker writes its values to files in a
        private directory that any worker's /metrics sums (services/common/metrics.py)."""
        from services.common import metrics

        self._metrics_dir = tempfile.mkdtemp(prefix="mcpgw-metrics-")
        metrics.prepare_multiprocess(self._metrics_dir)
        self._metrics = metrics

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # The C-level handler writes each signal's number to the socket, which wakes the
        # selector; the Python-level handlers have nothing left to do.
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, lambda *_: None)
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    def _spawn(self, index: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sys.stdout.flush()  # or the child would print the parent's buffered output again
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                parent_end.close()
                self._become_worker()
                code = self._serve(WorkerLink(index, Notifier(None, self._beat, sock=child_end),
                                              self._lifeline_r))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                logging.shutdown()
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        worker = _Worker(index, pid, parent_end, time.monotonic())
        self._workers[pid] = worker
        self._selector.register(parent_end, selectors.EVENT_READ, worker)
        log.debug("worker %d started (pid %d)", index, pid)

    def _become_worker(self) -> None:
        """In the forked child: nothing of the parent's loop stays but the listening sockets
        and the lifeline's read end."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        # Its own process group: a Ctrl-C in a terminal reaches the parent alone, which
        # drains the workers once (two signals would mean "exit at once" to a worker).
        os.setpgid(0, 0)
        self._selector.close()
        for worker in self._workers.values():
            worker.channel.close()
        self._wake_r.close()
        self._wake_w.close()
        os.close(self._lifeline_w)
        self._notifier.close()

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [now + TICK, *self._restart_at.values(), *([self._kill_at] if self._kill_at else [])]
        if self._beat:
            due.append(self._next_beat)
        return max(0.0, min(due) - now)

    def _read_wakeups(self) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        while True:
            try:
                more = self._wake_r.recv(4096)
            except BlockingIOError:
                break
            data += more
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop_signal(signum)

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._draining:  # a second signal: out now, the workers too
            log.warning("%s during the drain: killing %d worker(s) and exiting at once", name, len(self._workers))
            for pid in self._workers:
                _kill(pid, signal.SIGKILL)
            self._remove_metrics()
            os._exit(128 + signum)
        log.info("%s: draining %d worker(s)", name, len(self._workers))
        self._drain()

    def _drain(self) -> None:
        self._draining = True
        self._restart_at.clear()
        self._kill_at = time.monotonic() + self._drain_timeout + KILL_AFTER_DRAIN
        self._notifier.notify("STOPPING=1", "STATUS=draining")
        for sock in self._sockets:  # the workers' copies close as each drain begins
            sock.close()
        for pid in self._workers:
            _kill(pid, signal.SIGTERM)

    def _read_messages(self) -> None:
        for worker in list(self._workers.values()):
            while True:
                try:
                    data = worker.channel.recv(4096)
                except (BlockingIOError, OSError):
                    break
                worker.heard = time.monotonic()
                fields = data.decode(errors="replace").split("\n")
                if "READY=1" in fields and not worker.ready:
                    worker.ready = True
                    self._on_ready()

    def _on_ready(self) -> None:
        if self._all_ready or sum(w.ready for w in self._workers.values()) < self.count:
            return
        self._all_ready = True
        pids = ", ".join(str(pid) for pid in sorted(self._workers))
        log.info("%d workers serving on %s (pids %s)", self.count, self._where, pids)
        self._notifier.notify("READY=1", f"STATUS=listening on {self._where} ({self.count} workers)")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            self._selector.unregister(worker.channel)
            worker.channel.close()
            self._metrics.worker_exited(pid)
            self._on_exit(worker, status)

    def _on_exit(self, worker: _Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        if self._draining:
            # SIGTERM's default action ends a worker still starting (no handler yet, nothing
            # in flight): as clean as a drained one.
            if code not in (0, -signal.SIGTERM):
                self._exit_code = 1
            log.info("worker %d (pid %d) stopped with %s", worker.index, worker.pid, how)
            return
        if not self._all_ready:
            # Failing before every worker served once: storage or configuration, which a
            # restart will not mend. Stop all and let systemd (Restart=on-failure) decide.
            log.error("worker %d (pid %d) exited with %s during start-up: stopping the other %d",
                      worker.index, worker.pid, how, len(self._workers))
            self._exit_code = 1
            self._drain()
            return
        lived = time.monotonic() - worker.started
        failures = 0 if lived >= STABLE_AFTER else self._failures[worker.index] + 1
        self._failures[worker.index] = failures
        delay = 0.0 if failures == 0 else min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (failures - 1))
        log.warning("worker %d (pid %d) exited with %s after %.0f s; restarting it in %g s",
                    worker.index, worker.pid, how, lived, delay)
        self._restart_at[worker.index] = time.monotonic() + delay

    def _on_timers(self) -> None:
        now = time.monotonic()
        for index, at in list(self._restart_at.items()):
            if at <= now and not self._draining:
                del self._restart_at[index]
                if self._restarts is None:
                    self._restarts = self._metrics.Metrics()
                self._restarts.inc("workers_restarted_total")
                self._spawn(index)
        if self._kill_at is not None and now >= self._kill_at and self._workers:
            log.error("%d worker(s) still running %g s after the drain began: killing them",
                      len(self._workers), self._drain_timeout + KILL_AFTER_DRAIN)
            self._kill_at = None
            for pid in self._workers:
                _kill(pid, signal.SIGKILL)
        if self._beat and now >= self._next_beat:
            self._next_beat = now + self._beat
            self._notifier.notify("WATCHDOG=1")
            for worker in self._workers.values():
                # From its READY=1 on (start-up time is storage's, not a stuck loop's).
                if worker.ready and now - worker.heard > 2 * self._beat and not self._draining:
                    log.error("worker %d (pid %d) sent no heartbeat for %.0f s: killing it",
                              worker.index, worker.pid, now - worker.heard)
                    worker.heard = now  # one kill; it is reaped and replaced
                    _kill(worker.pid, signal.SIGKILL)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # exited already; reaped on the next round
