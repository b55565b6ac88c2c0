"""The dashboard's view models: the Actor (the signed-in person as the rules see them) and what a
page or the /api shows of a server, a grant and an authorization."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.base import Grant, Server, User
from storage.tools import ToolRule


@dataclass(frozen=True)
class Actor:
    """The signed-in person, as the dashboard's rules see them."""

    sub: str
    email: str  # verified only, else empty
    hd: str
    name: str
    is_admin: bool

    @classmethod
    def of(cls, user: User, admin_emails: tuple[str, ...]) -> Actor:
        email = user.email.lower() if user.email and user.email_verified else ""
        return cls(user.sub, email, user.hd, user.name, bool(email) and email in admin_emails)


@dataclass
class ServerView:
    server: Server
    role: str  # owner | admin | email | domain
    mcp_url: str
    install: dict[str, str]
    header_names: list[str] = field(default_factory=list)
    # An upstream that needs each user's own account, for its owner: what discovery found
    # (services.common.upstream_settings.UpstreamAuthStatus) and how many users connected.
    upstream: object | None = None
    connected_users: int = 0

    @property
    def can_manage(self) -> bool:
        return self.role in ("owner", "admin")

    def as_dict(self) -> dict:
        s = self.server
        view = {
            "server_id": s.server_id,
            "name": s.name,
            "mcp_url": self.mcp_url,
            "role": self.role,
            "install": self.install,
        }
        if self.can_manage:
            view.update(
                upstream_url=s.upstream_url,
                upstream_headers=self.header_names,
                forward_identity=s.forward_identity,
                internal_upstream=s.internal_upstream,
                owner_email=s.owner_email,
                created_at=s.created_at,
                tools={**rule_dict(ToolRule.of(s)), "pinned": s.tools_pinned},
                upstream_auth=upstream_dict(s, self.upstream, self.connected_users),
            )
        return view


@dataclass
class Reached:
    email: str
    signed_in_at: float
    last_used_at: float  # 0 when never used through the gateway


@dataclass
class GrantView:
    grant: Grant
    reached: list[Reached]

    @property
    def rule(self) -> ToolRule:
        return ToolRule.of(self.grant)

    def as_dict(self) -> dict:
        return {
            "kind": self.grant.kind,
            "value": self.grant.value,
            "created_at": self.grant.created_at,
            "tools": rule_dict(self.rule),
            "users": [
                {"email": r.email, "signed_in_at": r.signed_in_at, "last_used_at": r.last_used_at or None}
                for r in self.reached
            ],
        }


@dataclass
class Authorization:
    client_id: str
    client_name: str
    redirect_hosts: list[str]
    servers: list[str]
    created_at: float
    last_used_at: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def upstream_dict(s: Server, status, connected: int) -> dict:
    """A server's upstream authorization in /api's shape: never the client secret."""
    found = {"mode": s.upstream_auth}
    if s.upstream_auth == "oauth":
        found.update(client_id=s.upstream_client_id, client_secret_set=bool(s.upstream_client_secret_enc),
                     scope=s.upstream_scope, audience=s.upstream_audience, send_resource=s.upstream_send_resource,
                     issuer=s.upstream_issuer, connected_users=connected,
                     **(status.as_dict() if status is not None else {}))
    return found


def rule_dict(rule: ToolRule) -> dict:
    """A tool rule in /api's shape."""
    return {"allow": list(rule.allow), "deny": list(rule.deny), "read_only": rule.read_only}


def grant_dict(grant: Grant) -> dict:
    """A grant just added or edited, in /api's shape."""
    return {"kind": grant.kind, "value": grant.value, "created_at": grant.created_at,
            "tools": rule_dict(ToolRule.of(grant))}
