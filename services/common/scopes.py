"""The one scope table: the OAuth scopes the authorization server grants and the proxy enforces
(services/authserver and services/proxy both import it from here). Pure, no I/O."""

SCOPE_CONNECT = "mcp:connect"  # initialize, ping, list methods, notifications, responses
SCOPE_INVOKE = "mcp:invoke"  # tools/call and every other method; implies mcp:connect
MCP_SCOPES = (SCOPE_CONNECT, SCOPE_INVOKE)
SUPPORTED_SCOPES = (*MCP_SCOPES, "offline_access")
