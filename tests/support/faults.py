"""Fault injection on loopback for the fault and fuzz suites: an upstream on raw sockets
whose behaviour a test switches at any moment (answer, hang, garbage, die mid-body,
refuse connections), a TCP relay that can pass, hang or refuse in front of a real peer
(the IdP), the figures of a process (descriptors, RSS), kill -9 of a GatewayProcess, and
sign-in walks done by hand with httpx (dev sign-in form, or the real IdP's form).

Everything here runs on daemon threads and blocking sockets, so sync tests can drive it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from urllib.parse import urljoin

import httpx

from .ports import HeldPort, bound_socket

# ------------------------------------------------------------------------ helpers


def _read_request(conn: socket.socket, buffered: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, rest) of one HTTP/1.1 request read from `conn`; None when it closed."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            while b"\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                data += chunk
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                data += chunk
            if size == 0:
                # No trailers are sent by the gateway: the final CRLF follows at once.
                return head, body, data[2:]
            body += data[:size]
            data = data[size + 2:]
    length = int(headers.get(b"content-length", b"0") or 0)
    while len(data) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return head, data[:length], data[length:]


def _request_id(body: bytes):
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed.get("id") if isinstance(parsed, dict) else None


# ------------------------------------------------------------------ scripted upstream

SSE_EVENT = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{"n":1}}\n\n'
GARBAGE = b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe not HTTP at all \x1b[31m\r\n\r\n" + bytes(range(256))


class _Listener:
    """A loopback listener that can be closed (connections refused) and reopened on the
    same port; each accepted connection is handed to `_handle` on its own thread. The port
    is held from construction to `stop()` (a HeldPort), so it stays this listener's while
    it refuses connections."""

    def __init__(self, port: int | None) -> None:
        # An explicit port is the caller's to keep; otherwise hold one for our lifetime.
        self._held = None if port else HeldPort()
        self.port = port or self._held.port
        self.accepted = 0
        self._listen_sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self):
        self.listen()
        return self

    def listen(self) -> None:
        with self._lock:
            if self._listen_sock is not None:
                return
            if self._held is not None:
                self._listen_sock = self._held.listen()
            else:
                self._listen_sock = bound_socket(self.port)
                self._listen_sock.listen(128)
            sock = self._listen_sock
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True,
                         name=f"{type(self).__name__}-{self.port}").start()

    def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones are closed too."""
        with self._lock:
            sock, self._listen_sock = self._listen_sock, None
            conns, self._conns = self._conns, set()
        if sock is not None:
            _close(sock)
        for conn in conns:
            _close(conn)

    def release_port(self) -> None:
        """Refuse, then let the port go (after this, `listen()` cannot reopen it)."""
        self.refuse()
        if self._held is not None:
            self._held.close()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                if self._listen_sock is not sock:
                    _close(conn)
                    return
                self._conns.add(conn)
                self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class ScriptedUpstream(_Listener):
    """An upstream MCP endpoint on raw sockets. `mode` is read as each request arrives:

    - ``ok``: a JSON-RPC result echoing the request id (keep-alive, Content-Length);
    - ``hang``: reads the request and never answers, until `release()` or the peer closes;
    - ``garbage``: bytes that are no HTTP response at all, then close;
    - ``die-json``: a 200 head announcing 500 bytes of JSON, 30 of them, then close;
    - ``die-sse``: a chunked event stream: one complete event, half of the next, then close.

    `refuse()` closes the listening socket (connections are refused) and `listen()` opens
    it again on the same port, held meanwhile. `counts` records the requests seen per mode.
    """

    def __init__(self, mode: str = "ok", port: int | None = None) -> None:
        super().__init__(port)
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.mode = mode
        self.counts: Counter[str] = Counter()
        self._release = threading.Event()
        self._stopped = False

    def release(self) -> None:
        """End every hang (the connections are closed) and let later ones hang again."""
        self._release.set()
        time.sleep(0.05)
        self._release.clear()

    def stop(self) -> None:
        self._stopped = True
        self._release.set()
        self.release_port()

    # serving

    def _handle(self, conn: socket.socket) -> None:
        rest = b""
        try:
            while not self._stopped:
                request = _read_request(conn, rest)
                if request is None:
                    return
                _head, body, rest = request
                mode = self.mode
                with self._lock:
                    self.counts[mode] += 1
                if mode == "ok":
                    answer = json.dumps({"jsonrpc": "2.0", "id": _request_id(body), "result": {"ok": True}}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
                    continue
                if mode == "hang":
                    conn.settimeout(0.1)
                    while not self._release.is_set() and not self._stopped:
                        try:
                            if conn.recv(65536) == b"":
                                return  # the gateway gave up and closed
                        except TimeoutError:
                            continue
                    return
                if mode == "garbage":
                    conn.sendall(GARBAGE)
                elif mode == "die-json":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                                 b'{"jsonrpc":"2.0","id":1,"result')
                elif mode == "die-sse":
                    half = SSE_EVENT[: len(SSE_EVENT) // 2]
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n"
                                 + b"%x\r\n%s\r\n" % (len(SSE_EVENT), SSE_EVENT)
                                 + b"%x\r\n%s\r\n" % (len(half), half))
                    time.sleep(0.05)
                return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close(conn)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# ------------------------------------------------------------------------ TCP relay


