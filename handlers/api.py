"""The dashboard's JSON API under /api/: the same operations as the pages, through the same
services, with the same sign-in cookie. Every state-changing request needs the _xsrf
cookie's value in an X-XSRFToken header (GET /api/me hands it out)."""

from __future__ import annotations

import json

import tornado.web

from handlers.base import BaseHandler
from services.common.errors import ApiError, BadRequest, FieldErrors, GatewayError
from services.dashboard.reports import parse_range
from services.dashboard.tools import change_dict, entry_dict, rule_from_json
from services.dashboard.views import grant_dict, rule_dict

MAX_JSON_BODY = 64 * 1024


class ApiHandler(BaseHandler):
    async def prepare(self) -> None:
        await super().prepare()
        if self.path_args and self.request.path.startswith("/api/servers/"):
            self.log_fields["server_id"] = self.path_args[0]

    def check_xsrf_cookie(self) -> None:
        # The API rides on the sign-in cookie, so it needs the same XSRF proof as forms.
        tornado.web.RequestHandler.check_xsrf_cookie(self)

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")

    @property
    def dashboard(self):
        return self.services.dashboard

    async def actor(self):
        return await self.dashboard.actor(self.current_user)

    async def manager(self, server_id: str):
        """The actor, once they are known to be allowed to change this server."""
        actor = await self.actor()
        await self.dashboard.check_manager(actor, server_id)
        return actor

    def json_body(self) -> dict:
        if self.body_media_type() != "application/json":
            raise BadRequest("the body must be application/json")
        if len(self.request.body) > MAX_JSON_BODY:
            raise BadRequest("the body is too large")
        try:
            data = json.loads(self.request.body.decode("utf-8") or "{}")
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadRequest("the body is not valid UTF-8 JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    def render_error(self, exc: GatewayError) -> bool:
        """/api's shape: {"error": code, "error_description": message}, plus "fields" for
        form input (FieldErrors); the message as the service wrote it."""
        if isinstance(exc, ApiError):
            code, extra = exc.code, ({"fields": exc.errors} if isinstance(exc, FieldErrors) else {})
        elif isinstance(exc, BadRequest):
            code, extra = "invalid_request", {}
        else:
            return False
        self.write_json({"error": code, "error_description": exc.message, **extra}, exc.status)
        return True

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and status_code == 403 and "xsrf" in (exc.log_message or "").lower():
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": "forbidden", "error_description": "missing or wrong X-XSRFToken header"}))
            return
        super().write_error(status_code, **kwargs)


def _days(handler: ApiHandler) -> int:
    raw = handler.get_query_argument("range", None) or handler.get_query_argument("days", None)
    try:
        return parse_range(raw)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


class MeHandler(ApiHandler):
    async def get(self) -> None:
        actor = await self.actor()
        self.write_json({
            "sub": actor.sub, "email": actor.email, "name": actor.name, "is_admin": actor.is_admin,
            "xsrf_token": self.xsrf_token.decode(),
        })


class ServersHandler(ApiHandler):
    async def get(self) -> None:
        overview = await self.dashboard.overview(await self.actor())
        self.write_json({key: [v.as_dict() for v in views] for key, views in overview.items()})

    async def post(self) -> None:
        view = await self.dashboard.register(await self.actor(), self.json_body())
        self.write_json(view.as_dict(), 201)


class ServerHandler(ApiHandler):
    async def get(self, server_id: str) -> None:
        view = await self.dashboard.server(await self.actor(), server_id)
        self.write_json(view.as_dict())

    async def patch(self, server_id: str) -> None:
        view = await self.dashboard.edit(await self.actor(), server_id, self.json_body())
        self.write_json(view.as_dict())

    async def delete(self, server_id: str) -> None:
        await self.dashboard.delete(await self.actor(), server_id)
        self.write_json({"deleted": server_id})


class TestHandler(ApiHandler):
    async def post(self, server_id: str) -> None:
        result = await self.dashboard.test_connection(await self.actor(), server_id)
        self.write_json(result.as_dict())


class GrantsHandler(ApiHandler):
    async def get(self, server_id: str) -> None:
        grants = await self.dashboard.sharing(await self.actor(), server_id)
        self.write_json({"grants": [g.as_dict() for g in grants]})

    async def post(self, server_id: str) -> None:
        actor = await self.manager(server_id)
        body = self.json_body()
        rule = (rule_from_json(body, with_pinning=False, also=("kind", "value"))
                if set(body) - {"kind", "value"} else None)
        grant = await self.dashboard.add_grant(
            actor, server_id, str(body.get("kind", "")), str(body.get("value", "")), rule
        )
        self.write_json(grant_dict(grant), 201)


class GrantHandler(ApiHandler):
    async def patch(self, server_id: str, kind: str, value: str) -> None:
        """The grant's tool rule: the members given replace that part (`clear` empties it first)."""
        actor = await self.manager(server_id)
        changes = rule_from_json(self.json_body(), with_pinning=False)
        grant = await self.dashboard.set_grant_rule(actor, server_id, kind, value, changes)
        self.write_json(grant_dict(grant))

    async def delete(self, server_id: str, kind: str, value: str) -> None:
        await self.dashboard.remove_grant(await self.actor(), server_id, kind, value)
        self.write_json({"removed": {"kind": kind, "value": value}})


class ToolsHandler(ApiHandler):
    async def get(self, server_id: str) -> None:
        """`tools`: what the caller may call; for the owner or an admin also the default
        `rule`, the whole `catalog` and the tools `awaiting_approval`."""
        actor = await self.actor()
        view = await self.dashboard.server(actor, server_id)
        body: dict = {"tools": [entry_dict(e) for e in await self.dashboard.my_tools(actor, server_id)]}
        if view.can_manage:
            body.update((await self.dashboard.tool_panel(actor, server_id)).as_dict())
        self.write_json(body)

    async def patch(self, server_id: str) -> None:
        """The server's default tool rule and pinning (members given replace that part)."""
        actor = await self.manager(server_id)
        changes = rule_from_json(self.json_body(), with_pinning=True)
        change = await self.dashboard.set_tool_rule(actor, server_id, changes)
        self.write_json({"rule": {**rule_dict(change.rule), "pinned": change.pinned}, "warnings": change.warnings})


class ToolHistoryHandler(ApiHandler):
    async def get(self, server_id: str) -> None:
        panel = await self.dashboard.tool_panel(await self.actor(), server_id)
        self.write_json({"history": [change_dict(c) for c in panel.history]})


class ApproveToolsHandler(ApiHandler):
    async def post(self, server_id: str) -> None:
        """{"tools": [NAME, ...]} approves those; no `tools`: every tool awaiting approval."""
        actor = await self.manager(server_id)
        names = self.json_body().get("tools")
        if names is not None and not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise BadRequest("tools must be a non-empty list of tool names (leave it out to approve every one)")
        approved = await self.dashboard.approve_tools(actor, server_id, names)
        self.write_json({"approved": [c.tool for c in approved]})


class UsageHandler(ApiHandler):
    async def get(self, server_id: str) -> None:
        before = self.get_query_argument("before", None)
        try:
            cursor = float(before) if before else None
        except ValueError:
            raise BadRequest("before must be a timestamp") from None
        report = await self.dashboard.usage(await self.actor(), server_id, _days(self), cursor)
        self.write_json(report.as_dict())


class UsageCsvHandler(ApiHandler):
    async def get(self, server_id: str) -> None:
        body = await self.dashboard.usage_csv(await self.actor(), server_id, _days(self))
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.finish(body)


class AuthorizationsHandler(ApiHandler):
    async def get(self) -> None:
        found = await self.dashboard.authorizations(await self.actor())
        self.write_json({"authorizations": [a.as_dict() for a in found]})


class AuthorizationHandler(ApiHandler):
    async def delete(self, client_id: str) -> None:
        revoked = await self.dashboard.revoke_authorization(await self.actor(), client_id)
        self.write_json({"revoked": client_id, "families": revoked})
