"""The one scope table: the OAuth scopes the authorization server grants and the proxy enforces
(services/authserver and services/proxy both import it from here). Pure, no I/O."""

SCOPE_CONNECT = "mcp:connect"  # initialize, ping, list methods, notifications, responses
SCOPE_INVOKE = "mcp:invoke"  # tools/call and every other method; implies mcp:connect
MCP_SCOPES = (SCOPE_CONNECT, SCOPE_INVOKE)
SUPPORTED_SCOPES = (*MCP_SCOPES, "offline_access")


def scope_allows(claims: dict, needed: str) -> bool:
    """Whether an access token's scope covers `needed`. mcp:invoke implies mcp:connect: a
    client allowed to call tools must be able to initialize and list them (DESIGN: connect
    covers initialize, discovery, ping, notifications, */list, subscriptions). Scope words
    are case-sensitive (RFC 6749 §3.3)."""
    words = claims.get("scope", "").split()
    return needed in words or (needed == SCOPE_CONNECT and SCOPE_INVOKE in words)
