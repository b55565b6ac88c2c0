"""Connected accounts in the browser (issue 11): the client ID metadata document, connect (a page
and its POST), the upstream's callback, and the dashboard's Connections page with Disconnect."""

from __future__ import annotations

from urllib.parse import urlencode

from handlers.base import BaseHandler
from handlers.dashboard import human_time, iso_time
from handlers.oauth import local_path
from services.common.errors import PageError
from services.dashboard.connections import Connections

CONNECTIONS_PATH = "/dashboard/connections"
NOTICES = {
    "connected": "Your account is connected.",
    "disconnected": "Your account is disconnected and its tokens are revoked where the server allows it.",
    "not_connected": "There was no connected account to disconnect.",
}


def connections_of(handler: BaseHandler) -> Connections:
    return Connections.of(handler.services)


class ClientMetadataHandler(BaseHandler):
    """GET /oauth/upstream/client.json: the gateway's own client id at upstream authorization
    servers that accept client ID metadata documents (only for an https public URL)."""

    route_group = "oauth"

    def get(self) -> None:
        auth = self.services.upstream_auth
        if not auth.client_id_url:
            self.oauth_error("not_found", "client ID metadata documents need an https public URL", 404)
            return
        self.set_header("Cache-Control", "public, max-age=3600")
        self.write_json(auth.client_metadata())


class UpstreamPage(BaseHandler):
    """A signed-in browser page: GET without a sign-in goes to sign-in first."""

    is_page = True
    route_group = "oauth"

    def signed_in(self) -> dict | None:
        """The signed-in user; None when a GET was sent to sign-in instead (answered)."""
        if self.current_user is None:
            if self.request.method != "GET":
                raise PageError(401, "Please sign in", "Sign in to connect your accounts.")
            self.redirect("/login?" + urlencode({"next": self.request.uri}))
        return self.current_user


class ConnectHandler(UpstreamPage):
    """GET /oauth/upstream/connect/{server}: what will be connected and where, with a Connect
    button. POST (XSRF-checked) starts the trip: a GET that redirected at once would let any
    site send a signed-in browser through an upstream sign-in and replace the account the
    gateway holds for it with whichever account that browser is signed in to there."""

    async def get(self, server_id: str) -> None:
        user = self.signed_in()
        if user is None:
            return
        self.log_fields["server_id"] = server_id
        connections = connections_of(self)
        server, host = await connections.server_to_connect(user, server_id)
        self.page("connect.html", server=server, host=host,
                  scope=connections.more_scope(self.get_query_argument("scope", None)),
                  return_to=local_path(self.get_query_argument("return_to", None), CONNECTIONS_PATH))

    async def post(self, server_id: str) -> None:
        user = self.signed_in()
        self.log_fields["server_id"] = server_id
        form = self.form_body()
        return_to = local_path(form.get("return_to"), CONNECTIONS_PATH)
        self.redirect(await connections_of(self).begin(user, server_id, return_to, form.get("scope") or ""))


class CallbackHandler(UpstreamPage):
    """GET /oauth/upstream/callback: the upstream's answer. Success goes back to the trip's
    local `return_to`; a wrong, reused, expired or foreign state or an AS error is a 400 page
    and nothing is stored."""

    async def get(self) -> None:
        server_id, return_to = await connections_of(self).complete(self.current_user, self.query_params())
        self.log_fields["server_id"] = server_id
        target = local_path(return_to, CONNECTIONS_PATH)
        if target == CONNECTIONS_PATH:
            target += "?notice=connected"
        self.redirect(target)


class ConnectionsHandler(UpstreamPage):
    """GET /dashboard/connections: every server the user may use that needs an account."""

    route_group = "dashboard"

    async def get(self) -> None:
        user = self.signed_in()
        if user is None:
            return
        self.page("connections.html", connections=await connections_of(self).overview(user),
                  notice=NOTICES.get(self.get_query_argument("notice", "")), human_time=human_time,
                  iso_time=iso_time, now=self.services.now())


class DisconnectHandler(UpstreamPage):
    """POST /dashboard/connections/disconnect (XSRF-checked): forget and revoke the account."""

    route_group = "dashboard"

    async def post(self) -> None:
        user = self.signed_in()
        server_id = self.form_body().get("server_id", "")
        self.log_fields["server_id"] = server_id
        removed = await connections_of(self).disconnect(user, server_id)
        self.redirect(f"{CONNECTIONS_PATH}?notice={'disconnected' if removed else 'not_connected'}")
