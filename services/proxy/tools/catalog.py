"""The tool catalog: the canonical hash of a tool definition, the diff of a fresh `tools/list`
against the stored catalog (appeared / changed / disappeared), approvals for pinning, and
`CatalogView`, the per-server facts the policy decides from. Pure, no I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

from services.common.errors import InvalidInput
from storage.tools import ToolChange, ToolEntry, ToolUpdate

from .policy import ToolFacts

# What the catalog keeps of a definition for display; the hash covers all of it.
MAX_TITLE = 200
MAX_DESCRIPTION = 4000
MAX_SCHEMA_BYTES = 32 * 1024
ANNOTATION_HINTS = ("title", "readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


def canonical_json(tool: Mapping) -> bytes:
    """The tool's canonical JSON: sorted keys, no whitespace, UTF-8. ValueError for what has
    no canonical form (NaN, infinities, lone surrogates)."""
    text = json.dumps(tool, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the tool definition is not valid Unicode text (a lone surrogate)") from None


def tool_hash(tool: Mapping) -> str:
    return hashlib.sha256(canonical_json(tool)).hexdigest()


def is_read_only(annotations: object) -> bool:
    """readOnlyHint is exactly true; anything else (absent, "true", 1) is not read-only."""
    return isinstance(annotations, Mapping) and annotations.get("readOnlyHint") is True


def entry_for(server_id: str, tool: Mapping, digest: str, now: float, before: ToolEntry | None = None) -> ToolEntry:
    """The catalog entry of a fresh definition (bounded for display); `before` is the
    stored entry it replaces, whose first sighting and approval it keeps."""
    title = tool.get("title")
    description = tool.get("description")
    schema = tool.get("inputSchema")
    if not isinstance(schema, Mapping) or len(canonical_json(schema)) > MAX_SCHEMA_BYTES:
        schema = {}
    annotations = tool.get("annotations")
    kept = {}
    if isinstance(annotations, Mapping):
        kept = {k: annotations[k] for k in ANNOTATION_HINTS
                if isinstance(annotations.get(k), bool) or (k == "title" and isinstance(annotations.get(k), str))}
        if isinstance(kept.get("title"), str):
            kept["title"] = kept["title"][:MAX_TITLE]
    return ToolEntry(
        server_id=server_id,
        name=tool["name"],
        title=title[:MAX_TITLE] if isinstance(title, str) else "",
        description=description[:MAX_DESCRIPTION] if isinstance(description, str) else "",
        input_schema=dict(schema),
        annotations=kept,
        hash=digest,
        first_seen=before.first_seen if before else now,
        last_changed=now,
        approved_hash=before.approved_hash if before else "",
    )


def diff(server_id: str, stored: Mapping[str, ToolEntry], fresh: Sequence[Mapping], hashes: Sequence[str],
         now: float, complete: bool) -> list[ToolUpdate]:
    """The updates that bring the catalog to a fresh listing (validated tools and their
    hashes). Disappearances only from a `complete` listing (every page, or a single page
    without nextCursor): one page of many says nothing about the tools on the others."""
    updates: list[ToolUpdate] = []
    for tool, digest in zip(fresh, hashes, strict=True):
        name = tool["name"]
        before = stored.get(name)
        if before is None:
            updates.append(ToolUpdate(ToolChange(server_id, now, name, "appeared", "", digest),
                                      entry_for(server_id, tool, digest, now)))
        elif before.hash != digest:
            updates.append(ToolUpdate(ToolChange(server_id, now, name, "changed", before.hash, digest),
                                      entry_for(server_id, tool, digest, now, before)))
    if complete:
        listed = {tool["name"] for tool in fresh}
        updates += [ToolUpdate(ToolChange(server_id, now, name, "disappeared", entry.hash, ""))
                    for name, entry in sorted(stored.items()) if name not in listed]
    return updates


def approvals(server_id: str, stored: Mapping[str, ToolEntry], names: Sequence[str] | None,
              now: float) -> list[ToolUpdate]:
    """Approve the current definition of `names` (None: every tool awaiting approval).
    InvalidInput for a name not in the catalog."""
    if names is None:
        names = [name for name, entry in sorted(stored.items()) if entry.approved_hash != entry.hash]
    else:
        unknown = [name for name in names if name not in stored]
        if unknown:
            raise InvalidInput(f"not in the catalog of {server_id}: {', '.join(map(repr, unknown[:5]))}"
                               " (the catalog fills from tools/list answers and Test connection)", "tools")
    return [ToolUpdate(ToolChange(server_id, now, name, "approved", stored[name].approved_hash, stored[name].hash))
            for name in dict.fromkeys(names) if stored[name].approved_hash != stored[name].hash]


class CatalogView:
    """A server's catalog as the proxy decides from it: entries and facts by name."""

    __slots__ = ("entries", "_facts")

    def __init__(self, entries: Iterable[ToolEntry]) -> None:
        self.entries: dict[str, ToolEntry] = {e.name: e for e in entries}
        self._facts = {name: ToolFacts(is_read_only(e.annotations), bool(e.approved_hash) and e.approved_hash == e.hash)
                       for name, e in self.entries.items()}

    def facts(self, name: str) -> ToolFacts | None:
        """The stored definition's facts (a tools/call), None when the tool is unknown."""
        return self._facts.get(name)

    def facts_for(self, tool: Mapping, digest: str) -> ToolFacts:
        """The facts of a freshly listed definition: its own annotations; approved only if
        exactly this definition (hash) was approved."""
        stored = self.entries.get(tool["name"])
        approved = stored is not None and bool(stored.approved_hash) and stored.approved_hash == digest
        return ToolFacts(is_read_only(tool.get("annotations")), approved)
