"""MCP Auth Gateway entry point: `serve` runs the gateway (serving.py); the other commands
administer the same storage (servers, grants, clients, keys) and take effect without a restart."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict

from cli_upstream import (
    connections_parser,
    describe_upstream_auth,
    run_connections,
    upstream_change,
    upstream_flags,
)
from cli_users import run_users, users_parser
from config import Config, ConfigError
from services import Services, build_services
from services.authserver.clients import registration_response
from services.common.errors import GatewayError, InvalidInput
from services.dashboard.probe import McpProbe, account_needed
from services.dashboard.reports import MAX_DAYS, UsageReports
from services.dashboard.tools import refresh_catalog
from services.dashboard.views import Actor
from services.proxy.tools.policy import parse_rule
from storage.base import StorageError, ToolRule

log = logging.getLogger("gateway")


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like every other failure: one line on stderr, non-zero exit."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    # --json is accepted before or after the subcommand; SUPPRESS keeps a subcommand's
    # default from overwriting a --json given before it.
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="machine-readable output")
    parser = OneLineParser(prog="gateway.py", description="MCP Auth Gateway", parents=[json_flag])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sub.add_parser("serve", help="run the gateway")

    servers = sub.add_parser("servers", help="upstream MCP servers").add_subparsers(dest="action", required=True)
    add = servers.add_parser("add", parents=[json_flag], help="register an upstream MCP server")
    add.add_argument("--name", required=True)
    add.add_argument("--upstream", required=True, help="the upstream's Streamable HTTP URL")
    add.add_argument("--owner", required=True, help="the owner's e-mail address")
    add.add_argument("--id", dest="server_id", help="choose the server id (default: srv_…)")
    add.add_argument("--header", action="append", default=[], help="'Name: value' sent to the upstream")
    add.add_argument("--forward-identity", action="store_true", help="send the user's identity upstream")
    upstream_flags(add, edit=False)
    servers.add_parser("list", parents=[json_flag], help="list servers")
    for action in ("show", "remove"):
        servers.add_parser(action, parents=[json_flag]).add_argument("server_id")
    servers.add_parser("test", parents=[json_flag], help="speak MCP to the upstream (Test connection)"
                       ).add_argument("server_id")
    edit = servers.add_parser("edit", parents=[json_flag], help="change a server")
    edit.add_argument("server_id")
    edit.add_argument("--name")
    edit.add_argument("--upstream", help="the upstream's Streamable HTTP URL")
    edit.add_argument("--header", action="append", help="'Name: value'; replaces every upstream header")
    edit.add_argument("--clear-headers", action="store_true", help="remove every upstream header")
    identity = edit.add_mutually_exclusive_group()
    identity.add_argument("--forward-identity", dest="forward_identity", action="store_true", default=None)
    identity.add_argument("--no-forward-identity", dest="forward_identity", action="store_false")
    tool_flags(edit, server=True)
    upstream_flags(edit, edit=True)
    catalog = servers.add_parser("tools", help="the tool catalog of a server").add_subparsers(
        dest="tools_action", required=True)
    catalog.add_parser("list", parents=[json_flag], help="the tools seen in tools/list answers").add_argument("server_id")
    approve = catalog.add_parser("approve", parents=[json_flag], help="accept the current definitions (pinning)")
    approve.add_argument("server_id")
    approve.add_argument("tool", nargs="*", help="tool names (default: every tool awaiting approval)")

    usage = sub.add_parser("usage", parents=[json_flag], help="usage report of one server")
    usage.add_argument("server_id")
    usage.add_argument("--days", type=int, default=7, help="1 (the last 24 hours) to 366; default 7")

    auths = sub.add_parser("authorizations", help="applications holding a user's tokens"
                           ).add_subparsers(dest="action", required=True)
    auths.add_parser("list", parents=[json_flag]).add_argument("--user", required=True, help="e-mail or sub")
    arevoke = auths.add_parser("revoke", parents=[json_flag])
    arevoke.add_argument("--user", required=True, help="e-mail or sub")
    arevoke.add_argument("--client", required=True, help="the client_id")

    connections_parser(sub, json_flag)
    users_parser(sub, json_flag)
    grants = sub.add_parser("grants", help="sharing rules").add_subparsers(dest="action", required=True)
    for action in ("add", "edit", "remove"):
        grant = grants.add_parser(action, parents=[json_flag])
        grant.add_argument("server_id")
        who = grant.add_mutually_exclusive_group(required=True)
        who.add_argument("--email")
        who.add_argument("--domain", help="a Google Workspace domain (the ID token's hd claim)")
        if action != "remove":
            tool_flags(grant, server=False)
    grants.add_parser("list", parents=[json_flag]).add_argument("server_id")

    clients = sub.add_parser("clients", help="pre-registered OAuth clients").add_subparsers(dest="action", required=True)
    cadd = clients.add_parser("add", parents=[json_flag])
    cadd.add_argument("--name", required=True)
    cadd.add_argument("--redirect-uri", action="append", required=True)
    cadd.add_argument("--confidential", action="store_true", help="issue a client secret")

    keys = sub.add_parser("keys", help="token signing keys").add_subparsers(dest="action", required=True)
    keys.add_parser("rotate", parents=[json_flag])
    keys.add_parser("list", parents=[json_flag])

    sub.add_parser("doctor", parents=[json_flag],
                   help="check configuration, storage, IdP, clock and upstreams; non-zero exit on a failure")
    backup = sub.add_parser("backup", parents=[json_flag], help="online copy of the SQLite database")
    backup.add_argument("path", help="the new backup file")
    backup.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    return args


def tool_flags(parser: argparse.ArgumentParser, *, server: bool) -> None:
    """The tool rule flags of `servers edit` (the default rule) and `grants add|edit`."""
    parser.add_argument("--tools-allow", help="only these tools: names or globs (* ?), comma-separated")
    parser.add_argument("--tools-deny", help="never these tools: names or globs (wins over --tools-allow)")
    read_only = parser.add_mutually_exclusive_group()
    read_only.add_argument("--read-only", dest="tools_read_only", action="store_true", default=None,
                           help="only tools annotated readOnlyHint: true")
    read_only.add_argument("--no-read-only", dest="tools_read_only", action="store_false")
    parser.add_argument("--tools-clear", action="store_true", help="remove the tool rule first (every tool)")
    if server:
        pin = parser.add_mutually_exclusive_group()
        pin.add_argument("--pin", dest="tools_pinned", action="store_true", default=None,
                         help="new or changed tools unavailable until approved (servers tools approve)")
        pin.add_argument("--no-pin", dest="tools_pinned", action="store_false")


def tool_rule_given(args) -> bool:
    return (args.tools_allow is not None or args.tools_deny is not None or args.tools_read_only is not None
            or args.tools_clear or getattr(args, "tools_pinned", None) is not None)


def tool_rule_text(record) -> str:
    rule = ToolRule.of(record)
    parts = [f"allow {','.join(rule.allow)}"] if rule.allow else []
    parts += [f"deny {','.join(rule.deny)}"] if rule.deny else []
    parts += ["read-only"] if rule.read_only else []
    parts += ["pinned"] if getattr(record, "tools_pinned", False) else []
    return "; ".join(parts) or "every tool"


def emit(args, human: list[str], data) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for line in human:
            print(line)


def server_view(services: Services, server) -> dict:
    view = asdict(server)
    view.pop("upstream_headers_enc")
    view["upstream_client_secret"] = "set" if view.pop("upstream_client_secret_enc") else ""  # never the secret
    view["mcp_url"] = services.config.server_resource(server.server_id)
    # Upstream header values are secrets: show names only.
    view["upstream_headers"] = sorted(services.servers.upstream_headers(server))
    return view


async def cli_actor(services: Services, who: str) -> Actor:
    user = await services.storage.get_user(who)
    if user is None and "@" in who:
        matches = await services.storage.users_matching("email", who.strip().lower())
        user = matches[0] if matches else None
    if user is None:
        raise InvalidInput(f"nobody has signed in as {who}")
    return Actor.of(user, services.config.admin_emails)


async def run_tools_command(args, services: Services) -> None:
    """`servers tools list|approve`: the catalog of one server and approvals (pinning)."""
    if args.tools_action == "list":
        server = await services.servers.get(args.server_id)
        rows = []
        for entry in await services.tools.catalog(args.server_id):
            approved = bool(entry.approved_hash) and entry.approved_hash == entry.hash
            rows.append({**asdict(entry), "read_only": entry.annotations.get("readOnlyHint") is True,
                         "approved": approved})
        state = (lambda row: "approved" if row["approved"] else "awaiting approval") if server.tools_pinned else (
            lambda row: "-")
        lines = [f"{r['name']}\t{'read-only' if r['read_only'] else 'read-write'}\t{state(r)}\t{r['hash'][:12]}"
                 for r in rows]
        emit(args, lines or [f"no tools seen yet on {args.server_id}"], rows)
    else:
        changes = await services.tools.approve(args.server_id, args.tool)
        names = [c.tool for c in changes]
        emit(args, [f"approved {len(names)} tool(s) on {args.server_id}" + (": " + ", ".join(names) if names else "")],
             {"approved": names})


async def run_admin(args, services: Services) -> None:
    registry = services.servers
    if args.command == "servers":
        if args.action == "add":
            server = await registry.add(
                name=args.name,
                upstream_url=args.upstream,
                owner_email=args.owner,
                server_id=args.server_id,
                headers=args.header,
                forward_identity=args.forward_identity,
                # The CLI is the operator's: allow-listed internal upstreams are theirs to use.
                internal_allowed=True,
                upstream=upstream_change(args, adding=True),
            )
            view = server_view(services, server)
            extra = await describe_upstream_auth(services, server, view, fresh=True)
            emit(args, [f"added {server.name}: {view['mcp_url']}", *extra, server.server_id], view)
        elif args.action == "list":
            rows = [server_view(services, s) for s in await registry.list()]
            emit(args, [f"{r['server_id']}\t{r['name']}\t{r['upstream_url']}\t{r['owner_email']}" for r in rows], rows)
        elif args.action == "show":
            server = await registry.get(args.server_id)
            view = server_view(services, server)
            extra = await describe_upstream_auth(services, server, view)
            emit(args, [f"{k}: {v}" for k, v in view.items() if k != "upstream_authorization"] + extra, view)
        elif args.action == "remove":
            await registry.remove(args.server_id)
            emit(args, [f"removed {args.server_id}"], {"removed": args.server_id})
        elif args.action == "edit":
            if tool_rule_given(args):  # checked before anything is written
                parse_rule(args.tools_allow, args.tools_deny, bool(args.tools_read_only))
            headers = [] if args.clear_headers else args.header
            server = await registry.update(
                args.server_id, name=args.name, upstream_url=args.upstream, headers=headers,
                forward_identity=args.forward_identity, internal_allowed=True,
                upstream=upstream_change(args, adding=False),
            )
            if tool_rule_given(args):
                change = await services.tools.set_server_rule(
                    args.server_id, allow=args.tools_allow, deny=args.tools_deny, read_only=args.tools_read_only,
                    pinned=args.tools_pinned, clear=args.tools_clear)
                for warning in change.warnings:
                    print(f"warning: {warning}", file=sys.stderr)
                server = await registry.get(args.server_id)
            view = server_view(services, server)
            extra = await describe_upstream_auth(services, server, view, fresh=True)
            emit(args, [f"updated {server.server_id}", *extra], view)
        elif args.action == "tools":
            await run_tools_command(args, services)
        elif args.action == "test":
            server = await registry.get(args.server_id)
            if server.upstream_auth == "oauth":  # the operator has no account there: say so, no failure
                result = account_needed(await registry.upstream_status(server, fresh=True))
            else:
                result = await McpProbe(services.upstream).probe(
                    server.upstream_url, registry.upstream_headers(server), public_only=not server.internal_upstream
                )
                if result.ok:  # as the dashboard's Test connection: the listed tools into the catalog
                    await refresh_catalog(services.tools, server.server_id, result)
            lines = ([f"ok: {result.server_name} {result.server_version} ({result.era})",
                      "tools: " + ", ".join(result.tools), result.catalog] if result.ok else
                     [f"needs a user account: {result.error}"] if result.needs_account else [f"failed: {result.error}"])
            emit(args, lines, result.as_dict())
            if not result.ok and not result.needs_account:
                raise SystemExit(1)
    elif args.command == "usage":
        await registry.get(args.server_id)
        if not 1 <= args.days <= MAX_DAYS:
            raise InvalidInput(f"--days must be 1 to {MAX_DAYS}")
        report = await UsageReports(services.storage).report(args.server_id, args.days)
        lines = [
            f"{args.server_id}, {report.label}: {report.calls} calls, {report.errors} errors "
            f"({report.error_rate:.1%}), {report.denied} denied by the tool policy, "
            f"{report.active_sessions} active sessions",
            "user\ttool\tcalls\terrors\tdenied\tp50_ms\tp95_ms",
            *(f"{r.user_email or r.user_sub}\t{r.target or '-'}\t{r.calls}\t{r.errors}\t{r.denied}\t{r.p50_ms}\t{r.p95_ms}"
              for r in report.table),
        ]
        emit(args, lines, report.as_dict())
    elif args.command == "authorizations":
        actor = await cli_actor(services, args.user)
        if args.action == "list":
            found = await services.dashboard.authorizations(actor)
            emit(args, [f"{a.client_id}\t{a.client_name}\t{', '.join(a.servers)}" for a in found],
                 [a.as_dict() for a in found])
        else:
            count = await services.dashboard.revoke_authorization(actor, args.client)
            emit(args, [f"revoked {args.client} for {args.user} ({count} grant(s))"],
                 {"revoked": args.client, "families": count})
    elif args.command == "connections":
        lines, data = await run_connections(args, services, await cli_actor(services, args.user))
        emit(args, lines, data)
    elif args.command == "users":
        emit(args, *await run_users(args, services))
    elif args.command == "grants":
        if args.action == "list":
            grants = await registry.grants(args.server_id)
            emit(args, [f"{g.kind}\t{g.value}\t{tool_rule_text(g)}" for g in grants], [asdict(g) for g in grants])
            return
        kind, value = ("email", args.email) if args.email else ("domain", args.domain)
        if args.action == "add":
            if tool_rule_given(args):  # the grant and its rule in one write
                grant = await services.tools.add_grant(args.server_id, kind, value, allow=args.tools_allow,
                                                       deny=args.tools_deny, read_only=bool(args.tools_read_only))
            else:
                grant = await registry.add_grant(args.server_id, kind, value)
            emit(args, [f"shared {args.server_id} with {kind} {grant.value} ({tool_rule_text(grant)})"], asdict(grant))
        elif args.action == "edit":
            if not tool_rule_given(args):
                raise InvalidInput("nothing to change: give --tools-allow, --tools-deny, --[no-]read-only "
                                   "or --tools-clear")
            grant = await services.tools.edit_grant(args.server_id, kind, value, allow=args.tools_allow,
                                                    deny=args.tools_deny, read_only=args.tools_read_only,
                                                    clear=args.tools_clear)
            emit(args, [f"{kind} {grant.value} on {args.server_id}: {tool_rule_text(grant)}"], asdict(grant))
        else:
            await registry.remove_grant(args.server_id, kind, value)
            emit(args, [f"removed {kind} {value} from {args.server_id}"], {"removed": [kind, value]})
    elif args.command == "clients":
        metadata = {
            "client_name": args.name,
            "redirect_uris": args.redirect_uri,
            "token_endpoint_auth_method": "client_secret_basic" if args.confidential else "none",
        }
        client, secret = await services.clients.register(metadata, kind="static")
        lines = [f"added client {client.client_name}"]
        if secret:
            lines.append(f"client secret (shown once): {secret}")
        emit(args, [*lines, client.client_id], registration_response(client, secret))
    elif args.command == "keys":
        if args.action == "rotate":
            key = await services.keyring.rotate()
            emit(args, [f"new signing key {key.kid}; older keys verify until their tokens expire", key.kid], {"kid": key.kid})
        else:
            rows = [
                {"kid": k.kid, "status": k.status, "created_at": k.created_at, "retire_at": k.retire_at}
                for k in await services.storage.list_signing_keys()
            ]
            emit(args, [f"{r['kid']}\t{r['status']}" for r in rows], rows)


async def main_async(args) -> int:
    if args.command == "doctor":  # before Config: a configuration that fails is a finding
        from services.ops.doctor import diagnose

        report = await diagnose(os.environ)
        emit(args, report.lines(), report.as_dict())
        return 1 if report.failed else 0
    config = Config.from_env()
    if args.command == "backup":
        from services.ops.backup import backup

        result = await backup(config, args.path, force=args.force)
        emit(args, [f"backup written: {result.path} ({result.bytes} bytes, schema version "
                    f"{result.schema_version}, integrity {result.integrity}, {result.seconds} s)"],
             result.as_dict())
        return 0
    services = build_services(config)
    await services.start(background=False)
    try:
        await run_admin(args, services)
    finally:
        await services.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Before anything logs; Config.from_env (next) refuses a MCPGW_LOG_FORMAT other than text or json.
    from services.common.logs import configure_logging

    configure_logging(os.environ.get("MCPGW_LOG_FORMAT", "text"), logging.INFO)
    try:
        if args.command == "serve":
            from serving import serve_command

            return serve_command()
        return asyncio.run(main_async(args))
    except (ConfigError, InvalidInput, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except GatewayError as exc:  # a refusal (OAuth, dashboard rules): its message
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (StorageError, OSError) as exc:
        print(f"error: storage ({os.environ.get('MCPGW_STORAGE', 'default')}) is not usable: {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
