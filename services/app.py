"""Services and build_services: every service built once per process from Config and shared
by every handler, and the background jobs (revocations, key refresh, housekeeping)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from config import Config
from services.authserver.authorization import AuthorizationRequests
from services.authserver.claims import InvalidToken
from services.authserver.clients import ClientRegistry
from services.authserver.identity import OidcIdentityProvider
from services.authserver.keys import KeyRing, SecretBox
from services.authserver.signin import Accounts
from services.authserver.tokens import TokenService
from services.authserver.verification import REVOCATION_REFRESH
from services.common.access import AccessPolicy
from services.common.cache import TtlCache
from services.common.metrics import Metrics, time_storage
from services.common.ratelimit import RateLimiter
from services.common.servers import ServerRegistry
from services.dashboard.probe import McpProbe
from services.dashboard.reports import UsageReports
from services.dashboard.rules import Dashboard
from services.proxy.gate import ProxyGate
from services.proxy.sessions import SessionMap
from services.proxy.tools.service import ToolService
from services.proxy.upstream.fetch import fetch_small
from services.proxy.upstream.policy import AddressPolicy
from services.proxy.upstream.pool import UpstreamClient
from services.proxy.upstream_auth.service import UpstreamAuth
from services.proxy.usage import UsageRecorder
from storage import open_storage
from storage.base import Storage, StorageUnavailable

log = logging.getLogger("gateway.services")

HOUSEKEEPING_INTERVAL = 300.0
IDENTITY_TTL = 300  # lifetime of the identity assertion sent to upstreams
IDENTITY_REUSE = IDENTITY_TTL - 60  # an assertion is reused while it has a minute left
IDENTITY_CACHE_SIZE = 10000
USAGE_PURGE_BATCH, USAGE_PURGE_ROUNDS = 5000, 20  # at most 100,000 old events per round


@dataclass
class Services:
    config: Config
    storage: Storage
    box: SecretBox
    keyring: KeyRing
    access: AccessPolicy
    tokens: TokenService
    authorizations: AuthorizationRequests
    clients: ClientRegistry
    accounts: Accounts
    limits: RateLimiter
    servers: ServerRegistry
    metrics: Metrics
    identity: OidcIdentityProvider | None
    upstream: UpstreamClient
    sessions: SessionMap
    usage: UsageRecorder
    dashboard: Dashboard
    gate: ProxyGate  # who may make a proxied call; its session and usage record
    tools: ToolService  # tool rules and the tool catalog (proxy, dashboard, CLI)
    upstream_auth: UpstreamAuth  # connected accounts: each user's own token at an upstream
    # Set when the process begins to drain (SIGTERM): /readyz answers 503, standalone SSE
    # streams end cleanly.
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    # The wall clock (records, token times) and the monotonic one (caches): tests move them.
    now: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    _tasks: list = field(default_factory=list)
    _identity_cache: TtlCache = field(init=False)

    def __post_init__(self) -> None:
        self._identity_cache = TtlCache(IDENTITY_CACHE_SIZE, IDENTITY_REUSE, clock=self.clock)

    async def start(self, background: bool = True) -> None:
        await self.storage.open()
        await self.keyring.load()
        await self.tokens.refresh_revocations()
        if background:
            self.usage.start()
            self._tasks = [
                asyncio.create_task(self._every(REVOCATION_REFRESH, self.tokens.refresh_revocations)),
                asyncio.create_task(self._every(60.0, self.keyring.refresh_if_stale)),
                asyncio.create_task(self._every(HOUSEKEEPING_INTERVAL, self._housekeeping)),
            ]

    async def stop(self) -> None:
        """Background jobs end; queued usage events are written before storage closes."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.usage.stop()
        self.upstream.close()
        self.upstream_auth.close()
        await self.storage.close()

    async def _housekeeping(self) -> None:
        now = self.now()
        await self.storage.purge_expired(now)
        await self.clients.reap_idle()
        await self.purge_old_usage(now)

    async def purge_old_usage(self, now: float) -> int:
        """Usage history past MCPGW_USAGE_RETENTION_DAYS, in bounded batches so that no
        single write holds the store for long; what is left waits for the next round."""
        before = now - self.config.usage_retention_days * 86400
        purged = 0
        for _ in range(USAGE_PURGE_ROUNDS):
            batch = await self.storage.usage.purge_usage_events(before, USAGE_PURGE_BATCH)
            purged += batch
            if batch < USAGE_PURGE_BATCH:
                break
        return purged

    def identity_headers(self, server, claims: dict) -> list[tuple[str, str]]:
        """Opt-in identity forwarding: who the user is, plus a short-lived gateway-signed
        JWT (audience = the upstream URL) the upstream can verify with /jwks.json."""
        key = (claims["sub"], server.server_id, server.upstream_url)  # aud follows a URL change
        assertion = self._identity_cache.get(key)
        if assertion is None:
            now = self.now()
            assertion = self.keyring.sign(
                {
                    "iss": self.config.issuer,
                    "sub": claims["sub"],
                    "email": claims.get("email", ""),
                    "aud": server.upstream_url,
                    "iat": int(now),
                    "exp": int(now) + IDENTITY_TTL,
                },
                typ="JWT",
            )
            self._identity_cache.set(key, assertion)
        return [
            ("X-MCPGW-User-Sub", claims["sub"]),
            ("X-MCPGW-User-Email", claims.get("email", "")),
            ("X-MCPGW-Identity", assertion),
        ]

    @staticmethod
    async def _every(interval: float, job) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except StorageUnavailable as exc:  # a passing storage fault: the next round retries
                log.warning("background job %s skipped: %s", getattr(job, "__name__", job), exc)
            except Exception:  # a failed round must not stop the next one
                log.exception("background job %s failed", getattr(job, "__name__", job))


