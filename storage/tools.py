"""Tool policy records and the tool catalog behind their own small interface: the rule
(`ToolRule`) stored on a Server (its default) and on each Grant, the catalog entries of a
server's tools, their change history, and `ToolStore`, offered by every backend as
`Storage.tools`. Writer and reader: `services.proxy.tools.service.ToolService`."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

# Change history lines kept per server (oldest dropped first), on both backends.
HISTORY_KEPT = 200
CHANGE_KINDS = ("appeared", "changed", "disappeared", "approved")


@dataclass(frozen=True)
class ToolRule:
    """Which tools a rule lets through. `allow` empty: every tool (there is no allow list;
    deny `*` denies all); `deny` wins over `allow`; `read_only`: only tools the catalog
    says are read-only. Entries are tool names or `*`/`?` globs, validated by
    services.proxy.tools.policy before they are stored."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    read_only: bool = False

    @classmethod
    def of(cls, record) -> ToolRule:
        """The rule stored on a Server (its default rule) or a Grant."""
        return cls(tuple(record.tools_allow), tuple(record.tools_deny), bool(record.tools_read_only))

    @property
    def empty(self) -> bool:
        return not (self.allow or self.deny or self.read_only)


@dataclass(frozen=True)
class ToolEntry:
    """One tool of a server as last seen in a `tools/list` answer. `hash` is the SHA-256
    of the tool's whole canonical JSON; title, description and schemas are kept for
    display (bounded by the catalog code, the hash covers everything)."""

    server_id: str
    name: str
    title: str
    description: str
    input_schema: dict = field(compare=True, hash=False)
    annotations: dict = field(compare=True, hash=False)
    hash: str
    first_seen: float
    last_changed: float
    approved_hash: str = ""  # the definition the owner approved (pinning); "" none


@dataclass(frozen=True)
class ToolChange:
    """One line of a server's tool history."""

    server_id: str
    at: float
    tool: str
    kind: str  # appeared | changed | disappeared | approved
    old_hash: str = ""  # the stored definition the change replaces ("" for appeared)
    new_hash: str = ""  # the new (or approved) definition ("" for disappeared)


@dataclass(frozen=True)
class ToolUpdate:
    """A catalog write and its history line, applied only if the stored entry is still the
    one the change was computed from: appeared - no entry; changed, disappeared - the entry
    has `old_hash`; approved - the entry has `new_hash`. `entry` is the new definition
    (appeared, changed), else None."""

    change: ToolChange
    entry: ToolEntry | None = None


class ToolStore(abc.ABC):
    """Tool rules and the tool catalog. All methods are async; a backend's ToolStore
    shares its Storage's connections and errors (StorageError, StorageUnavailable). The
    rules themselves are fields of Server and Grant (read with them, so the access cache
    carries them); these methods change them without rewriting the rest of the record."""

    @abc.abstractmethod
    async def set_server_rule(self, server_id: str, rule: ToolRule, pinned: bool) -> bool:
        """Set the server's default rule and pinning; False when there is no such server."""

    @abc.abstractmethod
    async def set_grant_rule(self, server_id: str, kind: str, value: str, rule: ToolRule) -> bool:
        """Set the rule of an existing grant; False when there is no such grant."""

    @abc.abstractmethod
    async def tool_catalog(self, server_id: str) -> list[ToolEntry]:
        """The server's catalog, by name (a strongly consistent read)."""

    @abc.abstractmethod
    async def apply_tool_changes(self, server_id: str, updates: Sequence[ToolUpdate]) -> list[ToolChange]:
        """Apply each update whose condition holds (see ToolUpdate), with its history line,
        each all or nothing; returns the changes applied. Two instances applying the same
        change: one wins, so each change is logged once. Keeps the HISTORY_KEPT newest
        history lines of the server."""

    @abc.abstractmethod
    async def tool_history(self, server_id: str, limit: int = 50) -> list[ToolChange]:
        """The newest `limit` history lines of the server, newest first."""
