"""Persistence behind one interface: `open_storage(url)` picks the backend named by
MCPGW_STORAGE and returns an unopened `Storage` (call `await storage.open()`)."""

from __future__ import annotations

from .base import (
    AuthCode,
    Client,
    Conflict,
    Consent,
    Grant,
    McpSession,
    Pending,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Server,
    SigningKey,
    Storage,
    StorageError,
    UsageAggregate,
    UsageEvent,
    User,
)
from .sqlite import SqliteStorage

__all__ = [
    "AuthCode",
    "Client",
    "Conflict",
    "Consent",
    "Grant",
    "McpSession",
    "Pending",
    "RefreshFamily",
    "RefreshToken",
    "RevokedAccessToken",
    "Server",
    "SigningKey",
    "SqliteStorage",
    "Storage",
    "StorageError",
    "UsageAggregate",
    "UsageEvent",
    "User",
    "open_storage",
]

SQLITE_PREFIX = "sqlite:///"
EXPECTED = (
    "expected sqlite:///relative/path, sqlite:////absolute/path "
    "or dynamodb://TABLE?region=R&endpoint=URL"
)


def open_storage(url: str) -> Storage:
    """The backend for a MCPGW_STORAGE URL; ValueError with one clear sentence when the
    URL is not usable. Opening (schema creation, connections) is left to `open()`."""
    url = url.strip()
    if not url:
        raise ValueError(f"MCPGW_STORAGE is empty; {EXPECTED}")
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        return SqliteStorage(_sqlite_path(url))
    if scheme == "dynamodb":
        raise ValueError("MCPGW_STORAGE: the DynamoDB backend is not available yet")
    raise ValueError(f"MCPGW_STORAGE: unsupported storage URL {url!r}; {EXPECTED}")


def _sqlite_path(url: str) -> str:
    """SQLAlchemy style: three slashes then the path, so an absolute path has four."""
    if not url.lower().startswith(SQLITE_PREFIX):
        # sqlite://host/... or sqlite:relative: a host part or a missing slash is
        # almost always a typo for one slash too few.
        raise ValueError(f"MCPGW_STORAGE: bad SQLite URL {url!r}; {EXPECTED}")
    path = url[len(SQLITE_PREFIX) :]
    if not path:
        raise ValueError(f"MCPGW_STORAGE: SQLite URL {url!r} names no file; {EXPECTED}")
    if "?" in path or "#" in path:
        raise ValueError(
            f"MCPGW_STORAGE: SQLite URL {url!r} has query or fragment parts, "
            "which are not supported"
        )
    if path.endswith("/"):
        raise ValueError(f"MCPGW_STORAGE: SQLite URL {url!r} names a directory, not a file")
    return path
