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
    ToolChange,
    ToolEntry,
    ToolRule,
    ToolStore,
    ToolUpdate,
    UsageAggregate,
    UsageEvent,
    UsageStore,
    User,
)
from .dynamodb import DynamoDBStorage
from .sqlite import SqliteStorage
from .urls import open_storage

__all__ = [
    "AuthCode",
    "Client",
    "Conflict",
    "Consent",
    "DynamoDBStorage",
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
    "ToolChange",
    "ToolEntry",
    "ToolRule",
    "ToolStore",
    "ToolUpdate",
    "UsageAggregate",
    "UsageEvent",
    "UsageStore",
    "User",
    "open_storage",
]
