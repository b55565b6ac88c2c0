"""The MCP protocol as the proxy needs it: jsonrpc (parsing, scopes, outcomes), eras (era
detection, 2026 routing headers), sse (the SSE parser). Modules are imported directly."""
