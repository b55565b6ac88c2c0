"""The dashboard's side of tool policy: what a server page shows of it (the owner's rules,
catalog, approvals and history; a user's own tools) and reading a rule from a form or JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import BadRequest, FieldErrors, InvalidInput
from services.dashboard.forms import form_bool, sentence
from services.dashboard.probe import ProbeResult
from services.dashboard.views import rule_dict
from services.proxy.tools.catalog import CatalogView, is_read_only
from services.proxy.tools.filtering import ToolListError, read_tools_result
from services.proxy.tools.policy import ToolDecision, ToolPolicy, unmatched
from services.proxy.tools.service import ToolService
from storage.base import Server, StorageError
from storage.tools import ToolChange, ToolEntry, ToolRule

# A form's check boxes for catalog tools are named "allow:NAME" and "deny:NAME" (a form
# parameter may appear once), beside free text fields for globs and names not listed yet.
ALLOW_BOX, DENY_BOX = "allow:", "deny:"
# Up to this many catalog tools are offered as check boxes in each rule form; beyond it
# (a page with a rule form per grant would grow by grants x tools) the rule is text only.
PICK_LIMIT = 100
RULE_FIELDS = ("tools_allow", "tools_deny", "read_only", "pinned", "clear")


def entry_dict(entry: ToolEntry) -> dict:
    return {
        "name": entry.name, "title": entry.title, "description": entry.description,
        "annotations": entry.annotations, "read_only": is_read_only(entry.annotations),
        "input_schema": entry.input_schema, "first_seen": entry.first_seen, "last_changed": entry.last_changed,
    }


def change_dict(change: ToolChange) -> dict:
    return {"at": change.at, "tool": change.tool, "kind": change.kind,
            "old_hash": change.old_hash[:12], "new_hash": change.new_hash[:12]}


@dataclass
class ToolRow:
    """One catalog tool as its owner sees it: the definition, and whether the server's
    default rule and pinning let it through (for everyone, the owner included)."""

    entry: ToolEntry
    decision: ToolDecision
    awaiting: bool  # pinned, and this definition is not the approved one

    @property
    def read_only(self) -> bool:
        return is_read_only(self.entry.annotations)

    def as_dict(self) -> dict:
        return {**entry_dict(self.entry), "available": self.decision.allowed, "reason": self.decision.reason,
                "awaiting_approval": self.awaiting}


@dataclass
class ToolPanel:
    """The owner's (or an administrator's) tool section of a server page."""

    server: Server
    rows: list[ToolRow]
    history: list[ToolChange]

    @property
    def rule(self) -> ToolRule:
        return ToolRule.of(self.server)

    @property
    def pinned(self) -> bool:
        return self.server.tools_pinned

    @property
    def names(self) -> list[str]:
        return [row.entry.name for row in self.rows]

    @property
    def pick_names(self) -> list[str]:
        """The names offered as check boxes in rule forms."""
        return self.names if len(self.rows) <= PICK_LIMIT else []

    @property
    def awaiting(self) -> list[ToolRow]:
        return [row for row in self.rows if row.awaiting]

    def unmatched(self, rule: ToolRule) -> list[str]:
        """The rule's names and globs that match no catalog tool: a typo, or a tool not
        listed yet (a warning on the page, not an error)."""
        return unmatched((*rule.allow, *rule.deny), self.names) if self.rows else []

    def form(self, rule: ToolRule, pinned: bool = False) -> RuleForm:
        """The form showing a stored rule (the default's, or a grant's)."""
        return RuleForm.of(rule, self.pick_names, pinned)

    def as_dict(self) -> dict:
        return {"rule": {**rule_dict(self.rule), "pinned": self.pinned},
                "catalog": [row.as_dict() for row in self.rows],
                "awaiting_approval": [row.entry.name for row in self.awaiting]}


def panel(server: Server, entries: Sequence[ToolEntry], history: list[ToolChange]) -> ToolPanel:
    view = CatalogView(entries)
    policy = ToolPolicy(ToolRule.of(server), None, server.tools_pinned)  # the default, as for the owner
    rows = [ToolRow(entry, policy.decide(name, view.facts(name)),
                    server.tools_pinned and entry.approved_hash != entry.hash)
            for name, entry in sorted(view.entries.items())]
    return ToolPanel(server, rows, history)


@dataclass
class RuleForm:
    """A rule form as it is shown again after an error (the text as typed)."""

    allow: set[str]
    deny: set[str]
    allow_text: str
    deny_text: str
    read_only: bool
    pinned: bool = False

    @classmethod
    def of(cls, rule: ToolRule, names: Sequence[str], pinned: bool = False) -> RuleForm:
        """A stored rule: exact catalog names as ticked boxes, the rest as text."""
        known = set(names)
        return cls({p for p in rule.allow if p in known}, {p for p in rule.deny if p in known},
                   " ".join(p for p in rule.allow if p not in known),
                   " ".join(p for p in rule.deny if p not in known), rule.read_only, pinned)

    @classmethod
    def posted(cls, form: dict) -> RuleForm:
        return cls({k[len(ALLOW_BOX):] for k in form if k.startswith(ALLOW_BOX)},
                   {k[len(DENY_BOX):] for k in form if k.startswith(DENY_BOX)},
                   form.get("tools_allow", ""), form.get("tools_deny", ""),
                   form_bool(form.get("read_only")), form_bool(form.get("pinned")))


def rule_from_form(form: dict, *, with_pinning: bool) -> dict:
    """A posted rule form as ToolService keyword arguments: the form is the whole rule (an
    unticked box sends nothing), so every part is given; ticked names first, then the text."""
    posted = RuleForm.posted(form)
    changes: dict = {
        "allow": [*sorted(posted.allow), posted.allow_text],
        "deny": [*sorted(posted.deny), posted.deny_text],
        "read_only": posted.read_only,
    }
    if with_pinning:
        changes["pinned"] = posted.pinned
    return changes


def rule_from_json(body: dict, *, with_pinning: bool, also: tuple[str, ...] = ()) -> dict:
    """A JSON body's rule members as ToolService keyword arguments (absent: unchanged);
    `also`: other members the body may have (a new grant's kind and value)."""
    allowed = RULE_FIELDS if with_pinning else tuple(f for f in RULE_FIELDS if f != "pinned")
    unknown = sorted(k for k in body if k not in allowed and k not in also)
    if unknown:
        raise BadRequest(f"unknown member {unknown[0]!r}: a tool rule has {', '.join(allowed)}")
    for flag in ("read_only", "pinned", "clear"):
        if flag in body and not isinstance(body[flag], bool):
            raise FieldErrors({flag: f"{flag} must be true or false."})
    changes = {"allow": body.get("tools_allow"), "deny": body.get("tools_deny"),
               "read_only": body.get("read_only"), "clear": bool(body.get("clear", False))}
    if with_pinning:
        changes["pinned"] = body.get("pinned")
    return changes


def field_errors(exc: InvalidInput) -> FieldErrors:
    return FieldErrors({exc.field or "tools_allow": sentence(str(exc))})


async def refresh_catalog(tools: ToolService, server_id: str, result: ProbeResult) -> None:
    """The tools the probe listed into the server's catalog (tools/list answers the
    proxy relays do the same); a list that cannot be read changes nothing."""
    try:
        if result.tools_complete:
            changes = await tools.observe_probe(server_id, result.tool_defs)
        else:  # more pages than the probe reads: no tool can be seen to have gone
            listed, hashes, _ = read_tools_result({"tools": result.tool_defs})
            changes = await tools.observe(server_id, listed, hashes, complete=False)
    except ToolListError as exc:
        result.catalog = f"The tool catalog is not updated: {exc}."
        return
    except StorageError:
        result.catalog = "The tool catalog could not be updated (storage); try again."
        return
    counts = {kind: sum(c.kind == kind for c in changes) for kind in ("appeared", "changed", "disappeared")}
    said = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    result.catalog = f"Tool catalog updated: {said}." if said else "Tool catalog: no change."
