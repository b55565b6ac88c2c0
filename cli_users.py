"""gateway.py's `users list|remove`: the people who signed in, and removing one (services/ops/users.py)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from services.ops.users import UserRemoval

REMOVE_HELP = (
    "remove a user: their sign-in sessions end, every authorization (refresh and access tokens) is "
    "revoked, consents and MCP sessions are deleted, connected upstream accounts are deleted and revoked "
    "at the upstream when it offers revocation, then the user record. Refused while they own servers. "
    "Usage records are kept (audit). Sharing rules naming their e-mail stay: the person can sign in "
    "again while one admits them (grants remove)."
)


def users_parser(sub, json_flag: argparse.ArgumentParser) -> None:
    users = sub.add_parser("users", help="people who have signed in").add_subparsers(dest="action", required=True)
    users.add_parser("list", parents=[json_flag], help="every user: sub, e-mail, last sign-in")
    remove = users.add_parser("remove", parents=[json_flag], description=REMOVE_HELP,
                              help="remove a user and all that lets them in; usage records are kept")
    remove.add_argument("--user", required=True, help="e-mail or sub (an e-mail several users share needs the sub)")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "never"


async def run_users(args, services) -> tuple[list[str], object]:
    """`users list|remove`: (lines, JSON) for `emit`."""
    users = UserRemoval(services)
    if args.action == "list":
        rows = [{"sub": u.sub, "email": u.email, "email_verified": u.email_verified, "hd": u.hd, "name": u.name,
                 "created_at": u.created_at, "last_login_at": u.last_login_at} for u in await users.list()]
        lines = [f"{r['sub']}\t{r['email'] or '-'}\t{r['name'] or '-'}\tlast sign-in {_when(r['last_login_at'])}"
                 for r in rows]
        return lines or ["nobody has signed in yet"], rows
    done = await users.remove(args.user)
    line = (f"removed {done.email or done.sub} ({done.sub}): {done.families_revoked} authorization(s) revoked, "
            f"{done.consents_deleted} consent(s), {done.sessions_deleted} MCP session(s) and "
            f"{done.upstream_credentials_deleted} connected account(s) deleted; usage records kept")
    return [line], done.as_dict()
