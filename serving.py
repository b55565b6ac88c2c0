"""`gateway.py serve`: the listening sockets (handed over by systemd or a parent, else bound),
one serving process with its drain, or with MCPGW_WORKERS=N the supervisor (workers.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys

from config import Config, ConfigError, is_loopback_host
from services import Services, build_services
from services.common.logs import announce
from storage.base import StorageError

log = logging.getLogger("gateway")

GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython default: 700)


def listening_sockets(config: Config) -> list:
    """The sockets to serve: those handed over by systemd's socket unit or a parent process
    (LISTEN_FDS, services/common/systemd.py), else one bound to MCPGW_LISTEN."""
    from tornado.netutil import bind_sockets

    from services.common.systemd import listen_fds, socket_address

    sockets = listen_fds()
    if not sockets:
        try:
            return bind_sockets(config.listen_port, address=config.listen_host)
        except OSError as exc:
            raise ConfigError(f"MCPGW_LISTEN: cannot listen on {config.listen_host}:{config.listen_port}: "
                              f"{exc.strerror or exc}") from None
    if config.dev_login:  # Config checked MCPGW_LISTEN; a handed-over socket needs the same rule
        for sock in sockets:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or not is_loopback_host(sock.getsockname()[0]):
                raise ConfigError(f"MCPGW_DEV_LOGIN: refused on the handed-over socket {socket_address(sock)} "
                                  "(loopback only)")
    log.info("serving the %d listening socket(s) handed over by the parent (LISTEN_FDS); "
             "MCPGW_LISTEN is not used", len(sockets))
    return sockets


async def serve(services: Services, sockets: list, notifier=None, lifeline: int | None = None) -> None:
    """Serve on `sockets` until SIGTERM/SIGINT, then drain. `notifier`: where READY/STOPPING/
    WATCHDOG go (default: systemd's $NOTIFY_SOCKET; a worker's: its supervisor); `lifeline`:
    a worker's pipe from its supervisor, at end of file when the supervisor is gone."""
    from handlers import make_app
    from handlers.admission import (
        ACCEPT_BATCH,
        SHARED_ACCEPT_BATCH,
        AdmissionHTTPServer,
        connection_cap,
        descriptor_limit,
    )
    from services.common.systemd import Notifier, socket_address

    config = services.config
    # Before anything opens descriptors of its own: the cap on client connections follows
    # from the limit (handlers/admission.py), so running out of descriptors answers 503.
    limit = descriptor_limit()
    cap = connection_cap(limit)
    if config.max_connections > cap:
        log.warning("MCPGW_MAX_CONNECTIONS=%d exceeds what %d file descriptors allow; using %d",
                    config.max_connections, limit, cap)
    max_connections = min(config.max_connections or cap, cap)
    await services.start()
    app = make_app(services)
    # What start-up built lives as long as the process: out of the cyclic collector's sight,
    # and young collections rarer (each walks every tracked young object), +3-6 % requests
    # per CPU-second in bench/proxy.py (two paired runs); garbage cycles still go, later.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
    server = AdmissionHTTPServer(
        app,
        max_connections=max_connections,
        metrics=services.metrics,
        xheaders=config.trust_forwarded,
        max_body_size=4 * 1024 * 1024,
        idle_connection_timeout=75,
        accept_batch=ACCEPT_BATCH if lifeline is None else SHARED_ACCEPT_BATCH,
    )
    server.add_sockets(sockets)
    where = ", ".join(socket_address(sock) for sock in sockets)
    if notifier is None:  # a worker's supervisor prints this once for all
        print_banner(config, where, f"at most {max_connections} at once (file descriptor limit {limit})")
    # systemd (Type=notify): ready once the listener is bound; a heartbeat from the loop.
    notifier = notifier or Notifier.from_env()
    notifier.notify("READY=1", f"STATUS=listening on {where}")
    notifier.start_watchdog()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second signal: the operator wants out now
            log.warning("%s during the drain: exiting at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    if lifeline is not None:
        def orphaned() -> None:
            loop.remove_reader(lifeline)
            notifier.close()  # nobody reads it any more
            log.warning("the supervisor is gone: draining")
            stop.set()

        loop.add_reader(lifeline, orphaned)
    await stop.wait()
    # Drain: /readyz says 503 and idle SSE streams end at once, the listener closes, the
    # requests in flight get MCPGW_DRAIN_TIMEOUT seconds, then queued usage is written.
    services.draining.set()
    notifier.notify("STOPPING=1", "STATUS=draining")
    await server.drain(config.drain_timeout)
    await services.stop()
    notifier.close()


def print_banner(config: Config, where: str, connections: str) -> None:
    sign_in = ("LOCAL DEV SIGN-IN (loopback only, never in production)" if config.dev_login
               else config.oidc_issuer)
    announce([
        f"MCP Auth Gateway listening on http://{where}",
        f"  connections:         {connections}",
        f"  issuer / public URL: {config.public_url}",
        f"  dashboard:           {config.public_url}/dashboard",
        f"  MCP servers at:      {config.public_url}/mcp/<server id>",
        f"  sign-in:             {sign_in}",
    ])


async def serve_process(config: Config, sockets: list, link=None) -> int:
    """One serving process: its Services (storage connection, caches, background jobs) are
    built here, inside the process and its event loop, never inherited across a fork."""
    if link is None:
        await serve(build_services(config), sockets)
    else:
        await serve(build_services(config), sockets, link.notifier, link.lifeline)
    return 0


def serve_command() -> int:
    # uvloop: about 10 % more proxied requests per core (bench/README.md).
    import uvloop

    config = Config.from_env()
    config.check_can_serve()
    sockets = listening_sockets(config)
    if config.workers == 1:  # no supervisor, no extra process
        return uvloop.run(serve_process(config, sockets))
    from handlers.admission import connection_cap, descriptor_limit
    from services.common.systemd import Notifier, socket_address
    from workers import Supervisor

    where = ", ".join(socket_address(sock) for sock in sockets)
    cap = connection_cap(descriptor_limit())  # the limit is raised here once, inherited by the workers
    cap = min(config.max_connections or cap, cap)
    print_banner(config, where, f"{config.workers} worker processes, each at most {cap} at once")

    def worker(link) -> int:
        try:
            return uvloop.run(serve_process(config, sockets, link))
        except (StorageError, OSError) as exc:  # as main() reports it, naming the worker
            print(f"error: worker {link.index}: storage ({config.storage_url.split(':', 1)[0]}) "
                  f"is not usable: {exc}", file=sys.stderr)
            return 1

    return Supervisor(config.workers, worker, sockets, Notifier.from_env(), where, config.drain_timeout).run()
