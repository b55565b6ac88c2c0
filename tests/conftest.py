"""Shared fixtures: a real OIDC provider process and real gateway processes on loopback."""

from __future__ import annotations

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.idp import IdpProcess


@pytest.fixture(scope="session")
def idp():
    with IdpProcess() as process:
        yield process


@pytest.fixture
def gateway_factory(idp, tmp_path):
    """Start gateways that sign in at the real IdP: factory(**kwargs) -> GatewayProcess."""
    started: list[GatewayProcess] = []

    def start(name: str = "gw", **kwargs) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path / name, idp=idp, idp_client=None, **kwargs)
        gateway.use_idp_client(idp)
        started.append(gateway.start())
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory()


class UpstreamProcess:
    """The `mcp` package's MCPServer (tests/support/upstream_server.py) in a process, serving
    the listening socket this test bound and handed over (no window for another process)."""

    def __init__(self, *flags: str):
        import subprocess
        import sys

        from tests.support.ports import bind_unused_port

        sock, self.port = bind_unused_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        with sock:  # the child holds the only copy once it runs
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.upstream_server", "--fd", str(sock.fileno()), *flags],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
            )

    def wait_ready(self):
        import time

        import httpx

        # The socket listens from the start: wait for an HTTP answer, not just a connection
        # (the 404 of a path beside /mcp, where a GET could open a stream that never ends).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"upstream MCP server exited with {self.process.returncode}")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=5, trust_env=False)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("upstream MCP server did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="session")
def upstream():
    process = UpstreamProcess().wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def stateless_upstream():
    process = UpstreamProcess("--stateless").wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def dynamodb_endpoint():
    """A real DynamoDB-compatible server (moto in server mode) on a loopback port."""
    from tests.support.dynamodb import moto_server

    with moto_server() as endpoint:
        yield endpoint
