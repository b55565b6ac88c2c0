"""OAuth clients: dynamic registration rules (RFC 7591), client authentication at /token and
client ID metadata documents (CIMD); the redirect-URI policy is in `redirect_uris`."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import unquote_plus

from services.authserver.client_metadata import validate_metadata
from services.authserver.keys import token_hash
from services.authserver.redirect_uris import (
    BAD_PERCENT_RE,
    HOST_RE,
    MAX_URI_LENGTH,
    URI_CHARS_RE,
    _is_ipv6_literal,
    _split,
    redirect_host,
)
from services.common.cache import TtlCache
from services.common.errors import InvalidClient, InvalidRequest, OAuthError, ServerError
from services.common.logs import security_event, security_log
from services.common.validation import max_age
from storage.base import Client, Conflict, Storage

log = logging.getLogger("gateway.clients")

CIMD_MAX_BYTES = 5120
CIMD_MIN_TTL, CIMD_MAX_TTL, CIMD_DEFAULT_TTL = 60, 86400, 300
CIMD_CACHE_SIZE = 1000
# A document that could not be fetched or was refused is not fetched again for this long:
# each /authorize, /token or /revoke naming it would otherwise make the gateway fetch it
# again (amplification, and a way to hammer the document's host through the gateway).
CIMD_FAILURE_TTL = 60.0
CIMD_FAILURE_CACHE_SIZE = 1000
# The only thing a caller learns about a document that failed: whether the URL was closed,
# spoke TLS or answered 404 would map ports behind the gateway. The detail is logged.
CIMD_FAILED = "the client metadata document could not be fetched or is invalid"
DCR_IDLE_REAP = 30 * 86400  # unused DCR registrations are deleted after this long
CIMD_IDLE_REAP = 7 * 86400


def is_cimd_client_id(client_id: str) -> bool:
    return client_id.startswith("https://")


def registration_response(client: Client, secret: str | None = None) -> dict:
    body = {
        "client_id": client.client_id,
        "client_id_issued_at": int(client.created_at),
        "client_name": client.client_name,
        "redirect_uris": list(client.redirect_uris),
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "grant_types": list(client.grant_types),
        "response_types": list(client.response_types),
        "application_type": client.application_type,
        **client.metadata,
    }
    if client.scope:
        body["scope"] = client.scope
    if secret is not None:
        body["client_secret"] = secret
        body["client_secret_expires_at"] = 0
    return body


class ClientRegistry:
    """Registration, lookup and authentication of OAuth clients."""

    def __init__(self, storage: Storage, fetch_document=None, *,
                 now: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic):
        self._storage = storage
        # fetch_document(url) -> (status, headers, body): the SSRF-guarded small fetcher.
        self._fetch_document = fetch_document
        self._now = now
        self._cimd_cache = TtlCache(CIMD_CACHE_SIZE, clock=clock)  # URL -> Client, TTL per document
        # URLs of failed documents, not fetched again for CIMD_FAILURE_TTL.
        self._cimd_failures = TtlCache(CIMD_FAILURE_CACHE_SIZE, CIMD_FAILURE_TTL, clock=clock)
        # URL -> the fetch in progress: concurrent requests naming one document share it.
        self._cimd_fetching: dict[str, asyncio.Future[Client]] = {}

    async def register(self, metadata: object, kind: str = "dcr") -> tuple[Client, str | None]:
        fields = validate_metadata(metadata)
        secret = None
        if fields["token_endpoint_auth_method"] != "none":
            secret = secrets.token_urlsafe(32)
        now = self._now()
        client = Client(
            client_id=("mcp_" if kind == "dcr" else "static_") + secrets.token_urlsafe(16),
            secret_hash=token_hash(secret) if secret else "",
            kind=kind,
            created_at=now,
            **fields,
        )
        try:
            await self._storage.create_client(client)
        except Conflict:  # 128 random bits: only a broken RNG gets here
            raise ServerError("could not allocate a client id", 500) from None
        security_event("client_registered", "OAuth client registered", client_id=client.client_id, kind=kind,
                       auth_method=client.token_endpoint_auth_method, client_name=client.client_name,
                       redirect_hosts=_hosts(client))
        return client, secret

    async def get(self, client_id: str) -> Client:
        """The client for /authorize; raise an OAuthError (InvalidClient) when unusable."""
        if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_URI_LENGTH:
            raise InvalidRequest("client_id is missing")
        if is_cimd_client_id(client_id):
            return await self._metadata_document_client(client_id)
        client = await self._storage.get_client(client_id)
        if client is None or client.kind == "cimd":
            raise InvalidClient("this client is not registered here (register again)")
        return client

    @staticmethod
    def claimed_client_id(form_client_id: str | None, authorization: str | None) -> str:
        """The client_id a /token or /revoke request names, as sent (Basic credentials
        first), before anything is looked up or fetched: the rate-limit key. Empty when
        there is none or the Basic credentials are malformed (authenticate says so)."""
        try:
            basic = _basic_credentials(authorization)
        except OAuthError:
            return ""
        return (basic[0] if basic is not None else form_client_id) or ""

    async def authenticate(
        self, form_client_id: str | None, form_secret: str | None, authorization: str | None
    ) -> Client:
        """Client authentication at /token and /revoke (RFC 6749 §2.3)."""
        basic_id, basic_secret = _basic_credentials(authorization) or (None, None)
        if basic_id is not None and form_client_id and form_client_id != basic_id:
            raise InvalidRequest("client_id differs from the Basic credentials")
        client_id = basic_id or form_client_id
        if basic_id is not None and form_secret:
            raise InvalidRequest("use one client authentication method, not two")
        if not client_id:
            raise InvalidClient("client authentication is required")
        if is_cimd_client_id(client_id):
            client = await self._storage.get_client(client_id)
            if client is None:
                client = await self._metadata_document_client(client_id)
        else:
            client = await self._storage.get_client(client_id)
        if client is None:
            raise InvalidClient("unknown client (register again)")
        secret = basic_secret if basic_id is not None else form_secret
        if client.secret_hash:
            if not secret or not hmac.compare_digest(token_hash(secret), client.secret_hash):
                raise InvalidClient("client authentication failed")
        elif secret:
            raise InvalidClient("this client has no secret")
        return client

    async def touch(self, client: Client) -> None:
        # Writes at most once an hour per client: enough for idle reaping.
        now = self._now()
        if now - client.last_used_at > 3600:
            await self._storage.touch_client(client.client_id, now)

    async def reap_idle(self) -> int:
        now = self._now()
        return await self._storage.reap_idle_clients("dcr", now - DCR_IDLE_REAP) + (
            await self._storage.reap_idle_clients("cimd", now - CIMD_IDLE_REAP)
        )

    # ------------------------------------------------------------ metadata documents

    async def _metadata_document_client(self, url: str) -> Client:
        cached = self._cimd_cache.get(url)
        if cached is not None:
            return cached
        check_metadata_document_url(url)
        if self._fetch_document is None:
            raise InvalidClient("client ID metadata documents are not enabled")
        if url in self._cimd_failures:
            raise InvalidClient(CIMD_FAILED)
        pending = self._cimd_fetching.get(url)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = self._cimd_fetching[url] = asyncio.get_running_loop().create_future()
        try:
            client = await self._load_metadata_document(url)
        except _DocumentRefused as exc:
            log.warning("client metadata document %r refused: %s", url, exc)
            self._cimd_failures.set(url, True)
            error = InvalidClient(CIMD_FAILED)
            pending.set_exception(error)
            pending.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise error from None
        except BaseException as exc:  # storage trouble, cancellation: not the document's fault
            if isinstance(exc, asyncio.CancelledError):
                pending.cancel()
            else:
                pending.set_exception(exc)
                pending.exception()
            raise
        finally:
            del self._cimd_fetching[url]
        pending.set_result(client)
        return client

    async def _load_metadata_document(self, url: str) -> Client:
        """Fetch, check and store one document; _DocumentRefused (for the log) when it
        cannot be used."""
        try:
            status, headers, body = await self._fetch_document(url)
        except Exception as exc:  # every fetch failure is the client's problem
            raise _DocumentRefused(f"fetch failed: {type(exc).__name__}: {exc}") from None
        if status != 200:
            raise _DocumentRefused(f"answered HTTP {status}")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise _DocumentRefused("not JSON") from None
        if not isinstance(document, dict) or document.get("client_id") != url:
            raise _DocumentRefused("its client_id is not its own URL")
        try:
            fields = validate_metadata(document, for_cimd=True)
        except OAuthError as exc:
            raise _DocumentRefused(f"{exc.error}: {exc.description}") from None
        now = self._now()
        existing = await self._storage.get_client(url)
        client = Client(
            client_id=url,
            kind="cimd",
            created_at=existing.created_at if existing else now,
            last_used_at=existing.last_used_at if existing else 0.0,
            **fields,
        )
        if existing is None or replace(existing, metadata={}) != replace(client, metadata={}):
            await self._storage.put_client(client)
            # The same event as a registration, at INFO: any MCP client's first /authorize
            # makes one (routine, not worth an alert), nobody chose its id (it is the URL),
            # and its document came through the SSRF guard and the registration rules.
            security_log.info(
                "OAuth client registered at the first use of its metadata document" if existing is None
                else "OAuth client's metadata document changed",
                extra={"event": "client_registered", "client_id": url, "kind": "cimd",
                       "client_name": client.client_name, "redirect_hosts": _hosts(client)})
        self._cimd_cache.set(url, client, cache_ttl(headers))
        return client


def _hosts(client: Client) -> list[str]:
    """The redirect hosts of a client, for the log (never the full URIs: they may carry state)."""
    return sorted({redirect_host(uri) for uri in client.redirect_uris})


class _DocumentRefused(Exception):
    """Why a client metadata document cannot be used: for the log, never for the caller."""


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(client_id, secret) of an HTTP Basic Authorization header (RFC 6749 §2.3.1: each
    form-urlencoded), None without one; InvalidClient when it is malformed."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidClient("malformed Basic credentials") from None
    raw_id, _, raw_secret = decoded.partition(":")
    return unquote_plus(raw_id), unquote_plus(raw_secret)


def check_metadata_document_url(url: str) -> None:
    """CIMD §3: https, a path, no dot segments, no fragment, no user information; and an
    RFC 3986 URI (ASCII, an ASCII host): the consent page shows it next to the client's name."""
    # An RFC 3986 URI (ASCII): the consent page shows it, so no look-alike Unicode host.
    parts = _split(url) if url.isascii() and URI_CHARS_RE.fullmatch(url) else None
    segments = parts.path.split("/") if parts is not None else []
    if (
        parts is None
        or BAD_PERCENT_RE.search(url)
        or not (HOST_RE.fullmatch(parts.hostname or "") or _is_ipv6_literal(parts))
        or parts.scheme != "https"
        or not parts.hostname
        or parts.path in ("", "/")
        or "." in segments
        or ".." in segments
        or parts.fragment
        or "#" in url
        or parts.username
        or parts.password
    ):
        raise InvalidClient(
            "a URL client_id must be an https URL (RFC 3986, ASCII: the host in IDNA A-label form) "
            "with a path, without dot segments, fragment or user information",
        )


def cache_ttl(headers) -> float:
    """Seconds to cache a metadata document, from Cache-Control, clamped to sane bounds."""
    control = (headers.get("Cache-Control", "") if headers else "").lower()
    if "no-store" in control or "no-cache" in control:
        return CIMD_MIN_TTL
    ttl = max_age(control)
    ttl = CIMD_DEFAULT_TTL if ttl is None else ttl
    return float(min(max(ttl, CIMD_MIN_TTL), CIMD_MAX_TTL))
