"""ToolService: tool rules and the tool catalog for the proxy (decisions, filtering, recording
what upstreams list, from per-process caches), the dashboard and the CLI (rules, approvals)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from services.common.access import AccessPolicy, Principal
from services.common.errors import InvalidInput
from services.common.logs import security_event
from services.common.metrics import CATALOGUE
from services.common.servers import check_domain, check_email
from storage.base import Grant, Server, Storage, StorageError
from storage.tools import ToolChange, ToolEntry, ToolRule

from .catalog import CatalogView, approvals, diff
from .filtering import ToolListing, dump_message, read_tools_result
from .policy import ALLOWED, ToolDecision, ToolPolicy, parse_patterns, policy_for, unmatched

log = logging.getLogger("gateway.tools")

# The same bounds as the sharing rules (services/common/access.py): a change made on another
# instance is seen within CACHE_TTL; while storage fails, a cached catalog serves this much
# longer, then callers wait and errors surface (fail closed).
CACHE_TTL = 3.0
STALE_FOR = 30.0
CACHE_SIZE = 10000
CHANGE_METRIC = "tool_changes_total"  # {kind}: declared in the metrics catalogue


@dataclass(frozen=True)
class RuleChange:
    """What a rule edit stored, and patterns in it that match no tool of the catalog."""

    rule: ToolRule
    pinned: bool
    warnings: list[str]


class ToolService:
    def __init__(self, storage: Storage, access: AccessPolicy, metrics=None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ttl: float = CACHE_TTL, stale_for: float = STALE_FOR) -> None:
        self._storage = storage
        self._access = access
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._ttl = ttl
        self._stale_for = stale_for
        self._views: dict[str, tuple[float, CatalogView]] = {}
        self._loading: dict[str, asyncio.Task[CatalogView]] = {}
        # (server id, principal) -> (server record, grants tuple, policy): valid while the
        # access cache hands out the very same records (identity, not equality: cheap).
        self._policies: dict[tuple[str, Principal], tuple[Server, Sequence[Grant], ToolPolicy]] = {}

    # ---------------------------------------------------------------- the proxy's calls

    def policy(self, principal: Principal, server: Server, grants: Sequence[Grant]) -> ToolPolicy:
        """The caller's policy on `server` (records from the access cache), cached."""
        key = (server.server_id, principal)
        cached = self._policies.get(key)
        if cached is not None and cached[0] is server and cached[1] is grants:
            return cached[2]
        policy = policy_for(principal, server, grants)
        if len(self._policies) >= CACHE_SIZE:
            self._policies.clear()
        self._policies[key] = (server, grants, policy)
        return policy

    async def decide_call(self, principal: Principal, server: Server, grants: Sequence[Grant],
                          tool: str) -> ToolDecision:
        """May this caller call `tool` (a tools/call)? No catalog read when nothing limits them."""
        policy = self.policy(principal, server, grants)
        if policy.unrestricted:
            return ALLOWED
        view = await self.view(server.server_id)
        return policy.decide(tool, view.facts(tool))

    async def filter_listing(self, principal: Principal, server: Server, grants: Sequence[Grant],
                             listing: ToolListing, complete: bool) -> bytes:
        """Record a parsed tools/list answer in the catalog, then render it with only the
        tools this caller may use. `complete`: the request had no cursor and the answer has
        no nextCursor (only then can a tool be seen to have disappeared)."""
        return dump_message(await self.filter_listing_message(principal, server, grants, listing, complete))

    async def filter_listing_message(self, principal: Principal, server: Server, grants: Sequence[Grant],
                                     listing: ToolListing, complete: bool) -> dict:
        """`filter_listing` as a message object (for a member of a JSON-RPC batch)."""
        if not listing.is_error:
            try:
                await self.observe(server.server_id, listing.tools, listing.hashes, complete)
            except StorageError as exc:
                # Filtering does not depend on this write (fresh definitions, approvals from
                # the view); the catalog catches up at the next listing.
                log.warning("tool catalog of %s not updated: %s", server.server_id, exc)
        policy = self.policy(principal, server, grants)
        if policy.unrestricted:
            return listing.filtered(lambda tool, digest: True)
        view = await self.view(server.server_id)
        return listing.filtered(lambda tool, digest: policy.decide(tool["name"], view.facts_for(tool, digest)).allowed)

    async def observe(self, server_id: str, tools: Sequence[dict], hashes: Sequence[str],
                      complete: bool) -> list[ToolChange]:
        """Bring the catalog to what the upstream listed (validated tools and hashes); the
        changes this instance applied are logged and counted (another instance applying the
        same change first: nothing here). Cheap when nothing changed: one cached view."""
        view = await self.view(server_id)
        updates = diff(server_id, view.entries, tools, hashes, self._wall(), complete)
        if not updates:
            return []
        applied = await self._storage.tools.apply_tool_changes(server_id, updates)
        self.forget(server_id)
        self._report(server_id, applied, first=not view.entries)
        return applied

    async def observe_probe(self, server_id: str, tools: list) -> list[ToolChange]:
        """Test connection's complete tools/list (every page's tools): refresh the catalog."""
        checked, hashes, _ = read_tools_result({"tools": tools})
        return await self.observe(server_id, checked, hashes, complete=True)

    async def view(self, server_id: str) -> CatalogView:
        """The server's catalog, fresh for CACHE_TTL; one storage read at a time per server."""
        now = self._clock()
        cached = self._views.get(server_id)
        if cached is not None and now < cached[0]:
            return cached[1]
        loading = self._loading.get(server_id)
        if loading is None:
            loading = self._loading[server_id] = asyncio.create_task(self._load(server_id))
            loading.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            return await asyncio.shield(loading)
        except Exception as exc:
            if cached is not None and now < cached[0] + self._stale_for:
                log.warning("tool catalog of %s not refreshed, serving the cached one: %s", server_id, exc)
                return cached[1]
            raise

    async def _load(self, server_id: str) -> CatalogView:
        me = asyncio.current_task()
        try:
            view = CatalogView(await self._storage.tools.tool_catalog(server_id))
            if self._loading.get(server_id) is me:  # not disowned by forget() meanwhile
                if len(self._views) >= CACHE_SIZE:
                    self._views.clear()
                self._views[server_id] = (self._clock() + self._ttl, view)
            return view
        finally:
            if self._loading.get(server_id) is me:
                del self._loading[server_id]

    def forget(self, server_id: str) -> None:
        """Drop this instance's cached catalog after a local change (others see it within
        CACHE_TTL)."""
        self._views.pop(server_id, None)
        self._loading.pop(server_id, None)

    def _report(self, server_id: str, applied: list[ToolChange], first: bool) -> None:
        if not applied:
            return
        if self._metrics is not None and self._counts_changes():
            for change in applied:
                self._metrics.inc(CHANGE_METRIC, kind=change.kind)
        if first and all(c.kind == "appeared" for c in applied):
            log.info("tool catalog of %s: %d tools seen for the first time", server_id, len(applied),
                     extra={"server_id": server_id})
            return
        for change in applied:
            security_event(f"tool_{change.kind}", f"tool {change.tool!r} of {server_id} {change.kind}",
                           server_id=server_id, tool=change.tool, old_hash=change.old_hash[:12],
                           new_hash=change.new_hash[:12])

    def _counts_changes(self) -> bool:
        return CHANGE_METRIC in CATALOGUE

    # ------------------------------------------------------ the dashboard's and the CLI's

    async def set_server_rule(self, server_id: str, *, allow: object = None, deny: object = None,
                              read_only: bool | None = None, pinned: bool | None = None,
                              clear: bool = False) -> RuleChange:
        """Change the server's default rule: what is given replaces that part (`clear`
        first empties the rule; pinning changes only when given). Pinning switched on
        approves the definitions in the catalog now, so only later changes wait."""
        server = await self._server(server_id)
        rule = _edited(ToolRule() if clear else ToolRule.of(server), allow, deny, read_only)
        pin = server.tools_pinned if pinned is None else bool(pinned)
        if pin and not server.tools_pinned:
            await self.approve(server_id, None)
        if not await self._storage.tools.set_server_rule(server_id, rule, pin):
            raise InvalidInput(f"there is no server {server_id}")
        self._access.forget(server_id)
        return RuleChange(rule, pin, await self._warnings(server_id, rule))

    async def add_grant(self, server_id: str, kind: str, value: str, *, allow: object = None,
                        deny: object = None, read_only: bool = False) -> Grant:
        """Share the server with an e-mail or domain under a tool rule, in one write (never
        a moment without the narrowing). A grant that exists already is refused when a
        rule is given (edit it instead), returned as it is when none is."""
        await self._server(server_id)
        value = _grant_value(kind, value)
        rule = _edited(ToolRule(), allow, deny, read_only)
        grant = Grant(server_id, kind, value, self._wall(), rule.allow, rule.deny, rule.read_only)
        if not await self._storage.add_grant(grant):
            existing = await self._grant(server_id, kind, value)
            if not rule.empty and ToolRule.of(existing) != rule:
                raise InvalidInput(f"{server_id} is shared with {kind} {value} already: "
                                   "change its tool rule with `grants edit`", "value")
            return existing
        self._access.forget(server_id)
        return grant

    async def edit_grant(self, server_id: str, kind: str, value: str, *, allow: object = None,
                         deny: object = None, read_only: bool | None = None, clear: bool = False) -> Grant:
        grant = await self._grant(server_id, kind, _grant_value(kind, value))
        rule = _edited(ToolRule() if clear else ToolRule.of(grant), allow, deny, read_only)
        if not await self._storage.tools.set_grant_rule(server_id, grant.kind, grant.value, rule):
            raise InvalidInput(f"{server_id} has no {kind} grant for {grant.value}", "value")
        self._access.forget(server_id)
        return replace(grant, tools_allow=rule.allow, tools_deny=rule.deny, tools_read_only=rule.read_only)

    async def rules(self, server_id: str) -> tuple[Server, list[Grant]]:
        server = await self._server(server_id)
        return server, await self._storage.grants_for(server_id)

    async def catalog(self, server_id: str) -> list[ToolEntry]:
        await self._server(server_id)
        return await self._storage.tools.tool_catalog(server_id)

    async def history(self, server_id: str, limit: int = 50) -> list[ToolChange]:
        await self._server(server_id)
        return await self._storage.tools.tool_history(server_id, max(1, min(limit, 500)))

    async def approve(self, server_id: str, names: Sequence[str] | None = None) -> list[ToolChange]:
        """Approve the current definition of `names` (None or empty: every tool awaiting
        approval); a name not in the catalog is refused."""
        await self._server(server_id)
        stored = {e.name: e for e in await self._storage.tools.tool_catalog(server_id)}
        updates = approvals(server_id, stored, list(names) if names else None, self._wall())
        applied = await self._storage.tools.apply_tool_changes(server_id, updates)
        self.forget(server_id)
        self._report(server_id, applied, first=False)
        return applied

    async def tools_for(self, principal: Principal, server: Server,
                        grants: Sequence[Grant]) -> list[tuple[ToolEntry, ToolDecision]]:
        """Every catalog tool of the server with this person's decision (the dashboard's
        "which tools may I call")."""
        policy = policy_for(principal, server, grants)
        view = CatalogView(await self._storage.tools.tool_catalog(server.server_id))
        return [(entry, policy.decide(name, view.facts(name))) for name, entry in view.entries.items()]

    async def _server(self, server_id: str) -> Server:
        server = await self._storage.get_server(server_id) if isinstance(server_id, str) else None
        if server is None:
            raise InvalidInput(f"there is no server {server_id}")
        return server

    async def _grant(self, server_id: str, kind: str, value: str) -> Grant:
        for grant in await self._storage.grants_for(server_id):
            if (grant.kind, grant.value) == (kind, value):
                return grant
        raise InvalidInput(f"{server_id} has no {kind} grant for {value}", "value")

    async def _warnings(self, server_id: str, rule: ToolRule) -> list[str]:
        names = [e.name for e in await self._storage.tools.tool_catalog(server_id)]
        if not names:
            return []
        return [f"{pattern!r} matches no tool of {server_id} yet ({len(names)} in its catalog)"
                for pattern in unmatched((*rule.allow, *rule.deny), names)]


def _edited(rule: ToolRule, allow: object, deny: object, read_only: bool | None) -> ToolRule:
    """`rule` with the parts that are given replaced, validated."""
    if read_only is not None and not isinstance(read_only, bool):
        raise InvalidInput("read-only must be true or false", "read_only")
    return ToolRule(
        rule.allow if allow is None else parse_patterns(allow, "tools_allow"),
        rule.deny if deny is None else parse_patterns(deny, "tools_deny"),
        rule.read_only if read_only is None else read_only,
    )


def _grant_value(kind: str, value: object) -> str:
    if kind == "email":
        return check_email(value, "value")
    if kind == "domain":
        return check_domain(value, "value")
    raise InvalidInput("a grant is for an e-mail address or a domain", "kind")
