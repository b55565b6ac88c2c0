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
        client = idp.register_client([gateway.url + "/oauth/callback"])
        gateway.env.update(MCPGW_OIDC_CLIENT_ID=client.client_id, MCPGW_OIDC_CLIENT_SECRET=client.client_secret)
        started.append(gateway.start())
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory()
