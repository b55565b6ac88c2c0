"""make_app: the route table of the gateway, nothing else."""

from __future__ import annotations

import logging
from pathlib import Path

import jinja2
import tornado.web
from tornado.log import access_log

from handlers import api, dashboard, discovery, oauth, ops, proxy, upstream_auth
from handlers.base import StaticHandler
from handlers.lean import LeanRoute
from services.authserver.keys import derive_key

ROOT = Path(__file__).resolve().parent.parent


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Request metrics, and the access log: failures always (routine 401s on /mcp/, a client's
    first contact or an expired token, at INFO), other requests at INFO, successful MCP
    calls and probes only at DEBUG (on the hot path one log line costs a tenth of the request,
    and usage records cover calls). The path is logged without its query, which may carry
    an authorization code or state."""
    request = handler.request
    status = handler.get_status()
    seconds = request.request_time()
    route = getattr(handler, "route_group", "other")
    metrics = handler.application.settings["services"].metrics
    # Labels from a fixed set (route group, status): never a path or a server id.
    metrics.inc("http_requests_total", route=route, status=str(status))
    head = getattr(handler, "time_to_head", None)
    metrics.observe("http_request_duration_seconds", seconds if head is None else head, route=route)
    if status >= 500:
        level = logging.ERROR
    elif status >= 400:
        level = logging.INFO if status == 401 and route == "mcp" else logging.WARNING
    elif route == "mcp" or route == "ops":
        level = logging.DEBUG
    else:
        level = logging.INFO
    if access_log.isEnabledFor(level):
        duration_ms = round(1000 * seconds, 2)
        fields = {
            # The handler's own: after finish() this may run outside the request's context.
            "request_id": getattr(handler, "request_id", "-"),
            "status": status, "method": request.method, "path": request.path,
            "remote_ip": request.remote_ip, "duration_ms": duration_ms, "route": route,
        }
        fields.update(getattr(handler, "log_fields", ()))
        access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip,
                       duration_ms, extra=fields)


def make_app(services, **settings) -> tornado.web.Application:
    # The hot path: a LeanHandler, reached before Tornado's routing (handlers/lean.py).
    mcp = LeanRoute(r"/mcp/([^/]+)", proxy.McpProxyHandler)
    routes = [
        (r"/mcp/[^/]+", mcp),
        (r"/", dashboard.HomeHandler),
        (r"/dashboard/?", dashboard.DashboardHandler),
        (r"/dashboard/servers/new", dashboard.NewServerHandler),
        (r"/dashboard/servers", dashboard.NewServerHandler),
        (r"/dashboard/servers/([^/]+)", dashboard.ServerHandler),
        (r"/dashboard/servers/([^/]+)/edit", dashboard.EditServerHandler),
        (r"/dashboard/servers/([^/]+)/delete", dashboard.DeleteServerHandler),
        (r"/dashboard/servers/([^/]+)/test", dashboard.TestServerHandler),
        (r"/dashboard/servers/([^/]+)/grants", dashboard.GrantsHandler),
        (r"/dashboard/servers/([^/]+)/grants/remove", dashboard.RemoveGrantHandler),
        (r"/dashboard/servers/([^/]+)/grants/tools", dashboard.GrantToolsHandler),
        (r"/dashboard/servers/([^/]+)/tools/rule", dashboard.ToolRuleHandler),
        (r"/dashboard/servers/([^/]+)/tools/approve", dashboard.ApproveToolsHandler),
        (r"/dashboard/servers/([^/]+)/usage", dashboard.UsageHandler),
        (r"/dashboard/servers/([^/]+)/usage\.csv", dashboard.UsageCsvHandler),
        (r"/dashboard/authorizations", dashboard.AuthorizationsHandler),
        (r"/dashboard/authorizations/revoke", dashboard.RevokeAuthorizationHandler),
        (r"/dashboard/connections", upstream_auth.ConnectionsHandler),
        (r"/dashboard/connections/disconnect", upstream_auth.DisconnectHandler),
        (r"/api/me", api.MeHandler),
        (r"/api/servers", api.ServersHandler),
        (r"/api/servers/([^/]+)", api.ServerHandler),
        (r"/api/servers/([^/]+)/test", api.TestHandler),
        (r"/api/servers/([^/]+)/grants", api.GrantsHandler),
        (r"/api/servers/([^/]+)/grants/(email|domain)/([^/]+)", api.GrantHandler),
        (r"/api/servers/([^/]+)/tools", api.ToolsHandler),
        (r"/api/servers/([^/]+)/tools/history", api.ToolHistoryHandler),
        (r"/api/servers/([^/]+)/tools/approve", api.ApproveToolsHandler),
        (r"/api/servers/([^/]+)/usage", api.UsageHandler),
        (r"/api/servers/([^/]+)/usage\.csv", api.UsageCsvHandler),
        (r"/api/authorizations", api.AuthorizationsHandler),
        (r"/api/authorizations/(.+)", api.AuthorizationHandler),
        (r"/\.well-known/oauth-protected-resource", discovery.ProtectedResourceHandler),
        (r"/\.well-known/oauth-protected-resource/mcp/?", discovery.ProtectedResourceHandler),
        (r"/\.well-known/oauth-protected-resource/mcp/([^/]+)", discovery.ProtectedResourceHandler),
        (r"/\.well-known/oauth-authorization-server", discovery.AuthorizationServerHandler),
        (r"/\.well-known/openid-configuration", discovery.AuthorizationServerHandler),
        (r"/jwks\.json", discovery.JwksHandler),
        (r"/register", oauth.RegisterHandler),
        (r"/authorize", oauth.AuthorizeHandler),
        (r"/authorize/consent", oauth.ConsentHandler),
        (r"/authorize/continue", oauth.ContinueHandler),
        (r"/oauth/upstream/client\.json", upstream_auth.ClientMetadataHandler),
        (r"/oauth/upstream/connect/([^/]+)", upstream_auth.ConnectHandler),
        (r"/oauth/upstream/callback", upstream_auth.CallbackHandler),
        (r"/login", oauth.LoginHandler),
        (r"/logout", oauth.LogoutHandler),
        (r"/oauth/callback", oauth.CallbackHandler),
        (r"/token", oauth.TokenHandler),
        (r"/revoke", oauth.RevokeHandler),
        (r"/healthz", ops.HealthHandler),
        (r"/readyz", ops.ReadyHandler),
        (r"/metrics", ops.MetricsHandler),
    ]
    jinja = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(ROOT / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app = tornado.web.Application(
        routes,
        services=services,
        jinja=jinja,
        static_path=str(ROOT / "static"),
        static_handler_class=StaticHandler,
        default_handler_class=dashboard.NotFoundHandler,
        cookie_secret=derive_key(services.config.secret_key, "mcpgw cookies").hex(),
        xsrf_cookies=True,
        log_function=log_request,
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Lax", "secure": services.config.secure_cookies},
        lean_routes=(mcp,),
        **settings,
    )
    mcp.application = app
    return app
