"""`gateway.py doctor`: is this installation fit to serve? Configuration, storage, the
identity provider, clock skew and every registered upstream, one `Check` line each."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from config import Config, ConfigError, is_loopback_host
from services.app import Services, build_services
from services.authserver.identity import (
    CLOCK_SKEW,
    CONNECT_TIMEOUT,
    REQUEST_TIMEOUT,
    SIGNING_KEY_TYPES,
    fetch_failure,
    signing_keys,
)
from services.common.errors import IdentityError
from services.dashboard.probe import McpProbe
from services.proxy.upstream.errors import UpstreamError, UpstreamRefused
from storage.base import Pending, Server, StorageError
from storage.dynamodb import DynamoDBStorage
from storage.sqlite import SqliteStorage
from storage.sqlite.backup import LATEST_SCHEMA, schema_version

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
SKEW_WARN = 30.0  # seconds: worth fixing before it reaches the leeway
UPSTREAM_CONCURRENCY = 16  # upstreams probed at once
PROBE_KIND = "doctor"  # the storage write probe's pending record (expires in a minute)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, FAIL, skip
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


@dataclass
class Report:
    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def lines(self) -> list[str]:
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, WARN, FAIL, SKIP)}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return [c.line() for c in self.checks] + [("FAILED: " if self.failed else "passed: ") + summary]

    def as_dict(self) -> dict:
        return {"ok": not self.failed, "checks": [asdict(c) for c in self.checks]}


async def diagnose(env: Mapping[str, str], clock: Callable[[], float] = time.time) -> Report:
    """Every check for the installation `env` describes; `clock` is this host's wall clock."""
    config, checks = configuration(env)
    if config is None:
        checks.append(Check("storage, idp, upstreams", SKIP, "not checked: the configuration does not load"))
        return Report(checks)
    services = build_services(config)
    try:
        checks += await Doctor(services, clock).run()
    finally:
        await services.stop()
    return Report(checks)


def configuration(env: Mapping[str, str]) -> tuple[Config | None, list[Check]]:
    """The public URL's scheme, then Config itself and the secrets it names."""
    checks = [public_url_check(env.get("MCPGW_PUBLIC_URL", "").strip() or Config.public_url)]
    try:
        config = Config.from_env(dict(env))
    except ConfigError as exc:
        return None, [*checks, Check("config", FAIL, f"does not load: {exc}")]
    checks.append(Check("config", OK, f"MCPGW_* settings load (listening on {config.listen_host}:"
                                      f"{config.listen_port}, storage {config.storage_url})"))
    checks.append(secrets_check(config, env))
    return config, checks


def public_url_check(url: str) -> Check:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return Check("public url", FAIL, f"{url!r} is not a URL (MCPGW_PUBLIC_URL)")
    if parts.scheme == "https":
        return Check("public url", OK, f"{url} (https)")
    if parts.scheme == "http" and is_loopback_host(host):
        return Check("public url", OK, f"{url}: plain http on a loopback host, for a local trial only")
    return Check("public url", FAIL, (
        f"{url} is not https: access tokens, authorization codes and the sign-in cookie would cross "
        "the network unencrypted, and OAuth 2.1 requires TLS for every endpoint that is not loopback; "
        "terminate TLS (e.g. at a reverse proxy) and set MCPGW_PUBLIC_URL to the https origin"))


def secrets_check(config: Config, env: Mapping[str, str]) -> Check:
    if env.get("MCPGW_SECRET_KEY_FILE", "").strip():
        master = f"master secret from {env['MCPGW_SECRET_KEY_FILE'].strip()}"
    elif env.get("MCPGW_SECRET_KEY", "").strip():
        master = "master secret from MCPGW_SECRET_KEY"
    else:
        master = f"master secret generated in {config.state_dir}/secret.key (back it up with the database)"
    if config.dev_login:
        return Check("secrets", OK, f"{master}; local dev sign-in needs no IdP client")
    missing = [name for name, value in (("MCPGW_OIDC_CLIENT_ID", config.oidc_client_id),
                                        ("MCPGW_OIDC_CLIENT_SECRET(_FILE)", config.oidc_client_secret))
               if not value]
    if missing:
        return Check("secrets", FAIL, f"{' and '.join(missing)} empty: the gateway cannot sign anyone in "
                                      f"at {config.oidc_issuer} (register it there as a web client)")
    return Check("secrets", OK, f"{master}; IdP client {config.oidc_client_id} with its secret")


