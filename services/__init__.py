"""Services: the gateway's in-process logic by area — `authserver`, `proxy`, `dashboard`, and
`common` (what they all share); `app` builds them once per process (wiring only here)."""

from services.app import Services, build_services

__all__ = ["Services", "build_services"]
