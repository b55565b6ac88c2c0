"""Logging vocabulary shared by every area: the request id of the request being served and
security events (one WARNING line each, on the `mcpgw.security` logger, with fields)."""

from __future__ import annotations

import contextvars
import logging

# Set by the handler for the request being served; read by the log formatter and by the
# proxy when it forwards X-Request-Id upstream. "-" outside a request.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

security_log = logging.getLogger("mcpgw.security")


def security_event(event: str, message: str, **fields: object) -> None:
    """One WARNING line an operator can alert on. `event` is a short stable name
    (``refresh_reuse``, ``access_denied``, ``key_rotated``…); fields are the standard log fields
    (``user_sub``, ``client_id``, ``server_id``…) and never a secret or token."""
    security_log.warning(message, extra={"event": event, **fields})
