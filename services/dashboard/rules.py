"""The owner dashboard's rules, shared by its pages, its JSON API and the CLI: who may see,
change, share, test, delete and read the usage of which server (owner or admin; people it
is shared with see only its install panel), registration with field errors, the sharing
list, and the signed-in user's authorizations. Every method takes the Actor and checks."""

from __future__ import annotations

import time
from collections.abc import Callable

from config import Config
from services.authserver.clients import ClientRegistry
from services.authserver.redirect_uris import redirect_host
from services.authserver.tokens import TokenService
from services.common.access import AccessPolicy, Principal, decide_for
from services.common.errors import FieldErrors, Forbidden, InvalidInput, NotFound, NotSignedIn, OAuthError
from services.common.logs import security_event
from services.common.servers import (
    ServerRegistry,
    check_domain,
    check_email,
    check_name,
    check_upstream_url,
    parse_header,
)
from services.dashboard.forms import form_bool, header_lines, sentence, upstream_form
from services.dashboard.install import install_snippets
from services.dashboard.probe import McpProbe, ProbeResult, account_needed
from services.dashboard.reports import UsageReport, UsageReports
from services.dashboard.tools import ToolPanel, field_errors, panel, refresh_catalog
from services.dashboard.views import Actor, Authorization, GrantView, Reached, ServerView
from services.proxy.tools.service import RuleChange, ToolService
from services.proxy.upstream.errors import UpstreamError, UpstreamRefused, UpstreamTimeout
from services.proxy.upstream_auth.errors import UpstreamAuthError
from storage.base import Grant, Server, Storage
from storage.tools import ToolChange, ToolEntry


