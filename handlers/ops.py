"""Operations endpoints: /healthz (the process answers), /readyz (storage can take a write,
answered within a second; 503 from the moment a drain begins) and /metrics (Prometheus
text format of every worker, for loopback callers or holders of MCPGW_METRICS_TOKEN)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress

from handlers.base import BaseHandler
from storage.base import StorageError, StorageUnavailable

READY_TIMEOUT = 1.0  # seconds; a probe that takes longer counts as not ready


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.finish("ok\n")


class ReadyHandler(BaseHandler):
    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.set_header("Cache-Control", "no-store")
        if self.services.draining.is_set():
            self._not_ready("draining (shutting down)")
            return
        try:
            await asyncio.wait_for(self.services.storage.ping(), READY_TIMEOUT)
        except TimeoutError:
            self._not_ready(f"storage did not answer within {READY_TIMEOUT:g} s")
            return
        except StorageUnavailable as exc:
            self.set_header("Retry-After", str(exc.retry_after))
            self._not_ready(f"storage cannot write: {exc}")
            return
        except (StorageError, OSError) as exc:
            self._not_ready(f"storage unavailable: {type(exc).__name__}")
            return
        self.finish("ready\n")

    def _not_ready(self, why: str) -> None:
        self.set_status(503)
        self.finish(f"not ready: {why}\n")


class MetricsHandler(BaseHandler):
    """Counters tell who uses what and how much: not for anyone who can reach the port."""

    def get(self) -> None:
        if not (self._has_token() or self._from_loopback()):
            self.set_status(403)
            self.set_header("Content-Type", "text/plain")
            self.finish("/metrics is served to loopback callers, or with "
                        "Authorization: Bearer <MCPGW_METRICS_TOKEN>\n")
            return
        body, content_type = self.services.metrics.render()
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)

    def _has_token(self) -> bool:
        expected = self.config.metrics_token
        scheme, _, presented = self.request.headers.get("Authorization", "").partition(" ")
        if not expected or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), expected.encode())

    def _from_loopback(self) -> bool:
        if self.config.trust_forwarded and (
            "X-Forwarded-For" in self.request.headers or "X-Real-Ip" in self.request.headers
        ):
            # A reverse proxy on this host makes every caller look like loopback; a request
            # it forwarded names its real client, who is not this host.
            return False
        try:
            address = ipaddress.ip_address(self.request.remote_ip or "")
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback
