"""Tool rules and the tool catalog on SQLite: rule columns of servers and grants, the
tool_catalog and tool_history tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..tools import HISTORY_KEPT, ToolChange, ToolEntry, ToolRule, ToolStore, ToolUpdate
from .codecs import TOOL_CATALOG, TOOL_HISTORY, _encode

if TYPE_CHECKING:
    from .store import SqliteStorage

_DEFINITION = ("title", "description", "input_schema", "annotations", "hash", "last_changed")


class SqliteTools(ToolStore):
    """`ToolStore` through the connections of its `SqliteStorage`."""

    def __init__(self, store: SqliteStorage) -> None:
        self._store = store

    async def set_server_rule(self, server_id: str, rule: ToolRule, pinned: bool) -> bool:
        changed = await self._store._run(
            self._store._change,
            "UPDATE servers SET tools_allow = ?, tools_deny = ?, tools_read_only = ?, tools_pinned = ? "
            "WHERE server_id = ?",
            _encode(rule.allow), _encode(rule.deny), int(rule.read_only), int(pinned), server_id,
        )
        return changed > 0

    async def set_grant_rule(self, server_id: str, kind: str, value: str, rule: ToolRule) -> bool:
        changed = await self._store._run(
            self._store._change,
            "UPDATE grants SET tools_allow = ?, tools_deny = ?, tools_read_only = ? "
            "WHERE server_id = ? AND kind = ? AND value = ?",
            _encode(rule.allow), _encode(rule.deny), int(rule.read_only), server_id, kind, value,
        )
        return changed > 0

    async def tool_catalog(self, server_id: str) -> list[ToolEntry]:
        return await self._store._read(self._store._all, TOOL_CATALOG, "server_id = ? ORDER BY name", server_id)

    async def apply_tool_changes(self, server_id: str, updates: Sequence[ToolUpdate]) -> list[ToolChange]:
        if not updates:
            return []
        return await self._store._run(self._apply, server_id, list(updates))

    def _apply(self, server_id: str, updates: list[ToolUpdate]) -> list[ToolChange]:
        applied: list[ToolChange] = []
        with self._store._write() as conn:
            for update in updates:
                change, entry = update.change, update.entry
                if change.server_id != server_id or (entry is not None and entry.server_id != server_id):
                    raise ValueError("a tool update for another server")
                if change.kind == "appeared":
                    done = conn.execute(f"{TOOL_CATALOG.insert} ON CONFLICT DO NOTHING",
                                        TOOL_CATALOG.encode(_required(entry))).rowcount
                elif change.kind == "changed":
                    entry = _required(entry)
                    sets = ", ".join(f'"{c}" = ?' for c in _DEFINITION)
                    done = conn.execute(
                        f"UPDATE tool_catalog SET {sets} WHERE server_id = ? AND name = ? AND hash = ?",
                        (*(_encode(getattr(entry, c)) for c in _DEFINITION), server_id, change.tool,
                         change.old_hash),
                    ).rowcount
                elif change.kind == "disappeared":
                    done = conn.execute("DELETE FROM tool_catalog WHERE server_id = ? AND name = ? AND hash = ?",
                                        (server_id, change.tool, change.old_hash)).rowcount
                elif change.kind == "approved":
                    done = conn.execute(
                        "UPDATE tool_catalog SET approved_hash = ? WHERE server_id = ? AND name = ? AND hash = ?",
                        (change.new_hash, server_id, change.tool, change.new_hash),
                    ).rowcount
                else:
                    raise ValueError(f"unknown tool change {change.kind!r}")
                if done:
                    conn.execute(TOOL_HISTORY.insert, TOOL_HISTORY.encode(change))
                    applied.append(change)
            if applied:
                conn.execute(
                    "DELETE FROM tool_history WHERE server_id = ? AND id <= (SELECT id FROM tool_history "
                    "WHERE server_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (server_id, server_id, HISTORY_KEPT),
                )
        return applied

    async def tool_history(self, server_id: str, limit: int = 50) -> list[ToolChange]:
        return await self._store._read(
            self._store._all, TOOL_HISTORY, "server_id = ? ORDER BY id DESC LIMIT ?", server_id, limit
        )


def _required(entry: ToolEntry | None) -> ToolEntry:
    if entry is None:
        raise ValueError("an appeared or changed tool needs its entry")
    return entry