class Dashboard:
    def __init__(self, storage: Storage, servers: ServerRegistry, access: AccessPolicy,
                 tokens: TokenService, clients: ClientRegistry, probe: McpProbe,
                 reports: UsageReports, config: Config, *, now: Callable[[], float] = time.time,
                 tools: ToolService | None = None):
        self._storage = storage
        self._now = now
        self._servers = servers
        self._access = access
        self._tokens = tokens
        self._clients = clients
        self._probe = probe
        self._reports = reports
        self._config = config
        self._tools = tools

    # ------------------------------------------------------------------ who

    async def actor(self, signed_in: dict | None) -> Actor:
        """The Actor of a sign-in cookie; NotSignedIn when there is none (or the account is gone)."""
        if not signed_in or not signed_in.get("sub"):
            raise NotSignedIn("sign in to use the dashboard")
        user = await self._storage.get_user(signed_in["sub"])
        if user is None:
            raise NotSignedIn("your account is unknown here; sign in again")
        return Actor.of(user, self._config.admin_emails)

    def role(self, actor: Actor, server: Server) -> str | None:
        if decide_for(_principal(actor), server, ()).allowed:  # no grants: only the owner
            return "owner"
        if actor.is_admin:
            return "admin"
        return None

    async def _server(self, actor: Actor, server_id: str) -> tuple[Server, str]:
        """The server and the actor's role on it; NotFound when the actor may not even use it
        (the same answer as for a server that does not exist: ids are not disclosed)."""
        server = await self._storage.get_server(server_id) if server_id else None
        if server is None:
            raise NotFound("there is no such server")
        role = self.role(actor, server)
        if role is None:
            grants = tuple(await self._storage.grants_for(server_id))
            decision = decide_for(_principal(actor), server, grants)
            role = decision.reason if decision.allowed else None
        if role is None:
            raise NotFound("there is no such server")
        return server, role

    async def _managed(self, actor: Actor, server_id: str) -> Server:
        server, role = await self._server(actor, server_id)
        if role not in ("owner", "admin"):
            raise Forbidden("only the owner of this server (or an administrator) may do that")
        return server

    def _view(self, server: Server, role: str) -> ServerView:
        url = self._config.server_resource(server.server_id)
        names = sorted(self._servers.upstream_headers(server)) if role in ("owner", "admin") else []
        return ServerView(server, role, url, install_snippets(server.name, url), names)

    # -------------------------------------------------------------- servers

    async def overview(self, actor: Actor) -> dict[str, list[ServerView]]:
        """mine: servers the actor owns; shared: servers shared with them; all (admins):
        every other server."""
        mine, shared = [], []
        for server, why in await self._servers.visible_to(actor.sub):
            (mine if why == "owner" else shared).append(self._view(server, why))
        others: list[ServerView] = []
        if actor.is_admin:
            seen = {v.server.server_id for v in mine}
            others = [self._view(s, "admin") for s in await self._storage.list_servers() if s.server_id not in seen]
        return {"mine": mine, "shared": shared, "all": others}

    async def server(self, actor: Actor, server_id: str) -> ServerView:
        server, role = await self._server(actor, server_id)
        return await self._upstream_view(self._view(server, role))

    async def check_manager(self, actor: Actor, server_id: str) -> None:
        """NotFound / Forbidden unless the actor may change the server: asked before a request
        body is judged, so its errors tell nothing to someone who may not."""
        await self._managed(actor, server_id)

    async def manage(self, actor: Actor, server_id: str) -> ServerView:
        """The server, for someone who may change it (the edit and delete pages)."""
        server = await self._managed(actor, server_id)
        return await self._upstream_view(self._view(server, self.role(actor, server) or "admin"))

    async def _upstream_view(self, view: ServerView) -> ServerView:
        """An owner's view of a server whose users connect their own accounts: what discovery
        found (cached: a page does not ask the upstream every time) and how many connected."""
        if view.can_manage and view.server.upstream_auth == "oauth":
            view.upstream = await self._servers.upstream_status(view.server)
            view.connected_users = await self._storage.upstream_auth.count_credentials(view.server.server_id)
        return view

    async def register(self, actor: Actor, form: dict) -> ServerView:
        if not actor.email:
            raise Forbidden("a verified e-mail address is needed to own a server")
        name, url, headers = await self._check_form(actor, form, require_all=True)
        try:
            server = await self._servers.add(
                name=name, upstream_url=url, owner_email=actor.email, owner_sub=actor.sub,
                headers=headers, forward_identity=form_bool(form.get("forward_identity")),
                internal_allowed=actor.is_admin, upstream=upstream_form(form),
            )
        except InvalidInput as exc:
            raise FieldErrors({exc.field or "name": sentence(str(exc))}) from None
        return await self._upstream_view(self._view(server, "owner"))

    async def edit(self, actor: Actor, server_id: str, form: dict) -> ServerView:
        server = await self._managed(actor, server_id)
        clear = form_bool(form.get("clear_headers"))
        name, url, headers = await self._check_form(
            actor, form, require_all=False, existing_headers=self._servers.upstream_headers(server),
            current_url=server.upstream_url,
        )
        new_headers = [] if clear and not headers else (headers or None)
        try:
            updated = await self._servers.update(
                server_id,
                name=name,
                upstream_url=url,
                headers=new_headers,
                forward_identity=form_bool(form["forward_identity"]) if "forward_identity" in form else None,
                internal_allowed=actor.is_admin, upstream=upstream_form(form),
            )
        except InvalidInput as exc:
            raise FieldErrors({exc.field or "name": sentence(str(exc))}) from None
        return self._view(updated, self.role(actor, updated) or "admin")

    async def _check_form(self, actor: Actor, form: dict, *, require_all: bool,
                          existing_headers: dict | None = None, current_url: str | None = None):
        """(name, upstream URL, header lines) checked field by field, with the registry's
        own checks (so a page and the API refuse what the CLI refuses); None for a field
        not given on an edit. A new URL must pass the address guard for this actor before
        anything connects to it, then answer HTTP."""
        errors: dict[str, str] = {}
        name = form.get("name")
        if name is not None or require_all:
            try:
                name = check_name(name if name is not None else "")
            except InvalidInput as exc:
                errors["name"] = sentence(str(exc))
        headers = header_lines(form.get("headers"))
        parsed: dict[str, str] = {}
        for line in headers:
            try:
                key, value = parse_header(line)
                parsed[key] = value
            except InvalidInput as exc:
                errors["headers"] = sentence(str(exc))
                break
        url = form.get("upstream_url")
        if url is not None or require_all:
            try:
                url = check_upstream_url(url if url is not None else "")
                if url != current_url:
                    await self._servers.check_upstream_address(url, internal_allowed=actor.is_admin)
            except InvalidInput as exc:
                errors["upstream_url"] = sentence(str(exc))
            if "upstream_url" not in errors and url != current_url:
                probe_headers = parsed or existing_headers or {}
                try:
                    # As the proxy will connect for this server: public addresses only
                    # unless an administrator chooses the URL.
                    await self._probe.check_reachable(url, probe_headers, public_only=not actor.is_admin)
                except UpstreamRefused as exc:
                    errors["upstream_url"] = f"Refused by the gateway's address guard (SSRF protection): {exc}"
                except (UpstreamTimeout, TimeoutError):
                    errors["upstream_url"] = "Unreachable: the upstream did not answer in time."
                except UpstreamError as exc:
                    errors["upstream_url"] = f"Unreachable: {exc}"
        if errors:
            raise FieldErrors(errors)
        return name, url, headers

    async def delete(self, actor: Actor, server_id: str) -> None:
        """Deletes the server, its sharing rules and its sessions; every token for it stops
        working at once (the proxy and the token endpoint find no server)."""
        await self._managed(actor, server_id)
        try:
            await self._servers.remove(server_id)
        except InvalidInput:
            raise NotFound("there is no such server") from None

    async def test_connection(self, actor: Actor, server_id: str) -> ProbeResult:
        server = await self._managed(actor, server_id)
        headers = dict(self._servers.upstream_headers(server))
        if server.upstream_auth == "oauth":
            # The upstream answers each user's own account: the actor's, when connected.
            try:
                headers["Authorization"] = "Bearer " + await self._servers.upstream_auth.get_token(actor.sub, server)
            except UpstreamAuthError:
                return account_needed(await self._servers.upstream_status(server, fresh=True))
        result = await self._probe.probe(server.upstream_url, headers, public_only=not server.internal_upstream)
        if result.ok and self._tools is not None:
            await refresh_catalog(self._tools, server_id, result)
        return result

    # -------------------------------------------------------------- sharing

    async def sharing(self, actor: Actor, server_id: str) -> list[GrantView]:
        await self._managed(actor, server_id)
        used = {u.user_sub: u for u in await self._storage.usage.server_users(server_id)}
        views = []
        for grant in await self._storage.grants_for(server_id):
            reached = [
                Reached(user.email, user.last_login_at, used[user.sub].last_used_at if user.sub in used else 0.0)
                for user in await self._storage.users_matching(grant.kind, grant.value)
            ]
            views.append(GrantView(grant, reached))
        return views

    async def add_grant(self, actor: Actor, server_id: str, kind: str, value: str, rule: dict | None = None) -> Grant:
        """Share the server; `rule` (ToolService keyword arguments) gives the grant its tool
        rule in the same write."""
        await self._managed(actor, server_id)
        if kind not in ("email", "domain"):
            raise FieldErrors({"kind": "Choose an e-mail address or a Workspace domain."})
        try:
            value = check_email(value, "value") if kind == "email" else check_domain(value, "value")
            if not rule or self._tools is None:
                return await self._servers.add_grant(server_id, kind, value)
            rule = {k: v for k, v in rule.items() if k != "clear"}
            grant = await self._tools.add_grant(server_id, kind, value, **rule)
        except InvalidInput as exc:
            raise FieldErrors({exc.field or "value": sentence(str(exc))}) from None
        security_event("grant_added", "server shared", server_id=server_id, kind=kind, value=value)
        return grant

    async def remove_grant(self, actor: Actor, server_id: str, kind: str, value: str) -> None:
        """Takes effect on this instance at once, on others within the access cache's 3 s."""
        await self._managed(actor, server_id)
        try:
            await self._servers.remove_grant(server_id, kind, value)
        except InvalidInput as exc:
            raise NotFound(str(exc)) from None

    # ---------------------------------------------------------- tool policy

    async def tool_panel(self, actor: Actor, server_id: str) -> ToolPanel:
        """Rules, catalog and history of the server's tools, for its owner or an admin."""
        server = await self._managed(actor, server_id)
        tools = self._tool_service()
        return panel(server, await tools.catalog(server_id), await tools.history(server_id))

    async def my_tools(self, actor: Actor, server_id: str) -> list[ToolEntry]:
        """The catalog tools the actor may call on a server they may use (nothing else of
        the catalog or the rules is shown to them)."""
        server, _ = await self._server(actor, server_id)
        grants = tuple(await self._storage.grants_for(server_id))
        found = await self._tool_service().tools_for(_principal(actor), server, grants)
        return sorted((entry for entry, decision in found if decision.allowed), key=lambda e: e.name)

    async def set_tool_rule(self, actor: Actor, server_id: str, changes: dict) -> RuleChange:
        """The server's default rule and pinning (ToolService.set_server_rule's keyword
        arguments); all checked before anything is written."""
        await self._managed(actor, server_id)
        try:
            return await self._tool_service().set_server_rule(server_id, **changes)
        except InvalidInput as exc:
            raise field_errors(exc) from None

    async def set_grant_rule(self, actor: Actor, server_id: str, kind: str, value: str, changes: dict) -> Grant:
        await self._managed(actor, server_id)
        if kind not in ("email", "domain"):
            raise NotFound("there is no such sharing rule")
        try:
            return await self._tool_service().edit_grant(server_id, kind, value, **changes)
        except InvalidInput as exc:
            if exc.field in ("value", "kind", ""):
                raise NotFound("there is no such sharing rule") from None
            raise field_errors(exc) from None

    async def approve_tools(self, actor: Actor, server_id: str, names: list[str] | None) -> list[ToolChange]:
        """Approve the current definition of `names` (None: every tool awaiting approval)."""
        await self._managed(actor, server_id)
        try:
            return await self._tool_service().approve(server_id, names)
        except InvalidInput as exc:
            raise FieldErrors({"tools": sentence(str(exc))}) from None

    def _tool_service(self) -> ToolService:
        if self._tools is None:
            raise RuntimeError("the dashboard was built without the tool service")
        return self._tools

    # ---------------------------------------------------------------- usage

    async def usage(self, actor: Actor, server_id: str, days: int, before: float | None = None) -> UsageReport:
        await self._managed(actor, server_id)
        return await self._reports.report(server_id, days, before)

    async def usage_csv(self, actor: Actor, server_id: str, days: int) -> str:
        await self._managed(actor, server_id)
        return await self._reports.csv(server_id, days)

    # -------------------------------------------------------- authorizations

    async def authorizations(self, actor: Actor) -> list[Authorization]:
        """The clients holding live refresh families of the actor, most recently used first."""
        now = self._now()
        by_client: dict[str, Authorization] = {}
        for family in await self._storage.families_of_user(actor.sub):
            if family.revoked_at or family.expires_at <= now:
                continue
            entry = by_client.get(family.client_id)
            if entry is None:
                try:
                    client = await self._clients.get(family.client_id)
                    name, uris = client.client_name, client.redirect_uris
                except OAuthError:
                    name, uris = family.client_id, ()
                entry = by_client[family.client_id] = Authorization(
                    family.client_id, name or family.client_id,
                    sorted({redirect_host(u) for u in uris}), [], family.created_at, 0.0,
                )
            audience = family.audience
            server = audience[len(self._config.base_resource):] if audience != self._config.base_resource else ""
            label = server or "all servers shared with you"
            if label not in entry.servers:
                entry.servers.append(label)
            entry.created_at = min(entry.created_at, family.created_at)
            entry.last_used_at = max(entry.last_used_at, family.last_used_at, family.created_at)
        return sorted(by_client.values(), key=lambda a: -a.last_used_at)

    async def revoke_authorization(self, actor: Actor, client_id: str) -> int:
        """Revokes every live refresh family (and the access tokens minted from them) of
        this client for the actor, and forgets the consent; the count revoked."""
        now = self._now()
        families = [
            f for f in await self._storage.families_of_user(actor.sub)
            if f.client_id == client_id and not f.revoked_at and f.expires_at > now
        ]
        if not families:
            raise NotFound("this application holds no authorization of yours")
        for family in families:
            await self._tokens.revoke_family(family.family_id)
        await self._storage.delete_consents(actor.sub, client_id)
        await self._forget_upstream(actor.sub, {f.audience for f in families}, now)
        return len(families)

    async def _forget_upstream(self, sub: str, audiences: set[str], now: float) -> None:
        """The user's upstream credentials for servers no live authorization of theirs reaches
        any more (the base resource reaches every server)."""
        base = self._config.base_resource
        live = {f.audience for f in await self._storage.families_of_user(sub)
                if not f.revoked_at and f.expires_at > now}
        if base in live:
            return
        if base in audiences:
            lost = [c.server_id for c in await self._storage.upstream_auth.credentials_of_user(sub)]
        else:
            lost = [a[len(base):] for a in audiences if a.startswith(base) and a not in live]
        lost = [server_id for server_id in lost if base + server_id not in live]
        if lost:
            await self._servers.forget_credentials(sub, lost)



def _principal(actor: Actor) -> Principal:
    return Principal(sub=actor.sub, email=actor.email, hd=actor.hd)
