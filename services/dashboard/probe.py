"""'Test connection': the gateway speaks MCP to an upstream (server/discover at 2026-07-28,
else the initialize handshake at 2025-11-25) and reports who answered and which tools it
offers, or exactly what went wrong. Also the reachability check of a registration."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from services.proxy.protocol.sse import SseParser
from services.proxy.upstream.errors import UpstreamError, UpstreamRefused, UpstreamTimeout
from services.proxy.upstream.pool import UpstreamClient

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
BODY_LIMIT = 1024 * 1024
STEP_TIMEOUT = 10.0
TOTAL_TIMEOUT = 20.0
MAX_TOOL_PAGES = 20  # within TOTAL_TIMEOUT; a longer list is reported as incomplete


@dataclass
class ProbeResult:
    ok: bool
    era: str = ""  # "2026-07-28 (server/discover)" or the negotiated handshake version
    protocol_version: str = ""
    server_name: str = ""
    server_version: str = ""
    tools: list[str] = field(default_factory=list)
    # The tool objects of every page as listed (for the tool catalog), and whether the
    # list ended (no nextCursor left after MAX_TOOL_PAGES).
    tool_defs: list = field(default_factory=list)
    tools_complete: bool = True
    catalog: str = ""  # what refreshing the tool catalog did (set by the dashboard)
    error: str = ""
    steps: list[str] = field(default_factory=list)  # what was tried, in order
    # An upstream that needs each user's own account (connected accounts): not a failure;
    # `error` says why nothing was listed, `authorization_server` where users connect.
    needs_account: bool = False
    authorization_server: str = ""

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "era": self.era,
            "protocol_version": self.protocol_version,
            "server_name": self.server_name,
            "server_version": self.server_version,
            "tools": self.tools,
            "tools_complete": self.tools_complete,
            "catalog": self.catalog,
            "error": self.error,
            "steps": self.steps,
            "needs_account": self.needs_account,
            "authorization_server": self.authorization_server,
        }


def account_needed(status) -> ProbeResult:
    """Test connection on a server whose upstream needs each user's own account, without one:
    what discovery found (`status`: services.common.upstream_settings.UpstreamAuthStatus)."""
    issuer = status.authorization_server if status is not None else ""
    message = "each user connects their own account" + (f" at {issuer}" if issuer else "")
    if status is not None and status.warning:
        message += f"; {status.warning}"
    return ProbeResult(ok=False, needs_account=True, authorization_server=issuer, error=message,
                       steps=["read the upstream's authorization metadata (no user account to call it with)"])


class ProbeFailed(Exception):
    """One step failed; the message is shown to the owner as is."""


class RpcError(ProbeFailed):
    def __init__(self, message: str, code: int | None = None, status: int = 0):
        super().__init__(message)
        self.code = code
        self.status = status


class _PublicOnly:
    """The shared upstream client for a server no administrator approved for internal
    upstreams: every request reaches public addresses only (see UpstreamClient.request)."""

    def __init__(self, upstream: UpstreamClient):
        self._upstream = upstream

    def request(self, *args, **kwargs):
        kwargs["public_only"] = True
        return self._upstream.request(*args, **kwargs)


class McpProbe:
    """`public_only` (check_reachable, probe): the server is not approved for internal
    upstreams (`not Server.internal_upstream`, or a URL someone other than an administrator
    is registering), so the probe connects as the proxy would for it."""

    def __init__(self, upstream: UpstreamClient | _PublicOnly):
        self._upstream = upstream

    async def check_reachable(self, url: str, headers: dict[str, str], *, public_only: bool = False) -> None:
        """Raise UpstreamRefused (SSRF guard, bad URL) or UpstreamError (DNS, connection,
        timeout) unless something answers HTTP at `url`; any status counts as reachable."""
        if public_only:
            return await McpProbe(_PublicOnly(self._upstream)).check_reachable(url, headers)
        response = await asyncio.wait_for(
            self._upstream.request(
                "POST", url, self._headers(headers, MODERN, "server/discover"),
                _rpc(1, "server/discover", _discover_params()), header_timeout=STEP_TIMEOUT,
            ),
            STEP_TIMEOUT + 5,
        )
        response.close()

    async def probe(self, url: str, headers: dict[str, str], *, public_only: bool = False) -> ProbeResult:
        if public_only:
            return await McpProbe(_PublicOnly(self._upstream)).probe(url, headers)
        result = ProbeResult(ok=False)
        try:
            await asyncio.wait_for(self._probe(url, headers, result), TOTAL_TIMEOUT)
            result.ok = True
        except TimeoutError:
            result.error = f"the upstream did not finish answering within {TOTAL_TIMEOUT:.0f} s"
        except UpstreamRefused as exc:
            result.error = f"refused by the gateway's address guard: {exc}"
        except UpstreamTimeout as exc:
            result.error = f"timed out: {exc}"
        except (UpstreamError, ProbeFailed) as exc:
            result.error = str(exc)
        except RecursionError:  # a value nested so deeply that reading it out failed
            result.error = "the upstream's answer is nested too deeply to read"
        return result

    async def _probe(self, url: str, headers: dict[str, str], result: ProbeResult) -> None:
        result.steps.append(f"POST server/discover (MCP-Protocol-Version {MODERN})")
        try:
            discovered, _ = await self._call(url, headers, MODERN, "server/discover", _discover_params())
        except RpcError as exc:
            result.steps.append(f"server/discover refused ({exc}); falling back to initialize")
            discovered = None
        if discovered is not None and MODERN in (discovered.get("supportedVersions") or []):
            result.era = "2026-07-28 (stateless, server/discover)"
            result.protocol_version = MODERN
            _server_info(result, (discovered.get("_meta") or {}).get(SERVER_INFO_META))
            result.steps.append("POST tools/list")
            meta = await self._tools(url, headers, MODERN, None, result)
            if not result.server_name:
                _server_info(result, meta.get(SERVER_INFO_META))
            return
        await self._handshake(url, headers, result)

    async def _handshake(self, url: str, headers: dict[str, str], result: ProbeResult) -> None:
        result.steps.append(f"POST initialize (protocolVersion {HANDSHAKE})")
        params = {
            "protocolVersion": HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "mcp-auth-gateway-probe", "version": "1"},
        }
        init, session = await self._call(url, headers, HANDSHAKE, "initialize", params)
        version = init.get("protocolVersion") if isinstance(init.get("protocolVersion"), str) else HANDSHAKE
        result.protocol_version = version
        result.era = f"{version} (initialize handshake{', session' if session else ', no session'})"
        _server_info(result, init.get("serverInfo"))
        try:
            result.steps.append("POST notifications/initialized")
            await self._notify(url, headers, version, session)
            result.steps.append("POST tools/list")
            await self._tools(url, headers, version, session, result)
        finally:
            if session:
                result.steps.append("DELETE the session")
                try:
                    response = await self._upstream.request(
                        "DELETE", url, self._headers(headers, version, None, session), None,
                        header_timeout=STEP_TIMEOUT,
                    )
                    response.close()
                except UpstreamError:
                    pass  # the probe's answer stands; the upstream will expire the session

    async def _tools(self, url, headers, version, session, result: ProbeResult) -> dict:
        """Every page of tools/list into `result` (names and the objects as listed); the
        last page's _meta."""
        names: list[str] = []
        cursor = None
        meta: dict = {}
        for page in range(MAX_TOOL_PAGES):
            if page:
                result.steps.append("POST tools/list (next page)")
            params = {"cursor": cursor} if cursor else {}
            if version >= MODERN:
                params.update(_discover_params())  # every 2026-era request carries the envelope
            listed, _ = await self._call(url, headers, version, "tools/list", params, session)
            meta = listed.get("_meta") or {}
            tools = listed.get("tools")
            for tool in tools if isinstance(tools, list) else []:
                result.tool_defs.append(tool)  # as listed: the catalog checks each one
                if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                    names.append(tool["name"])
            cursor = listed.get("nextCursor")
            if not cursor:
                break
        result.tools = names
        result.tools_complete = not cursor
        return meta

    def _headers(self, extra: dict[str, str], version: str, method: str | None, session: str | None = None):
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
            ("MCP-Protocol-Version", version),
        ]
        if method and version >= MODERN:
            headers.append(("Mcp-Method", method))
        if session:
            headers.append(("Mcp-Session-Id", session))
        return [*headers, *extra.items()]

    async def _notify(self, url, headers, version, session) -> None:
        body = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        response = await self._upstream.request(
            "POST", url, self._headers(headers, version, "notifications/initialized", session), body,
            header_timeout=STEP_TIMEOUT,
        )
        try:
            if response.status >= 400:
                raise ProbeFailed(f"notifications/initialized: the upstream answered HTTP {response.status}")
            await response.read_all(BODY_LIMIT)
        finally:
            response.close()

    async def _call(self, url, headers, version, method, params, session=None) -> tuple[dict, str | None]:
        """One JSON-RPC request; (result, the Mcp-Session-Id the upstream sent)."""
        response = await self._upstream.request(
            "POST", url, self._headers(headers, version, method, session), _rpc(1, method, params),
            header_timeout=STEP_TIMEOUT,
        )
        try:
            body = await response.read_all(BODY_LIMIT)
        finally:
            response.close()
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        message = _find_response(body, content_type)
        if message is None:
            if response.status >= 400:
                snippet = body[:200].decode("utf-8", "replace").strip()
                raise RpcError(
                    f"{method}: the upstream answered HTTP {response.status}" + (f": {snippet}" if snippet else ""),
                    status=response.status,
                )
            raise ProbeFailed(f"{method}: the upstream's answer is not a JSON-RPC response ({content_type or 'no content type'})")
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            raise RpcError(
                f"{method}: error {error.get('code')}: {error.get('message', 'no message')}",
                code=error.get("code"), status=response.status,
            )
        result = message.get("result")
        if not isinstance(result, dict):
            raise ProbeFailed(f"{method}: the upstream's result is not an object")
        return result, response.headers.get("Mcp-Session-Id")


def _rpc(request_id: int, method: str, params: dict) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode()


def _discover_params() -> dict:
    return {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientInfo": {"name": "mcp-auth-gateway-probe", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    }


def _find_response(body: bytes, content_type: str) -> dict | None:
    """The JSON-RPC response to request 1 in a JSON or SSE body; None when there is none or
    the body cannot be read (not JSON, not UTF-8, nested too deeply to parse)."""
    candidates: list = []
    if content_type == "text/event-stream":
        parser = SseParser()
        for event in parser.feed(body + b"\n\n"):
            if event.data:
                try:
                    candidates.append(json.loads(event.data))
                except (ValueError, RecursionError):  # RecursionError: nested too deeply
                    continue
    else:
        try:
            candidates.append(json.loads(body))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
            return None
    for item in candidates:
        for message in item if isinstance(item, list) else [item]:
            if isinstance(message, dict) and message.get("id") == 1 and "method" not in message:
                return message
    return None


def _server_info(result: ProbeResult, info) -> None:
    if isinstance(info, dict):
        result.server_name = str(info.get("name") or "")[:200]
        result.server_version = str(info.get("version") or "")[:100]
