"""Token audiences: RFC 8707 resources resolved to this gateway's MCP servers (or the base
resource), and whether the sharing rules still let a user into one."""

from __future__ import annotations

from urllib.parse import urlsplit

from config import Config
from services.authserver.claims import Audience, principal_of
from services.common.access import AccessPolicy
from services.common.errors import AccessDenied, InvalidGrant, InvalidTarget, OAuthError
from storage.base import Storage, User


class Audiences:
    def __init__(self, storage: Storage, access: AccessPolicy, config: Config):
        self._storage = storage
        self._access = access
        self._config = config

    async def resolve(self, resource: str | None) -> Audience:
        """RFC 8707: no resource means the base resource; otherwise it must name a known
        server or the base. Scheme and host compare case-insensitively; a trailing slash
        is tolerated."""
        base = self._config.base_resource
        if not resource:
            return Audience(base, "")
        try:
            parts = urlsplit(resource)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            raise InvalidTarget("resource is not a valid URL") from None
        if parts.fragment:
            raise InvalidTarget("resource must not have a fragment")
        origin = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        path = parts.path.rstrip("/")
        if origin == self._config.public_url and not parts.query:
            if path in ("", "/mcp"):
                return Audience(base, "")
            if path.startswith("/mcp/") and "/" not in path[5:]:
                server_id = path[5:]
                if await self._access.server(server_id) is not None:
                    return Audience(self._config.server_resource(server_id), server_id)
        raise InvalidTarget("resource does not name an MCP server of this gateway")

    def of(self, value: str) -> Audience:
        """The Audience of a stored audience value (a server's resource, or the base)."""
        if value.startswith(self._config.base_resource) and value != self._config.base_resource:
            return Audience(value, value[len(self._config.base_resource) :])
        return Audience(value, "")

    async def check_access(self, user: User, audience: Audience) -> None:
        """AccessDenied unless the sharing rules let `user` into the audience's server."""
        if audience.server_id:
            decision = await self._access.decide(principal_of(user), audience.server_id)
            if not decision.allowed:
                raise AccessDenied(decision.reason)

    async def narrow(self, audience: Audience, resource: str | None) -> Audience:
        """A token request may repeat the audience, or name one server of a base grant."""
        if not resource:
            return audience
        wanted = await self.resolve(resource)
        if wanted.value == audience.value or (not audience.server_id and wanted.server_id):
            return wanted
        raise InvalidTarget("resource differs from the one authorized")

    async def still_allowed(self, user_sub: str, granted: str, resource: str | None) -> tuple[User, Audience]:
        """The user and the token audience, if the sharing rules still let them in."""
        audience = await self.narrow(self.of(granted), resource)
        user = await self._storage.get_user(user_sub)
        if user is None:
            raise InvalidGrant("the user of this grant no longer exists")
        try:
            await self.check_access(user, audience)
        except OAuthError as exc:
            raise InvalidGrant(exc.description) from None
        return user, audience
