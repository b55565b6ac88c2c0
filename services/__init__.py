"""Services: the in-process logic of the gateway, built once per process from Config and
shared by every handler (see build_services)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from config import Config
from services.access import AccessPolicy
from services.clients import ClientRegistry
from services.identity import Accounts, OidcIdentityProvider
from services.keys import KeyRing, SecretBox
from services.metrics import Metrics
from services.ratelimit import RateLimiter
from services.servers import ServerRegistry
from services.tokens import REVOCATION_REFRESH, TokenService
from storage import open_storage
from storage.base import Storage

log = logging.getLogger("gateway.services")

HOUSEKEEPING_INTERVAL = 300.0


@dataclass
class Services:
    config: Config
    storage: Storage
    box: SecretBox
    keyring: KeyRing
    access: AccessPolicy
    tokens: TokenService
    clients: ClientRegistry
    accounts: Accounts
    limits: RateLimiter
    servers: ServerRegistry
    metrics: Metrics
    identity: OidcIdentityProvider | None
    _tasks: list = field(default_factory=list)

    async def start(self, background: bool = True) -> None:
        await self.storage.open()
        await self.keyring.load()
        await self.tokens.refresh_revocations()
        if background:
            self._tasks = [
                asyncio.create_task(self._every(REVOCATION_REFRESH, self.tokens.refresh_revocations)),
                asyncio.create_task(self._every(60.0, self.keyring.refresh_if_stale)),
                asyncio.create_task(self._every(HOUSEKEEPING_INTERVAL, self._housekeeping)),
            ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.storage.close()

    async def _housekeeping(self) -> None:
        await self.storage.purge_expired(time.time())
        await self.clients.reap_idle()

    @staticmethod
    async def _every(interval: float, job) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:  # a failed round must not stop the next one
                log.exception("background job %s failed", getattr(job, "__name__", job))


def build_services(config: Config, storage: Storage | None = None) -> Services:
    storage = storage or open_storage(config.storage_url)
    box = SecretBox(config.secret_key)
    keyring = KeyRing(storage, box, config.access_token_ttl)
    access = AccessPolicy(storage)
    async def fetch_document(url: str):
        from services.upstream import AddressPolicy, fetch_small  # TEMP until upstream lands

        policy = AddressPolicy(config.upstream_allow)
        response = await fetch_small(url, policy=policy, max_bytes=5120, timeout=5.0)
        return response.status, response.headers, response.body

    identity = None
    if not config.dev_login:
        identity = OidcIdentityProvider(
            config.oidc_issuer,
            config.oidc_client_id,
            config.oidc_client_secret,
            config.public_url + "/oauth/callback",
        )
    return Services(
        config=config,
        storage=storage,
        box=box,
        keyring=keyring,
        access=access,
        tokens=TokenService(storage, keyring, box, access, config),
        clients=ClientRegistry(storage, fetch_document),
        accounts=Accounts(storage),
        limits=RateLimiter(),
        servers=ServerRegistry(storage, box, access),
        metrics=Metrics(),
        identity=identity,
    )