class TcpRelay(_Listener):
    """Listens on its own loopback port in front of `target_port`. Modes, read per
    connection: ``pass`` (bytes relayed both ways), ``hang`` (accepts and reads, never
    answers, until the peer closes or the mode changes); `refuse()` closes the listening
    socket and `listen()` reopens it on the same port."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        super().__init__(port)
        self.target_port = target_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "pass"
        self.hung = 0

    def stop(self) -> None:
        self.release_port()

    def _handle(self, conn: socket.socket) -> None:
        if self.mode == "hang":
            with self._lock:
                self.hung += 1
            conn.settimeout(0.1)
            try:
                while self.mode == "hang":
                    try:
                        if conn.recv(65536) == b"":
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
            self._forget(conn)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            self._forget(conn)
            return
        with self._lock:
            self._conns.add(upstream)
        threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
        self._pump(conn, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        self._forget(source)
        self._forget(sink)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)
        _close(sock)


# --------------------------------------------------------------------- process figures


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def kill9(gateway) -> None:
    """kill -9 a running GatewayProcess (no chance to flush or clean up), keep its log."""
    process = gateway._process
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    gateway._process = None
    gateway.stop()  # closes the log file only


# ------------------------------------------------------------------------ sign-in walks

XSRF = secrets.token_hex(16)  # Tornado accepts a hex _xsrf cookie echoed in the form / header


def with_xsrf(http: httpx.Client) -> httpx.Client:
    http.cookies.set("_xsrf", XSRF)
    return http


def dev_sign_in(http: httpx.Client, email: str) -> httpx.Response:
    """The dev sign-in form (MCPGW_DEV_LOGIN), posted by hand; `http` keeps the cookie."""
    with_xsrf(http)
    response = http.post("/login", data={"email": email, "next": "/dashboard", "_xsrf": XSRF})
    assert response.status_code == 302, (response.status_code, response.text[:500])
    return response


def idp_sign_in(http: httpx.Client, gateway_url: str, sub: str, next_path: str = "/dashboard") -> httpx.Response:
    """/login → the IdP's form (posted with `sub`) → /oauth/callback; returns the callback's
    answer (302 to the destination when it worked). `http` must not follow redirects."""
    start = http.get(urljoin(gateway_url, "/login"), params={"next": next_path})
    if start.status_code not in (302, 303):
        return start
    at_idp = start.headers["location"]
    decided = http.post(at_idp, data={"sub": sub})
    assert decided.status_code in (302, 303), (decided.status_code, decided.text[:500])
    return http.get(decided.headers["location"])
