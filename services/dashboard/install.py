"""The install panel: how to add one gateway server to Cursor, VS Code, Claude Code, a
JSON `mcpServers` config or the MCP Inspector. Pure functions of the name and the URL."""

from __future__ import annotations

import base64
import json
import re
import shlex
from urllib.parse import quote, urlencode


def client_name(name: str) -> str:
    """A config key / CLI name: letters, digits, '-' and '_' only (clients are picky)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name.strip()).strip("-").lower()
    return slug[:64] or "mcp-server"


def install_snippets(name: str, mcp_url: str) -> dict[str, str]:
    key = client_name(name)
    cursor_config = base64.b64encode(json.dumps({"url": mcp_url}, separators=(",", ":")).encode()).decode()
    vscode = json.dumps({"name": key, "type": "http", "url": mcp_url}, separators=(",", ":"))
    return {
        "mcp_url": mcp_url,
        "name": key,
        "cursor_deeplink": "cursor://anysphere.cursor-deeplink/mcp/install?"
        + urlencode({"name": key, "config": cursor_config}),
        "vscode_deeplink": "vscode:mcp/install?" + quote(vscode, safe=""),
        "claude_command": f"claude mcp add --transport http {shlex.quote(key)} {shlex.quote(mcp_url)}",
        "json_config": json.dumps({"mcpServers": {key: {"type": "http", "url": mcp_url}}}, indent=2),
        "inspector_command": "npx @modelcontextprotocol/inspector --transport http --server-url "
        + shlex.quote(mcp_url),
    }
