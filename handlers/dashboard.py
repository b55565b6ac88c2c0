"""The owner dashboard's HTML pages: plain forms (POST + redirect), no JavaScript needed
except for copy buttons. Parsing and rendering only; every rule is in services.dashboard."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from urllib.parse import quote, urlencode

from handlers.base import BaseHandler
from services.common.errors import BadRequest, FieldErrors, GatewayError, NotSignedIn
from services.common.logs import request_id
from services.dashboard.reports import RANGES, parse_range
from services.dashboard.tools import RuleForm, rule_from_form

NOTICES = {
    "registered": "The server is registered. Share it and hand out its MCP URL.",
    "saved": "Your changes are saved.",
    "deleted": "The server is deleted. Its sessions and tokens no longer work.",
    "shared": "The sharing rule is added.",
    "unshared": "The sharing rule is removed; it stops working within 3 seconds.",
    "revoked": "The application's access is revoked.",
    "tools_saved": "The server's tool rule is saved; it applies within 3 seconds.",
    "grant_tools_saved": "The sharing rule's tools are saved; they apply within 3 seconds.",
    "approved": "The tool definitions are approved.",
}


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_time(ts: float) -> str:
    ago = time.time() - ts
    if ago < 60:
        return "just now"
    if ago < 3600:
        return f"{int(ago // 60)} min ago"
    if ago < 86400:
        return f"{int(ago // 3600)} h ago"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


class DashboardPage(BaseHandler):
    """A signed-in page: a refusal (services.errors.ApiError) becomes a readable error page;
    a missing sign-in sends a GET to the sign-in page and answers anything else with 401."""

    is_page = True

    async def prepare(self) -> None:
        await super().prepare()
        if self.path_args and self.request.path.startswith("/dashboard/servers/"):
            self.log_fields["server_id"] = self.path_args[0]

    @property
    def dashboard(self):
        return self.services.dashboard

    async def actor(self):
        return await self.dashboard.actor(self.current_user)

    def render_error(self, exc: GatewayError) -> bool:
        if isinstance(exc, NotSignedIn) and self.request.method == "GET":
            self.redirect("/login?" + urlencode({"next": self.request.uri}))
            return True
        return super().render_error(exc)

    def render_page(self, template: str, status: int = 200, **context) -> None:
        notice = NOTICES.get(self.get_query_argument("notice", ""))
        self.page(template, status=status, notice=notice, iso_time=iso_time, human_time=human_time,
                  server_path=self.server_path, upstream_redirect_uri=self.services.servers.redirect_uri, **context)

    def server_path(self, server_id: str, suffix: str = "") -> str:
        return f"/dashboard/servers/{quote(server_id, safe='')}{suffix}"


class HomeHandler(BaseHandler):
    is_page = True

    def get(self) -> None:
        self.page("home.html")


class DashboardHandler(DashboardPage):
    async def get(self) -> None:
        actor = await self.actor()
        overview = await self.dashboard.overview(actor)
        self.render_page("dashboard.html", actor=actor, **overview)


class NewServerHandler(DashboardPage):
    async def get(self) -> None:
        actor = await self.actor()
        self.render_page("server_form.html", actor=actor, view=None, form={}, errors={})

    async def post(self) -> None:
        actor = await self.actor()
        form = self.form_body()
        try:
            view = await self.dashboard.register(actor, form)
        except FieldErrors as exc:
            self.render_page("server_form.html", status=400, actor=actor, view=None, form=form, errors=exc.errors)
            return
        self.redirect(self.server_path(view.server.server_id, "?notice=registered"))


class ServerHandler(DashboardPage):
    async def get(self, server_id: str) -> None:
        await self.show(server_id)

    async def show(self, server_id: str, status: int = 200, probe=None, grant_errors=None, grant_form=None,
                   tool_errors=None, tool_target: str = "", tool_form: RuleForm | None = None):
        """The server page; `tool_target` names the tool form that failed ("default",
        "grant:KIND:VALUE" or "approve"), shown again as posted with `tool_errors`."""
        actor = await self.actor()
        view = await self.dashboard.server(actor, server_id)
        grants = await self.dashboard.sharing(actor, server_id) if view.can_manage else []
        tools = await self.dashboard.tool_panel(actor, server_id) if view.can_manage else None
        my_tools = await self.dashboard.my_tools(actor, server_id) if not view.can_manage else []
        self.render_page(
            "server.html", status=status, actor=actor, view=view, grants=grants, probe=probe,
            grant_errors=grant_errors or {}, grant_form=grant_form or {}, tools=tools, my_tools=my_tools,
            tool_errors=tool_errors or {}, tool_target=tool_target, tool_form=tool_form,
        )


class EditServerHandler(DashboardPage):
    async def get(self, server_id: str) -> None:
        actor = await self.actor()
        view = await self.dashboard.manage(actor, server_id)
        form = {"name": view.server.name, "upstream_url": view.server.upstream_url,
                "forward_identity": view.server.forward_identity}
        self.render_page("server_form.html", actor=actor, view=view, form=form, errors={})

    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        form = self.form_body()
        form.setdefault("forward_identity", "")  # an unticked checkbox sends nothing
        try:
            await self.dashboard.edit(actor, server_id, form)
        except FieldErrors as exc:
            view = await self.dashboard.manage(actor, server_id)
            self.render_page("server_form.html", status=400, actor=actor, view=view, form=form, errors=exc.errors)
            return
        self.redirect(self.server_path(server_id, "?notice=saved"))


class DeleteServerHandler(DashboardPage):
    async def get(self, server_id: str) -> None:
        actor = await self.actor()
        view = await self.dashboard.manage(actor, server_id)
        self.render_page("server_delete.html", actor=actor, view=view)

    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        self.form_body()
        await self.dashboard.delete(actor, server_id)
        self.redirect("/dashboard?notice=deleted")


class TestServerHandler(ServerHandler):
    async def get(self, server_id: str) -> None:
        self.redirect(self.server_path(server_id))

    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        self.form_body()
        probe = await self.dashboard.test_connection(actor, server_id)
        await self.show(server_id, probe=probe)


class GrantsHandler(ServerHandler):
    async def get(self, server_id: str) -> None:
        self.redirect(self.server_path(server_id) + "#sharing")

    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        form = self.form_body()
        try:
            await self.dashboard.add_grant(actor, server_id, form.get("kind", ""), form.get("value", ""))
        except FieldErrors as exc:
            await self.show(server_id, status=400, grant_errors=exc.errors, grant_form=form)
            return
        self.redirect(self.server_path(server_id, "?notice=shared#sharing"))


class RemoveGrantHandler(DashboardPage):
    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        form = self.form_body()
        await self.dashboard.remove_grant(actor, server_id, form.get("kind", ""), form.get("value", ""))
        self.redirect(self.server_path(server_id, "?notice=unshared#sharing"))


class ToolRuleHandler(ServerHandler):
    """The server's default tool rule and pinning (the whole rule is in the form)."""

    async def get(self, server_id: str) -> None:
        self.redirect(self.server_path(server_id) + "#tools")

    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        form = self.form_body()
        try:
            await self.dashboard.set_tool_rule(actor, server_id, rule_from_form(form, with_pinning=True))
        except FieldErrors as exc:
            await self.show(server_id, status=400, tool_errors=exc.errors, tool_target="default",
                            tool_form=RuleForm.posted(form))
            return
        self.redirect(self.server_path(server_id, "?notice=tools_saved#tool-rule"))


