"""gateway.py's commands for upstreams that need each user's own account: the `--upstream-*`
flags of `servers add|edit`, what `servers show|test` say of them, and `connections list|remove`."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from services.common.errors import InvalidInput
from services.common.upstream_settings import AUTH_MODES, UpstreamAuthChange

SECRET_FILE_LIMIT = 10000


def upstream_flags(parser: argparse.ArgumentParser, *, edit: bool) -> None:
    """The upstream authorization flags of `servers add` and `servers edit`."""
    parser.add_argument("--upstream-auth", choices=AUTH_MODES,
                        help="oauth: each user connects their own account at the upstream's authorization server")
    parser.add_argument("--upstream-client-id", help="a static client registered at the upstream's authorization "
                        "server (redirect URI: PUBLIC_URL/oauth/upstream/callback); default: discovery"
                        + ("; '' to go back to discovery" if edit else ""))
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--upstream-client-secret", help="the static client's secret (visible to other local "
                        "users in the process list: prefer --upstream-client-secret-file)")
    secret.add_argument("--upstream-client-secret-file", help="a file holding the static client's secret")
    parser.add_argument("--upstream-scope", help="the scopes to ask for, space-separated (default: what the "
                        "upstream's metadata names)")
    parser.add_argument("--upstream-audience", help="an extra audience parameter some providers need")
    parser.add_argument("--upstream-issuer", help="the authorization server's issuer URL, for upstreams that "
                        "publish no protected resource metadata (RFC 9728)")
    resource = parser.add_mutually_exclusive_group()
    resource.add_argument("--no-upstream-resource", dest="upstream_send_resource", action="store_false",
                          default=None, help="leave out resource (RFC 8707) for servers that reject it")
    if edit:
        resource.add_argument("--upstream-resource", dest="upstream_send_resource", action="store_true")


def upstream_change(args, *, adding: bool) -> UpstreamAuthChange | None:
    """The flags as a change (None when none was given); the secret file read here."""
    secret = args.upstream_client_secret
    if args.upstream_client_secret_file:
        try:
            with open(args.upstream_client_secret_file, encoding="utf-8") as handle:
                secret = handle.read(SECRET_FILE_LIMIT + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read --upstream-client-secret-file: {exc.__class__.__name__}") from None
        if len(secret) > SECRET_FILE_LIMIT:
            raise InvalidInput("--upstream-client-secret-file is too large for a client secret")
        secret = secret.strip()
        if not secret:
            raise InvalidInput("--upstream-client-secret-file is empty")
    change = UpstreamAuthChange(
        mode=args.upstream_auth, client_id=args.upstream_client_id, client_secret=secret,
        scope=args.upstream_scope, audience=args.upstream_audience, send_resource=args.upstream_send_resource,
        issuer=args.upstream_issuer,
    )
    if change == UpstreamAuthChange():
        return None
    if adding and change.mode != "oauth":
        raise InvalidInput("the --upstream-* options need --upstream-auth oauth")
    return change


def connections_parser(sub, json_flag: argparse.ArgumentParser) -> None:
    connections = sub.add_parser("connections", help="users' connected accounts at upstreams"
                                 ).add_subparsers(dest="action", required=True)
    connections.add_parser("list", parents=[json_flag]).add_argument("--user", required=True, help="e-mail or sub")
    remove = connections.add_parser("remove", parents=[json_flag], help="disconnect (revoked at the upstream "
                                    "when it offers revocation)")
    remove.add_argument("--user", required=True, help="e-mail or sub")
    remove.add_argument("--server", required=True, help="the server id")


async def describe_upstream_auth(services, server, view: dict, *, fresh: bool = False) -> list[str]:
    """Adds the upstream authorization of an oauth server to `view` (redirect URI, the
    authorization server discovery found, a warning); the lines to print. Discovery failing
    is a warning on stderr, never a refusal."""
    status = await services.servers.upstream_status(server, fresh=fresh)
    if status is None:
        return []
    view["upstream_authorization"] = status.as_dict()
    if status.warning:
        print(f"warning: {status.warning}", file=sys.stderr)
    return status.lines()


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "unknown"


async def run_connections(args, services, actor) -> tuple[list[str], object]:
    """`connections list|remove`: (lines, JSON) for `emit`. Never a token."""
    if args.action == "list":
        rows = [{"server_id": c.server_id, "issuer": c.issuer, "upstream_subject": c.upstream_subject,
                 "scope": c.scope, "expires_at": c.expires_at or None, "updated_at": c.updated_at}
                for c in await services.storage.upstream_auth.credentials_of_user(actor.sub)]
        lines = [f"{r['server_id']}\t{r['issuer']}\t{r['upstream_subject'] or '-'}\texpires {when(r['expires_at'] or 0)}"
                 for r in rows]
        return lines or [f"{args.user} has no connected accounts"], rows
    server = await services.servers.get(args.server)
    if not await services.upstream_auth.disconnect(actor.sub, server):
        raise InvalidInput(f"{args.user} has no connected account for {args.server}")
    return [f"disconnected {args.user} from {args.server}"], {"removed": args.server, "user_sub": actor.sub}