def build_services(config: Config, storage: Storage | None = None, *,
                   now: Callable[[], float] = time.time,
                   clock: Callable[[], float] = time.monotonic) -> Services:
    """Every service, each given the wall clock `now` and the monotonic `clock` (its caches)."""
    metrics = Metrics()
    # Every storage call feeds storage_seconds{op} / storage_errors_total (one place, storage/ untouched).
    storage = time_storage(storage or open_storage(config.storage_url), metrics)
    box = SecretBox(config.secret_key)
    keyring = KeyRing(storage, box, config.access_token_ttl, now=now, clock=clock)
    access = AccessPolicy(storage, clock=clock)
    policy = AddressPolicy(config.upstream_allow)

    async def fetch_document(url: str):
        response = await fetch_small(url, policy=policy, max_bytes=5120, timeout=5.0)
        return response.status, response.headers, response.body

    identity = None
    if not config.dev_login:
        identity = OidcIdentityProvider(
            config.oidc_issuer,
            config.oidc_client_id,
            config.oidc_client_secret,
            config.public_url + "/oauth/callback",
            clock=clock,
        )
    tokens = TokenService(storage, keyring, box, access, config, metrics=metrics, now=now)
    clients = ClientRegistry(storage, fetch_document, now=now, clock=clock)
    upstream_auth = UpstreamAuth(storage, box, policy, config.public_url, now=now, clock=clock, metrics=metrics)
    servers = ServerRegistry(storage, box, access, policy, now=now, upstream_auth=upstream_auth,
                             public_url=config.public_url)
    upstream = UpstreamClient(policy, header_timeout=config.upstream_timeout)
    sessions = SessionMap(storage, now=now)
    usage = UsageRecorder(storage.usage, metrics)
    tools = ToolService(storage, access, metrics, clock=clock, wall=now)
    return Services(
        config=config,
        storage=storage,
        box=box,
        keyring=keyring,
        access=access,
        tokens=tokens,
        clients=clients,
        authorizations=AuthorizationRequests(storage, clients, tokens, access, config, now=now),
        accounts=Accounts(storage, identity, access, config.signin_ttl, now=now, clock=clock),
        limits=RateLimiter(clock=clock),
        servers=servers,
        metrics=metrics,
        upstream=upstream,
        sessions=sessions,
        usage=usage,
        identity=identity,
        dashboard=Dashboard(
            storage, servers, access, tokens, clients, McpProbe(upstream), UsageReports(storage, now=now), config,
            now=now, tools=tools,
        ),
        gate=ProxyGate(config, access, sessions, usage, tokens.verify_access_token, InvalidToken, metrics),
        tools=tools,
        upstream_auth=upstream_auth,
        now=now,
        clock=clock,
    )
