"""Operations endpoints: /healthz (the process answers), /readyz (storage answers) and
/metrics (Prometheus text format)."""

from __future__ import annotations

from handlers.base import BaseHandler
from storage.base import StorageError


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.finish("ok\n")


class ReadyHandler(BaseHandler):
    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        try:
            await self.services.storage.ping()
        except (StorageError, OSError) as exc:
            self.set_status(503)
            self.finish(f"storage unavailable: {type(exc).__name__}\n")
            return
        self.finish("ready\n")


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.finish(self.services.metrics.render())
