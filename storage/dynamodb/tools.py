"""Tool rules and the tool catalog on DynamoDB: rule attributes of server and grant items,
catalog entries and history lines in the server's own partition."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..tools import HISTORY_KEPT, ToolChange, ToolEntry, ToolRule, ToolStore, ToolUpdate
from .codecs import (
    TOOL_CHANGES,
    TOOL_ENTRIES,
    _encode,
    _esc,
    _Expr,
    _grant_key,
    _key,
    _server_key,
    _tool_key,
    _ts,
)

if TYPE_CHECKING:
    from .store import DynamoDBStorage

# Updates per transaction: two items each (the entry and its history line), 100 at most.
_GROUP = 50
_DEFINITION = ("title", "description", "input_schema", "annotations", "hash", "last_changed")
_sequence = itertools.count()


class DynamoDBTools(ToolStore):
    """`ToolStore` on the `SERVER#id` partitions (`TOOL#name`, `TOOLHIST#…` items) of its
    `DynamoDBStorage`'s table."""

    def __init__(self, store: DynamoDBStorage) -> None:
        self._store = store

    async def set_server_rule(self, server_id: str, rule: ToolRule, pinned: bool) -> bool:
        values = {**_rule_attributes(rule), "tools_pinned": {"BOOL": bool(pinned)}}
        return await self._store._run(self._set, _server_key(server_id), values)

    async def set_grant_rule(self, server_id: str, kind: str, value: str, rule: ToolRule) -> bool:
        return await self._store._run(self._set, _grant_key(server_id, kind, value), _rule_attributes(rule))

    def _set(self, key: dict, values: dict) -> bool:
        expr = _Expr()
        update = "SET " + ", ".join(f"{expr.n(name)} = {expr.v(value)}" for name, value in values.items())
        return self._store._update(key, expr, update, f"attribute_exists({expr.n('PK')})") is not None

    async def tool_catalog(self, server_id: str) -> list[ToolEntry]:
        items = await self._store._run(self._store._query_partition, f"SERVER#{_esc(server_id)}", "TOOL#")
        return sorted((TOOL_ENTRIES.decode(i) for i in items), key=lambda e: e.name)

    async def apply_tool_changes(self, server_id: str, updates: Sequence[ToolUpdate]) -> list[ToolChange]:
        if not updates:
            return []
        return await self._store._run(self._apply, server_id, list(updates))

    def _apply(self, server_id: str, updates: list[ToolUpdate]) -> list[ToolChange]:
        for update in updates:
            if update.change.server_id != server_id or (update.entry and update.entry.server_id != server_id):
                raise ValueError("a tool update for another server")
        applied: list[ToolChange] = []
        for group in _groups(updates):
            items = [item for update in group for item in self._items(server_id, update)]
            # The whole group at once; one stale condition cancels it, and then each update
            # goes alone (two items each, still all or nothing).
            if self._store._transact(items) is None:
                applied += [u.change for u in group]
                continue
            for update in group:
                if self._store._transact(self._items(server_id, update)) is None:
                    applied.append(update.change)
        if applied:
            self._trim_history(server_id)
        return applied

    def _items(self, server_id: str, update: ToolUpdate) -> list[dict]:
        change, table = update.change, self._store.table
        key = _tool_key(server_id, change.tool)
        expr = _Expr()
        if change.kind == "appeared":
            entry = _required(update.entry)
            op = {"Put": {"TableName": table, "Item": {**key, **TOOL_ENTRIES.encode(entry)},
                          **expr.params(ConditionExpression=f"attribute_not_exists({expr.n('PK')})")}}
        elif change.kind == "changed":
            encoded = TOOL_ENTRIES.encode(_required(update.entry))
            sets = ", ".join(f"{expr.n(c)} = {expr.v(encoded[c])}" for c in _DEFINITION)
            condition = f"{expr.n('hash')} = {expr.v({'S': change.old_hash})}"
            op = {"Update": {"TableName": table, "Key": key,
                             **expr.params(UpdateExpression=f"SET {sets}", ConditionExpression=condition)}}
        elif change.kind == "disappeared":
            condition = f"{expr.n('hash')} = {expr.v({'S': change.old_hash})}"
            op = {"Delete": {"TableName": table, "Key": key, **expr.params(ConditionExpression=condition)}}
        elif change.kind == "approved":
            new = expr.v({"S": change.new_hash})
            op = {"Update": {"TableName": table, "Key": key, **expr.params(
                UpdateExpression=f"SET {expr.n('approved_hash')} = {new}",
                ConditionExpression=f"{expr.n('hash')} = {new}")}}
        else:
            raise ValueError(f"unknown tool change {change.kind!r}")
        # The sequence orders one instance's lines of one instant; the random part keeps two
        # instances' lines of one instant apart.
        line = _key(f"SERVER#{_esc(server_id)}",
                    f"TOOLHIST#{_ts(change.at)}#{next(_sequence):012d}{os.urandom(4).hex()}")
        return [op, {"Put": {"TableName": table, "Item": {**line, **TOOL_CHANGES.encode(change)}}}]

    def _trim_history(self, server_id: str) -> None:
        lines = self._store._query_partition(
            f"SERVER#{_esc(server_id)}", "TOOLHIST#", ScanIndexForward=False, ProjectionExpression="PK, SK"
        )
        old = lines[HISTORY_KEPT:]
        self._store._batch_write([{"DeleteRequest": {"Key": _key(i["PK"]["S"], i["SK"]["S"])}} for i in old])

    async def tool_history(self, server_id: str, limit: int = 50) -> list[ToolChange]:
        items = await self._store._run(functools.partial(
            self._store._query_partition, f"SERVER#{_esc(server_id)}", "TOOLHIST#",
            ScanIndexForward=False, Limit=max(1, limit), limit=limit,
        ))
        return [TOOL_CHANGES.decode(i) for i in items][:limit]


def _rule_attributes(rule: ToolRule) -> dict[str, Any]:
    # The same encoding as the record codec: tuples as JSON text.
    return {
        "tools_allow": _encode(rule.allow, tuple[str, ...]),
        "tools_deny": _encode(rule.deny, tuple[str, ...]),
        "tools_read_only": {"BOOL": bool(rule.read_only)},
    }


def _groups(updates: list[ToolUpdate]) -> list[list[ToolUpdate]]:
    """Runs of at most _GROUP updates, never two for one tool (a transaction may not
    touch one item twice)."""
    groups: list[list[ToolUpdate]] = []
    names: set[str] = set()
    for update in updates:
        if not groups or len(groups[-1]) >= _GROUP or update.change.tool in names:
            groups.append([])
            names = set()
        groups[-1].append(update)
        names.add(update.change.tool)
    return groups


def _required(entry: ToolEntry | None) -> ToolEntry:
    if entry is None:
        raise ValueError("an appeared or changed tool needs its entry")
    return entry