class GrantToolsHandler(ServerHandler):
    """One sharing rule's tool rule (kind and value name the grant)."""

    async def get(self, server_id: str) -> None:
        self.redirect(self.server_path(server_id) + "#sharing")

    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        form = self.form_body()
        kind, value = form.get("kind", ""), form.get("value", "")
        try:
            await self.dashboard.set_grant_rule(actor, server_id, kind, value,
                                                        rule_from_form(form, with_pinning=False))
        except FieldErrors as exc:
            await self.show(server_id, status=400, tool_errors=exc.errors, tool_target=f"grant:{kind}:{value}",
                            tool_form=RuleForm.posted(form))
            return
        self.redirect(self.server_path(server_id, "?notice=grant_tools_saved#sharing"))


class ApproveToolsHandler(ServerHandler):
    """Approve one tool's current definition (`tool`), or every one awaiting approval."""

    async def get(self, server_id: str) -> None:
        self.redirect(self.server_path(server_id) + "#tools")

    async def post(self, server_id: str) -> None:
        actor = await self.actor()
        form = self.form_body()
        names = [form["tool"]] if form.get("tool") else None
        try:
            await self.dashboard.approve_tools(actor, server_id, names)
        except FieldErrors as exc:
            await self.show(server_id, status=400, tool_errors=exc.errors, tool_target="approve")
            return
        self.redirect(self.server_path(server_id, "?notice=approved#tools"))


def _range(handler: BaseHandler) -> int:
    try:
        return parse_range(handler.get_query_argument("range", None))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _before(handler: BaseHandler) -> float | None:
    raw = handler.get_query_argument("before", None)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("before must be a timestamp") from None
    if value != value or value <= 0:
        raise BadRequest("before must be a timestamp")
    return value


class UsageHandler(DashboardPage):
    async def get(self, server_id: str) -> None:
        actor = await self.actor()
        days = _range(self)
        before = _before(self)
        report = await self.dashboard.usage(actor, server_id, days, before)
        view = await self.dashboard.server(actor, server_id)
        range_key = next((k for k, n in RANGES.items() if n == days), f"{days}d")
        self.render_page("usage.html", actor=actor, view=view, report=report, days=days,
                         ranges=RANGES, range_key=range_key, request_before=before)


class UsageCsvHandler(DashboardPage):
    async def get(self, server_id: str) -> None:
        actor = await self.actor()
        days = _range(self)
        body = await self.dashboard.usage_csv(actor, server_id, days)
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        filename = f"usage-{server_id}-{days}d.csv".replace('"', "")
        self.set_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.finish(body)


class AuthorizationsHandler(DashboardPage):
    async def get(self) -> None:
        actor = await self.actor()
        self.render_page("authorizations.html", actor=actor,
                         authorizations=await self.dashboard.authorizations(actor))


class RevokeAuthorizationHandler(DashboardPage):
    async def post(self) -> None:
        actor = await self.actor()
        form = self.form_body()
        await self.dashboard.revoke_authorization(actor, form.get("client_id", ""))
        self.redirect("/dashboard/authorizations?notice=revoked")


class NotFoundHandler(BaseHandler):
    """Any unknown path: a readable 404 page, or JSON under /api/."""

    route_group = "other"

    @property
    def is_page(self) -> bool:  # type: ignore[override]
        return not self.request.path.startswith("/api/")

    async def prepare(self) -> None:
        request_id.set(self.request_id)  # as BaseHandler.prepare, which runs only for pages here
        if self.request.method == "OPTIONS":
            self.set_status(404)
            self.finish()
            return
        if self.is_page:
            await super().prepare()  # the page's header shows who is signed in
            self.error_page(404, "Not found", "There is nothing at this address.")
        else:
            self.write_json({"error": "not_found", "error_description": "no such API endpoint"}, 404)

    def check_xsrf_cookie(self) -> None:
        pass  # nothing changes here: a 404 for every method
