"""GatewayProcess: the real gateway (`gateway.py serve`) as a separate process on a free
loopback port, with its own SQLite file, plus its CLI against the same storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .idp import free_port

ROOT = Path(__file__).resolve().parents[2]


class GatewayProcess:
    def __init__(self, state_dir: Path, *, idp=None, idp_client=None, port: int | None = None,
                 extra_env: dict[str, str] | None = None, share_storage_with: GatewayProcess | None = None,
                 nofile: int | None = None):
        self.port = port or free_port()
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
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.state_dir / f"gateway-{self.port}.log", "wb")
        self._process = subprocess.Popen(
            [sys.executable, str(ROOT / "gateway.py"), "serve"],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=self._limit_nofile if self.nofile else None,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"gateway exited at start:\n{self.log_text()}")
            try:
                if httpx.get(self.listen_url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not start:\n{self.log_text()}")

    def _limit_nofile(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def stop(self) -> None:
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
