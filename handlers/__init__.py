"""make_app: the route table of the gateway, nothing else."""

from __future__ import annotations

from pathlib import Path

import jinja2
import tornado.web

from handlers import dashboard, discovery, oauth, ops, proxy
from services.keys import derive_key

ROOT = Path(__file__).resolve().parent.parent


def make_app(services, **settings) -> tornado.web.Application:
    routes = [
        (r"/", dashboard.HomeHandler),
        (r"/dashboard", dashboard.DashboardHandler),
        (r"/\.well-known/oauth-protected-resource", discovery.ProtectedResourceHandler),
        (r"/\.well-known/oauth-protected-resource/mcp/?", discovery.ProtectedResourceHandler),
        (r"/\.well-known/oauth-protected-resource/mcp/([^/]+)", discovery.ProtectedResourceHandler),
        (r"/\.well-known/oauth-authorization-server", discovery.AuthorizationServerHandler),
        (r"/\.well-known/openid-configuration", discovery.AuthorizationServerHandler),
        (r"/jwks\.json", discovery.JwksHandler),
        (r"/register", oauth.RegisterHandler),
        (r"/authorize", oauth.AuthorizeHandler),
        (r"/authorize/consent", oauth.ConsentHandler),
        (r"/login", oauth.LoginHandler),
        (r"/logout", oauth.LogoutHandler),
        (r"/oauth/callback", oauth.CallbackHandler),
        (r"/token", oauth.TokenHandler),
        (r"/revoke", oauth.RevokeHandler),
        (r"/mcp/([^/]+)", proxy.McpProxyHandler),
        (r"/healthz", ops.HealthHandler),
        (r"/readyz", ops.ReadyHandler),
        (r"/metrics", ops.MetricsHandler),
    ]
    jinja = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(ROOT / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return tornado.web.Application(
        routes,
        services=services,
        jinja=jinja,
        static_path=str(ROOT / "static"),
        cookie_secret=derive_key(services.config.secret_key, "mcpgw cookies").hex(),
        xsrf_cookies=True,
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Lax", "secure": services.config.secure_cookies},
        **settings,
    )
