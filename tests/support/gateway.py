"""GatewayProcess: the real gateway (`gateway.py serve`) as a separate process serving a
loopback socket the test bound and handed over (socket activation), with its own SQLite
file, plus its CLI against the same storage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import httpx

from .ports import bound_socket

ROOT = Path(__file__).resolve().parents[2]

# What systemd does for a socket-activated service, run as `python -c` between this test
# process and the gateway: sd_listen_fds(3) finds the sockets from fd 3 and LISTEN_PID
# names the process they are for, so the inherited socket moves to fd 3 (its old number
# closed: no second copy may keep it listening once the gateway closes it) and LISTEN_PID
# is this pid, which exec keeps. RLIMIT_NOFILE is set here too, so the threaded test
# process needs no preexec_fn. Arguments: FD NOFILE|"" ARGV...
_HANDOVER = """
import os, resource, sys
fd, nofile = int(sys.argv[1]), sys.argv[2]
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), int(nofile)))
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


class GatewayProcess:
    def __init__(self, state_dir: Path, *, idp=None, idp_client=None, port: int | None = None,
                 extra_env: dict[str, str] | None = None, share_storage_with: GatewayProcess | None = None,
                 nofile: int | None = None):
        # Bound now, handed over by start(): the port is this gateway's from the first moment,
        # refusing connections until the gateway serves it. An explicit `port` is one an
        # earlier gateway of the test served (a restart).
        self._socket: socket.socket | None = bound_socket(port or 0)
        self.port: int = self._socket.getsockname()[1]
        weakref.finalize(self, self._socket.close)  # a gateway only used for its CLI
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = Path(state_dir)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MCPGW_")},
            "MCPGW_PUBLIC_URL": self.url,
            "MCPGW_LISTEN": f"127.0.0.1:{self.port}",
            "MCPGW_STATE_DIR": str(self.state_dir),
            "MCPGW_STORAGE": f"sqlite:///{self.state_dir}/gateway.db",
            "MCPGW_UPSTREAM_ALLOW": "127.0.0.0/8",
            "PYTHONUNBUFFERED": "1",
        }
        if share_storage_with is not None:
            for name in ("MCPGW_STATE_DIR", "MCPGW_STORAGE", "MCPGW_PUBLIC_URL"):
                self.env[name] = share_storage_with.env[name]
            self.url = share_storage_with.url
        if idp is not None:
            self.env["MCPGW_OIDC_ISSUER"] = idp.issuer
            if idp_client is not None:
                self.env.update(
                    MCPGW_OIDC_CLIENT_ID=idp_client.client_id,
                    MCPGW_OIDC_CLIENT_SECRET=idp_client.client_secret,
                )
        else:
            self.env["MCPGW_DEV_LOGIN"] = "1"
        self.env.update(extra_env or {})
        self.nofile = nofile  # RLIMIT_NOFILE (soft and hard) of the serving process, for exhaustion tests
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def use_idp_client(self, idp) -> GatewayProcess:
        """Register this gateway at the real IdP (redirect URI PUBLIC_URL/oauth/callback)
        and configure it with that client; call before start()."""
        client = idp.register_client([self.url + "/oauth/callback"])
        self.env.update(MCPGW_OIDC_CLIENT_ID=client.client_id, MCPGW_OIDC_CLIENT_SECRET=client.client_secret)
        return self

    @property
    def listen_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        """Serve: the bound socket starts listening and is handed to `gateway.py serve` as
        fd 3 (LISTEN_FDS=1, LISTEN_PID); this process keeps no copy, so the port refuses
        connections again once the gateway closes it (drain, exit). Returns once /healthz
        answers 200."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        sock = self._socket or bound_socket(self.port)  # started again: bind the port again
        self._socket = None
        self._log = open(self.state_dir / f"gateway-{self.port}.log", "wb")
        with sock:
            sock.listen(128)
            fd = sock.fileno()
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HANDOVER, str(fd), str(self.nofile or ""),
                 str(ROOT / "gateway.py"), "serve"],
                cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(fd,),
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"gateway exited at start:\n{self.log_text()}")
            try:
                # The socket listens already: a connection waits in its backlog until the
                # gateway accepts it, so wait for the answer rather than open one per 0.1 s.
                if httpx.get(self.listen_url + "/healthz", timeout=5, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not start:\n{self.log_text()}")

    def stop(self) -> None:
        if self._socket is not None:  # never started: let the port go
            self._socket.close()
            self._socket = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        path = self.state_dir / f"gateway-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, str(ROOT / "gateway.py"), *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"gateway.py {' '.join(args)} failed: {result.stderr}")
        return result

    def cli_json(self, *args: str):
        return json.loads(self.cli("--json", *args).stdout)

    def add_server(self, upstream: str, owner: str, name: str = "Test server", *extra: str) -> str:
        out = self.cli("servers", "add", "--name", name, "--upstream", upstream, "--owner", owner, *extra)
        return out.stdout.strip().splitlines()[-1]
