"""Rows <-> records: each record dataclass maps to one table whose columns are its fields
(`_Table`), plus the table of every record."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any, Generic, TypeVar, get_origin, get_type_hints

from ..base import (
    AuthCode,
    Client,
    Consent,
    Grant,
    McpSession,
    Pending,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Server,
    SigningKey,
    User,
)
from ..tools import ToolChange, ToolEntry
from ..usage import (
    ServerUser,
    UsageEvent,
)

R = TypeVar("R")  # a record dataclass


class _Table(Generic[R]):
    """How one record dataclass maps to one table: columns are the dataclass fields,
    in order, under the same names; tuples and dicts are JSON text, bools integers."""

    def __init__(self, name: str, record: type[R], key: tuple[str, ...]) -> None:
        self.name = name
        self.record = record
        self.columns = tuple(f.name for f in fields(record))
        hints = get_type_hints(record)
        self._decoders: tuple[Callable[[Any], Any] | None, ...] = tuple(
            _decoder_for(hints[column]) for column in self.columns
        )
        quoted = _quoted(self.columns)
        marks = ", ".join("?" for _ in self.columns)
        self.select = f"SELECT {quoted} FROM {name}"
        self.insert = f"INSERT INTO {name} ({quoted}) VALUES ({marks})"
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in self.columns if c not in key)
        self.upsert = f"{self.insert} ON CONFLICT ({_quoted(key)}) DO UPDATE SET {updates}"
        # Records of plain str/int/float fields only (usage events, by the thousand) are
        # stored as they are: one C-level attribute fetch, no per-value conversion.
        if all(hints[column] in (str, int, float) for column in self.columns):
            self.encode = attrgetter(*self.columns)  # type: ignore[method-assign]

    def encode(self, record: R) -> tuple[Any, ...]:
        return tuple(_encode(getattr(record, column)) for column in self.columns)

    def decode(self, row: tuple[Any, ...]) -> R:
        values = {
            column: value if decoder is None else decoder(value)
            for column, decoder, value in zip(self.columns, self._decoders, row, strict=True)
        }
        return self.record(**values)


def _quoted(columns: tuple[str, ...]) -> str:
    # Quoted because some field names ("key") are SQL keywords.
    return ", ".join(f'"{c}"' for c in columns)


def _decoder_for(hint: Any) -> Callable[[Any], Any] | None:
    if get_origin(hint) is tuple:
        return lambda text: tuple(json.loads(text))
    if hint is dict or get_origin(hint) is dict:
        return json.loads
    if hint is bool:
        return bool
    return None


def _encode(value: Any) -> Any:
    if isinstance(value, tuple | list | dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return int(value)
    return value


USERS = _Table("users", User, ("sub",))
CLIENTS = _Table("clients", Client, ("client_id",))
SERVERS = _Table("servers", Server, ("server_id",))
GRANTS = _Table("grants", Grant, ("server_id", "kind", "value"))
PENDING = _Table("pending", Pending, ("kind", "key"))
CODES = _Table("codes", AuthCode, ("code_hash",))
FAMILIES = _Table("refresh_families", RefreshFamily, ("family_id",))
REFRESH_TOKENS = _Table("refresh_tokens", RefreshToken, ("token_hash",))
CONSENTS = _Table("consents", Consent, ("user_sub", "client_id", "audience"))
SIGNING_KEYS = _Table("signing_keys", SigningKey, ("kid",))
REVOKED = _Table("revoked_access_tokens", RevokedAccessToken, ("jti",))
SESSIONS = _Table("sessions", McpSession, ("session_id",))
USAGE_EVENTS = _Table("usage_events", UsageEvent, ())
SERVER_USERS = _Table("usage_users", ServerUser, ("server_id", "user_sub"))
TOOL_CATALOG = _Table("tool_catalog", ToolEntry, ("server_id", "name"))
TOOL_HISTORY = _Table("tool_history", ToolChange, ())
