"""A real DynamoDB-compatible server for the tests: moto in server mode, as a separate
process serving a loopback socket the test bound (DynamoDB itself cannot run here)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from .ports import bind_unused_port

# moto's own server (moto.server.main, what .venv/bin/moto_server runs) with one lock
# around each request. moto applies requests from several threads without isolation: its
# TransactWriteItems snapshots whole tables and restores them when a transaction is
# cancelled, undoing other clients' committed writes meanwhile. DynamoDB serializes
# conflicting writes; one request at a time is the faithful model of that here.
SERIAL_MOTO_SERVER = """
import sys, threading
from moto import server
run_simple, lock = server.run_simple, threading.Lock()

def serial(app):
    def handle(environ, start_response):
        with lock:
            return list(app(environ, start_response))
    return handle

server.run_simple = lambda host, port, app, **kw: run_simple(host, port, serial(app), **kw)
server.main(sys.argv[1:])
"""


@contextmanager
def moto_server() -> Iterator[str]:
    """Start the server on a listening socket bound here; yields its endpoint URL."""
    sock, port = bind_unused_port()
    # moto's main() calls werkzeug's run_simple, which serves an inherited listening socket
    # when it runs as the reloader's child: WERKZEUG_RUN_MAIN=true and WERKZEUG_SERVER_FD
    # (werkzeug.serving.run_simple; its stock hand-over, no option of moto's own).
    env = {**os.environ, "WERKZEUG_RUN_MAIN": "true", "WERKZEUG_SERVER_FD": str(sock.fileno())}
    with sock:  # the child holds the only copy once it runs
        server = subprocess.Popen(
            [sys.executable, "-c", SERIAL_MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=(sock.fileno(),),
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # The socket listens from the start: wait for an HTTP answer, not just a connection.
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=2, trust_env=False)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)