class Doctor:
    """The checks that need `Services`: storage, master secret, IdP, clock, upstreams.
    `clock` gives this host's time (seconds since the epoch) for the skew check."""

    def __init__(self, services: Services, clock: Callable[[], float] = time.time) -> None:
        self._services = services
        self._clock = clock

    async def run(self) -> list[Check]:
        checks = await self.storage()
        storage_ok = all(c.status != FAIL for c in checks)
        if storage_ok:
            checks.append(await self.master_secret())
        checks += await self.identity_provider()
        if storage_ok:
            checks += await self.upstreams()
        else:
            checks.append(Check("upstreams", SKIP, "not checked: the servers are in the storage"))
        return checks

    # ------------------------------------------------------------------ storage

    async def storage(self) -> list[Check]:
        store = self._services.storage
        before: int | None = None
        if isinstance(store, SqliteStorage):
            where = f"sqlite {store.path}"
            try:
                before = await asyncio.to_thread(schema_version, store.path)
            except StorageError:
                pass  # opening it (next) names the fault
        else:
            where = (f"dynamodb table {store.table} ({store.region})" if isinstance(store, DynamoDBStorage)
                     else type(store).__name__)
        try:
            # As every command does: creates the file or table, migrates the schema.
            await store.open()
        except (StorageError, OSError) as exc:
            return [Check("storage", FAIL, f"{where}: cannot open: {exc}{self._directory_hint(store)}")]
        checks = [Check("storage", OK, f"{where} opens")]
        if isinstance(store, SqliteStorage):
            checks.append(self._schema(before))
        elif isinstance(store, DynamoDBStorage):
            checks.append(Check("dynamodb table", OK, f"{store.table} is ACTIVE with its indexes and TTL"))
        checks.append(await self._write_probe(where))
        return checks

    @staticmethod
    def _directory_hint(store) -> str:
        directory = os.path.dirname(os.path.abspath(store.path)) if isinstance(store, SqliteStorage) else ""
        if directory and os.path.isdir(directory) and not os.access(directory, os.W_OK):
            return (f" (the directory {directory} is not writable by this user; SQLite creates its -wal "
                    "and -shm files beside the database: run as the service's user, or fix the owner)")
        return ""

    @staticmethod
    def _schema(before: int | None) -> Check:
        if before is None:
            return Check("schema", OK, f"new database created at version {LATEST_SCHEMA}")
        if before == LATEST_SCHEMA:
            return Check("schema", OK, f"version {before} (current)")
        return Check("schema", WARN, f"was version {before}; migrated to {LATEST_SCHEMA} by this check, as the "
                                     "gateway does at start: restart any gateway still running older code")

    async def _write_probe(self, where: str) -> Check:
        """A real write, read back and removed, through the one storage interface."""
        store = self._services.storage
        key = secrets.token_urlsafe(9)
        try:
            now = time.time()
            await store.put_pending(Pending(PROBE_KIND, key, {"probe": True}, now + 60))
            found = await store.take_pending(PROBE_KIND, key, now)
        except (StorageError, OSError) as exc:
            return Check("storage write", FAIL, f"{where}: a probe record could not be written: {exc}")
        if found is None:
            return Check("storage write", FAIL, f"{where}: a probe record written was not found again")
        return Check("storage write", OK, "a probe record was written, read back and removed")

    async def master_secret(self) -> Check:
        try:
            await self._services.keyring.load()  # decrypts the active signing key
        except (InvalidTag, ValueError):
            return Check("master secret", FAIL, "it does not decrypt the stored signing key: this storage was "
                                                "created with another MCPGW_SECRET_KEY (or secret.key)")
        except (StorageError, OSError) as exc:
            return Check("master secret", FAIL, f"the signing keys cannot be read: {exc}")
        keys = await self._services.storage.list_signing_keys()
        live = sum(k.status != "retired" for k in keys)
        return Check("master secret", OK, f"decrypts the active signing key ({live} key(s) in use)")

    # ------------------------------------------------------------ identity provider

    async def identity_provider(self) -> list[Check]:
        identity = self._services.identity
        if identity is None:
            return [Check("idp", SKIP, "local dev sign-in (MCPGW_DEV_LOGIN): no identity provider to check"),
                    Check("clock", SKIP, "no identity provider to compare clocks with (local dev sign-in)")]
        try:
            discovery = await identity.discovery()
        except IdentityError as exc:
            return [Check("idp discovery", FAIL, f"{identity.issuer}: {exc.message}"),
                    Check("idp keys", SKIP, "not checked: no discovery document"),
                    Check("clock", SKIP, "not checked: the identity provider did not answer")]
        checks = [Check("idp discovery", OK, f"{identity.issuer} names its authorization, token and key-set "
                                             "endpoints")]
        jwks_uri = discovery["jwks_uri"]
        request = HTTPRequest(jwks_uri, connect_timeout=CONNECT_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
                              follow_redirects=False)
        try:
            response = await AsyncHTTPClient().fetch(request)
        except (HTTPClientError, OSError) as exc:
            return [*checks, Check("idp keys", FAIL, f"{jwks_uri}: {fetch_failure(exc, 'key set').message}"),
                    Check("clock", SKIP, "not checked: the key set did not load")]
        received = self._clock()
        return [*checks, self._keys(jwks_uri, response.body), self._skew(response.headers.get("Date"), received)]

    @staticmethod
    def _keys(jwks_uri: str, body: bytes) -> Check:
        try:
            document = json.loads(body)
        except ValueError:
            return Check("idp keys", FAIL, f"{jwks_uri} is not JSON")
        members = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(members, list):
            return Check("idp keys", FAIL, f"{jwks_uri} is not a JWK set (no 'keys' list)")
        usable = [jwk for jwk in members
                  if any(signing_keys({"keys": [jwk]}, alg, None) for alg in SIGNING_KEY_TYPES)]
        if not usable:
            return Check("idp keys", FAIL, f"{jwks_uri} holds no signing key the gateway can verify ID tokens "
                                           f"with ({len(members)} member(s))")
        return Check("idp keys", OK, f"{jwks_uri}: {len(usable)} signing key(s)")

    @staticmethod
    def _skew(date: str | None, received: float) -> Check:
        try:
            idp_time = parsedate_to_datetime(date).timestamp() if date else None
        except (TypeError, ValueError):
            idp_time = None
        if idp_time is None:
            return Check("clock", WARN, "the identity provider sent no usable Date header; clocks not compared")
        # Date has whole seconds: the IdP's clock read somewhere in [Date, Date + 1).
        skew = idp_time + 0.5 - received
        direction = "behind" if skew > 0 else "ahead of"
        said = f"this host's clock is {abs(skew):.0f} s {direction} the identity provider's"
        if abs(skew) <= SKEW_WARN:
            return Check("clock", OK, said)
        if abs(skew) <= CLOCK_SKEW:
            return Check("clock", WARN, f"{said}: near the {CLOCK_SKEW} s leeway on ID tokens; sync it (NTP)")
        return Check("clock", FAIL, f"{said}: beyond the {CLOCK_SKEW} s leeway, so ID tokens are refused as "
                                    "expired or not yet valid; sync the clock (NTP, timedatectl)")

    # ------------------------------------------------------------------ upstreams

    async def upstreams(self) -> list[Check]:
        try:
            servers = await self._services.servers.list()
        except StorageError as exc:
            return [Check("upstreams", FAIL, f"the servers cannot be read: {exc}")]
        if not servers:
            return [Check("upstreams", OK, "none registered yet")]
        # Concurrently, but not hundreds of connections at once.
        slots = asyncio.Semaphore(UPSTREAM_CONCURRENCY)

        async def one(server: Server) -> Check:
            async with slots:
                return await self._upstream(server)

        return list(await asyncio.gather(*(one(s) for s in servers)))

    async def _upstream(self, server: Server) -> Check:
        """Reached as the proxy reaches it: the shared client and its SSRF guard, with the
        allow-list only for servers an administrator approved for internal upstreams."""
        name, url = f"upstream {server.server_id}", server.upstream_url
        try:
            headers = dict(self._services.servers.upstream_headers(server))
        except (InvalidTag, ValueError):
            return Check(name, FAIL, "its upstream headers do not decrypt: the master secret is not the one "
                                     "they were stored with")
        try:
            await McpProbe(self._services.upstream).check_reachable(
                url, headers, public_only=not server.internal_upstream)
        except UpstreamRefused as exc:
            return Check(name, FAIL, f"{url} is refused by the SSRF guard: {exc}")
        except (UpstreamError, TimeoutError) as exc:
            return Check(name, FAIL, f"{url} is unreachable: {str(exc) or 'no answer in time'}")
        return Check(name, OK, f"{url} answers through the SSRF guard")
