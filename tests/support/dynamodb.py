"""A real DynamoDB-compatible server for the tests: moto in server mode on a loopback
port, as a separate process (DynamoDB itself cannot run here)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
    """Start the server; yields its endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", SERIAL_MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)
