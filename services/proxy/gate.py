"""ProxyGate: who may make a proxied MCP call, and the bookkeeping around it (the session it
belongs to, the usage event it leaves). The handler parses and relays; every decision is here.

Order on every request (docs/architecture.md §2): the Origin, the bearer token (401 with a
challenge naming the path's server id: no lookup needed), then the server and the sharing
decision, then scopes, then the session. An unauthenticated request never reaches the server
cache. Each refusal counts in auth_failures_total or policy_denials_total by reason; those that
look like an attack (another audience or origin, a user the sharing rules keep out, another
user's session) are also security events. Routine 401s (no or an expired token) are not."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from config import Config
from services.common.access import AccessPolicy, Principal
from services.common.logs import security_event
from services.common.metrics import Metrics
from services.common.scopes import MCP_SCOPES, SCOPE_CONNECT, SCOPE_INVOKE, scope_allows
from services.proxy.protocol import eras
from services.proxy.protocol.jsonrpc import INPUT_REQUIRED
from services.proxy.sessions import SessionMap
from services.proxy.tools.filtering import MAX_LIST_BYTES, ToolListError, dump_message, read_tools_message
from services.proxy.usage import UsageRecorder
from storage.base import McpSession, Server, UsageEvent

CHALLENGE_SCOPE = " ".join(MCP_SCOPES)  # the scopes a challenge names
TOOL_METHODS = frozenset({"tools/call", "tools/list"})  # the methods tool policy looks at
TOOL_NOT_AVAILABLE = -32602


class Refused(Exception):
    """A request the gateway answers itself: `status`, the JSON `body`, and for 401 and
    scope refusals the `www_authenticate` challenge. `jsonrpc` is False only for the
    unknown-server 404, an OAuth-style JSON error rather than a JSON-RPC one."""

    def __init__(self, status: int, body: dict, www_authenticate: str | None = None, jsonrpc: bool = True):
        super().__init__(status)
        self.status = status
        self.body = body
        self.www_authenticate = www_authenticate
        self.jsonrpc = jsonrpc


def token_failure(exc: Exception) -> str:
    """The auth_failures_total reason of a refused token (InvalidToken says it in words)."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason
    text = str(exc)
    for words, reason in _TOKEN_FAILURES:
        if words in text:
            return reason
    return "invalid"


_TOKEN_FAILURES = (("expired", "expired"), ("revoked", "revoked"), ("unknown key", "unknown_key"),
                   ("malformed", "malformed"), ("not a JWT", "malformed"))


def rpc_error(status: int, code: int, message: str, request_id=None, www_authenticate: str | None = None) -> Refused:
    return Refused(status, {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}},
                   www_authenticate)


class ToolRefused(Refused):
    """A tools/call (or a batch holding one) the caller's tool policy refuses: answered
    200 with the JSON-RPC error(s); `denied` the refused calls with their reasons."""

    def __init__(self, body, denied: list[tuple[object, str]]):
        super().__init__(200, body)
        self.denied = denied


class ToolContext:
    """What filtering a tools/list answer needs: the caller's principal and the server's
    records, and the tools/list request ids still to answer (id -> the request had a cursor);
    `pending` None on a resumed stream: every response listing tools is taken for one."""

    __slots__ = ("principal", "server", "grants", "pending")

    def __init__(self, principal: Principal, server: Server, grants, pending: list[tuple[object, bool]] | None):
        self.principal = principal
        self.server = server
        self.grants = grants
        self.pending = pending

    def take(self, message: object) -> bool | None:
        """Whether `message` answers a pending tools/list (then it is no longer pending):
        None when it does not, else whether that request had a cursor."""
        if not isinstance(message, dict) or "method" in message or "id" not in message:
            return None
        if self.pending is None:  # not known to be complete: nothing is seen to disappear
            result = message.get("result")
            return True if isinstance(result, dict) and "tools" in result else None
        found = message["id"]
        for index, (request_id, had_cursor) in enumerate(self.pending):
            if type(found) is type(request_id) and found == request_id:
                del self.pending[index]
                return had_cursor
        return None


class Call:
    """An admitted call: the token's claims, the server, and (once resolved) its session."""

    __slots__ = ("claims", "server", "server_id", "session")

    def __init__(self, claims: dict, server: Server, server_id: str):
        self.claims = claims
        self.server = server
        self.server_id = server_id
        self.session: McpSession | None = None


