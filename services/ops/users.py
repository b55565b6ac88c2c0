"""`gateway.py users list|remove`: the people who signed in, and removing one with everything
that lets them in (tokens, consents, sessions, connected accounts, browser sessions)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from services.common.errors import InvalidInput
from services.common.logs import security_event
from storage.base import User


@dataclass(frozen=True)
class Removal:
    """What `remove` did, counted per step."""

    sub: str
    email: str
    families_revoked: int
    consents_deleted: int
    sessions_deleted: int
    upstream_credentials_deleted: int

    def as_dict(self) -> dict:
        return {"removed": self.sub, **asdict(self)}


class UserRemoval:
    """Finds users by sub or e-mail and removes them; `services` is the process's `Services`
    (ops may use every area: the token service, the sign-in sessions, the upstream accounts)."""

    def __init__(self, services) -> None:
        self._s = services

    async def list(self) -> list[User]:
        return await self._s.storage.list_users()

    async def find(self, who: str) -> User:
        """The user whose sub is `who`, else the one whose verified e-mail it is. An e-mail
        held by several subs (several IdP accounts) is refused: the sub must be named."""
        who = who.strip()
        if not who:
            raise InvalidInput("--user is empty: give an e-mail address or a sub")
        user = await self._s.storage.get_user(who)
        if user is not None:
            return user
        matches = await self._s.storage.users_matching("email", who.lower()) if "@" in who else []
        if not matches:
            raise InvalidInput(f"no such user: nobody has signed in as {who} (see `users list`)")
        if len(matches) > 1:
            subs = ", ".join(u.sub for u in matches)
            raise InvalidInput(f"{who} is the e-mail of {len(matches)} users ({subs}): name one by its sub")
        return matches[0]

    async def remove(self, who: str) -> Removal:
        """Removes the user. Refused, with nothing changed, while they own servers. The order
        makes every step a loss of access and the user row the last write, so a failure
        half-way (storage) leaves nothing usable and the command can simply run again:
        browser sessions end (no consent, connect or dashboard action can start), refresh
        families are revoked with their access tokens, consents and MCP sessions go, the
        connected accounts are deleted and revoked at their upstreams, then the user row.
        Usage records stay (audit)."""
        s = self._s
        user = await self.find(who)
        owned = await s.storage.servers_owned_by(user.sub)
        if owned:
            ids = ", ".join(server.server_id for server in owned)
            raise InvalidInput(
                f"{user.email or user.sub} owns {len(owned)} server(s): {ids}. Remove them first "
                f"(servers remove ID); nothing was changed")
        await s.accounts.end_all_sessions(user.sub)
        families = await self._revoke_families(user.sub)
        consents = await s.storage.delete_user_consents(user.sub)
        sessions = await s.storage.delete_user_sessions(user.sub)
        credentials = await self._disconnect_all(user.sub)
        # A code issued before the sign-in sessions ended (60 s at most) may have been
        # redeemed meanwhile: its family goes too. After the user row is gone no code or
        # refresh token is honoured (Audiences.still_allowed).
        families += await self._revoke_families(user.sub)
        await s.storage.delete_user(user.sub)
        security_event("user_removed", "user removed by the operator: tokens revoked, consents, sessions and "
                                       "connected accounts deleted (usage records kept)",
                       user_sub=user.sub, families=families, consents=consents, sessions=sessions,
                       upstream_credentials=credentials)
        return Removal(user.sub, user.email, families, consents, sessions, credentials)

    async def _revoke_families(self, sub: str) -> int:
        """Every family not revoked yet that may still have a live access token (an expired
        family's last access token outlives it by the access-token lifetime), revoked as
        `authorizations revoke` does: the `fid:` marker the proxy reads, then the row."""
        s = self._s
        horizon = s.now() - s.config.access_token_ttl - 60
        count = 0
        for family in await s.storage.families_of_user(sub):
            if not family.revoked_at and family.expires_at > horizon:
                await s.tokens.revoke_family(family.family_id)
                count += 1
        return count

    async def _disconnect_all(self, sub: str) -> int:
        """Each connected account deleted and revoked at its upstream when it offers
        revocation (`connections remove`), then any row left (its server gone) deleted."""
        s = self._s
        count = 0
        for credential in await s.storage.upstream_auth.credentials_of_user(sub):
            server = await s.storage.get_server(credential.server_id)
            if server is not None:
                count += bool(await s.upstream_auth.disconnect(sub, server))
        return count + await s.servers.forget_credentials(sub)