class ProxyGate:
    def __init__(self, config: Config, access: AccessPolicy, sessions: SessionMap, usage: UsageRecorder,
                 verify_token: Callable[[str], Awaitable[dict]], invalid_token: type[Exception],
                 metrics: Metrics | None = None):
        """`verify_token` is TokenService.verify_access_token and `invalid_token` the error it
        raises for a token to refuse (both from authserver, handed in by services/app.py)."""
        self._metrics = metrics if metrics is not None else Metrics()
        self._allowed_origins = frozenset((config.public_url, *config.allowed_origins))
        self._config = config
        self._access = access
        self._sessions = sessions
        self._usage = usage
        self._verify = verify_token
        self._invalid = invalid_token

    def challenge(self, server_id: str, error: str | None = None, description: str = "",
                  status: int = 401) -> Refused:
        metadata = f"{self._config.public_url}/.well-known/oauth-protected-resource/mcp/{server_id}"
        parts = [f'resource_metadata="{metadata}"', f'scope="{CHALLENGE_SCOPE}"']
        if error:
            parts.append(f'error="{error}"')
            if description:
                parts.append('error_description="{}"'.format(description.replace('"', "'")))
        return rpc_error(status, -32001 if status == 401 else -32003, description or "authorization required",
                         None, "Bearer " + ", ".join(parts))

    def origin_allowed(self, origin: str | None) -> bool:
        """Requests without Origin (native clients) pass; browsers need an allowed origin."""
        return not origin or origin.rstrip("/").lower() in self._allowed_origins

    def check_origin(self, origin: str | None, server_id: str) -> None:
        """403 for a browser origin that may not call the gateway (DNS rebinding, CSRF)."""
        if not self.origin_allowed(origin):
            self._metrics.inc("auth_failures_total", reason="origin")
            # The path's id is not known to be a server: it is not logged as one.
            security_event("origin_rejected", "MCP request from an origin that may not call the gateway",
                           origin=origin[:200], reason="origin")
            raise rpc_error(403, -32003, "this Origin is not allowed to call the gateway")

    async def admit(self, authorization: str, server_id: str) -> Call:
        """The call when the bearer token is valid for this server, the server exists, its
        sharing rules let the token's user in and the token has mcp:connect; else Refused."""
        metrics = self._metrics
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            metrics.inc("auth_failures_total", reason="missing")
            raise self.challenge(server_id)
        try:
            claims = await self._verify(token)
        except self._invalid as exc:
            metrics.inc("auth_failures_total", reason=token_failure(exc))
            raise self.challenge(server_id, "invalid_token", str(exc)) from None
        if claims["aud"] not in (self._config.server_resource(server_id), self._config.base_resource):
            metrics.inc("auth_failures_total", reason="audience")
            # A token minted for another resource replayed here. The path's id need not be a
            # server: it is logged only as the reason's detail, bounded.
            security_event("token_audience_mismatch", "access token presented to the wrong MCP resource",
                           user_sub=claims["sub"], client_id=claims.get("client_id", ""),
                           reason="audience", requested=server_id[:100])
            raise self.challenge(server_id, "invalid_token", "the access token is for another resource")
        access = self._access
        server = await access.server(server_id)
        if server is None:
            raise Refused(404, {"error": "not_found", "error_description": f"there is no MCP server {server_id}"},
                          jsonrpc=False)
        decision = await access.decide(
            Principal(sub=claims["sub"], email=claims.get("email", ""), hd=claims.get("hd", "")), server_id
        )
        if not decision.allowed:
            metrics.inc("policy_denials_total", reason="not_shared")
            security_event("access_denied", "MCP request refused by the sharing rules",
                           user_sub=claims["sub"], client_id=claims.get("client_id", ""), server_id=server_id,
                           reason=decision.reason)
            raise rpc_error(403, -32003, f"access denied: {decision.reason}")
        # Every MCP request (POST, the GET stream, DELETE) needs mcp:connect; mcp:invoke
        # implies it. The invoke methods also need mcp:invoke (require_invoke).
        if not scope_allows(claims, SCOPE_CONNECT):
            metrics.inc("policy_denials_total", reason="scope")
            raise self.challenge(server_id, "insufficient_scope", "this request needs the mcp:connect scope", 403)
        return Call(claims, server, server_id)

    def require_invoke(self, call: Call) -> None:
        """Step-up: a call that needs mcp:invoke with a token that lacks it is refused (403)."""
        if not scope_allows(call.claims, SCOPE_INVOKE):
            self._metrics.inc("policy_denials_total", reason="scope")
            raise self.challenge(call.server_id, "insufficient_scope", "this call needs the mcp:invoke scope", 403)

    async def resolve_session(self, call: Call, session_id: str, message) -> None:
        """The gateway session the client names, if it is this user's on this server."""
        claims = call.claims
        session = await self._sessions.resolve(session_id, claims["sub"], call.server_id)
        if session is None:
            self._metrics.inc("policy_denials_total", reason="session")
            # An unknown or expired id is routine (the client initializes again). A live
            # session of another user or server is someone presenting an id not theirs:
            # resolve() has just cached it (it reads before it compares the owner).
            other = self._sessions._cache.get(session_id)
            if other is not None:
                security_event("session_hijack_refused", "MCP session id presented by another user or for "
                               "another server", user_sub=claims["sub"], client_id=claims.get("client_id", ""),
                               server_id=call.server_id, reason="session_bound", owner_sub=other.user_sub,
                               session_server_id=other.server_id)
            raise rpc_error(404, -32001, "session not found (initialize again)", message and message.id)
        call.session = session

    async def start_session(self, call: Call, upstream_session: str, message) -> McpSession:
        """Map the upstream's new session (an initialize answer) to a gateway session id."""
        session = await self._sessions.create(
            user_sub=call.claims["sub"],
            server_id=call.server_id,
            upstream_session_id=upstream_session,
            # initialize names its version in the body; the header only follows it.
            protocol_version=str((message.params or {}).get("protocolVersion", ""))[:40],
        )
        call.session = session
        return session

    async def drop_session(self, call: Call) -> None:
        await self._sessions.drop(call.session.session_id)

    def record(self, call: Call, message, outcome: str, latency_ms: float, bytes_in: int, bytes_out: int,
               headers, era: str | None = None) -> None:
        """The usage event of a JSON-RPC request (notifications and responses leave none);
        `era` ("2025"/"2026") when the caller already knows it from the routing-header check."""
        if message is None or message.method is None or message.kind != "request" or outcome == INPUT_REQUIRED:
            return  # an input_required answer is interim: its retry is the call (one logical call)
        claims = call.claims
        self._usage.record(
            UsageEvent(
                at=time.time(),
                server_id=call.server_id,
                user_sub=claims["sub"],
                user_email=claims.get("email", ""),
                client_id=claims.get("client_id", ""),
                method=message.method,
                target=(message.target or "")[:500],  # a tool name, not a document
                outcome=outcome,
                latency_ms=latency_ms,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                era=era or eras.era_of(message, headers),
            )
        )

    # ------------------------------------------------------------- tool policy

    async def tool_rules(self, call: Call) -> tuple[Principal, Server, tuple]:
        """The caller and the server's cached records, for ToolService (its policy cache
        keys on their identity)."""
        server, grants = await self._access.rules(call.server_id)
        claims = call.claims
        principal = Principal(sub=claims["sub"], email=claims.get("email", ""), hd=claims.get("hd", ""))
        return principal, server or call.server, grants

    async def check_tools(self, tools, call: Call, message) -> ToolContext | None:
        """For a POST whose method is in TOOL_METHODS, or a batch: raise ToolRefused when a
        tools/call in it is one the caller may not use (a batch is refused whole; nothing of
        it reaches the upstream); the ToolContext when a tools/list answer is to be filtered."""
        members = message.members if message.kind == "batch" else (message,)
        rules = None
        denied: list[tuple[object, str]] = []
        pending: list[tuple[object, bool]] = []
        for member in members:
            if member.method == "tools/call":
                rules = rules or await self.tool_rules(call)
                decision = await tools.decide_call(*rules, member.target or "")
                if not decision.allowed:
                    denied.append((member, decision.reason))
            elif member.method == "tools/list" and member.id is not None:
                pending.append((member.id, (member.params or {}).get("cursor") is not None))
        if denied:
            self._metrics.inc("policy_denials_total", len(denied), reason="tool")
            refused = {id(member) for member, _ in denied}
            # One error per request (notifications and responses get no answer).
            errors = [_tool_error(member, id(member) in refused) for member in members if member.kind == "request"]
            body = (errors if message.kind == "batch" else errors[0]) if errors else _tool_error(message, True)
            raise ToolRefused(body, denied)
        if not pending:
            return None
        return ToolContext(*(rules or await self.tool_rules(call)), pending)

    async def resumed_tools(self, call: Call) -> ToolContext:
        """A GET resuming a stream (Last-Event-ID) may replay a tools/list answer the client
        never got: every response listing tools in it is filtered."""
        return ToolContext(*await self.tool_rules(call), None)

    async def filter_tools_answer(self, tools, context: ToolContext, data: bytes | str, *,
                                  must_answer: bool) -> bytes | None:
        """`data` (a JSON body or one SSE event's data) with every tools/list answer it holds
        filtered for the caller; None when it answers none of them (an SSE notification) and
        `must_answer` is False. ToolListError when it cannot be read: fail closed."""
        if len(data) > MAX_LIST_BYTES:
            raise ToolListError(f"the tools/list answer is larger than {MAX_LIST_BYTES // (1024 * 1024)} MiB")
        try:
            parsed = json.loads(data, parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ToolListError("the tools/list answer is not valid JSON") from None
        messages = parsed if isinstance(parsed, list) else [parsed]
        out, changed = [], False
        for item in messages:
            had_cursor = context.take(item)
            if had_cursor is None:
                out.append(item)
                continue
            listing = read_tools_message(item)
            out.append(await tools.filter_listing_message(
                context.principal, context.server, context.grants, listing,
                complete=not had_cursor and listing.next_cursor is None))
            changed = True
        if not changed:
            if must_answer:
                raise ToolListError("the upstream's answer holds no answer to the tools/list request")
            return None
        return dump_message(out if isinstance(parsed, list) else out[0])



def _tool_error(member, refused: bool) -> dict:
    message = "tool not available" if refused else "refused with the batch: it calls a tool that is not available"
    return {"jsonrpc": "2.0", "id": member.id, "error": {"code": TOOL_NOT_AVAILABLE, "message": message}}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
