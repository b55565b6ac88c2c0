"""Filtering a `tools/list` answer for one caller: the JSON-RPC response is parsed and checked
fail closed (anything malformed or too large raises ToolListError, never passes unfiltered),
its tools hashed for the catalog, and written again with only the tools the caller may use
(`nextCursor` and every other member kept). Pure, no I/O."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .catalog import tool_hash

MAX_LIST_BYTES = 8 * 1024 * 1024  # one answer (a JSON body or one SSE event's data)
MAX_TOOLS = 5000  # per page
MAX_NAME_CHARS = 256
MAX_NAME_BYTES = 300  # UTF-8; also keeps a catalog key within DynamoDB's 1 KiB sort key
# Characters no tool name may hold: controls, format characters (bidi overrides, zero
# width: they make one name look like another), surrogates, private use, unassigned, and
# line or paragraph separators.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class ToolListError(ValueError):
    """An upstream tools/list answer that cannot be filtered (malformed, too large, an
    unusable tool name): the proxy answers a JSON-RPC error, never the unfiltered list."""


def check_tool_name(name: object) -> str:
    """The name of a listed tool, or ToolListError: a non-empty string of at most 256
    characters (300 UTF-8 bytes) with no control, format or unassigned characters."""
    if not isinstance(name, str) or not name:
        raise ToolListError("a tool without a name (or a name that is not text)")
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ToolListError(f"a tool name of {len(name)} characters (at most {MAX_NAME_CHARS})")
    if not (name.isascii() and name.isprintable()):
        bad = [c for c in name if unicodedata.category(c) in _BAD_CATEGORIES]
        if bad:
            raise ToolListError(f"a tool name holds the character U+{ord(bad[0]):04X}")
    return name


@dataclass
class ToolListing:
    """One parsed tools/list response: `message` (the JSON-RPC object), its validated
    `tools` with their `hashes`, and `next_cursor`. An error response has no tools."""

    message: dict
    tools: list[dict]
    hashes: list[str]
    next_cursor: str | None
    is_error: bool = False

    def filtered(self, keep: Callable[[dict, str], bool]) -> dict:
        """The response with only the tools `keep(tool, hash)` accepts (a batch's member)."""
        if self.is_error:
            return self.message
        kept = [tool for tool, digest in zip(self.tools, self.hashes, strict=True) if keep(tool, digest)]
        result = {**self.message["result"], "tools": kept}
        if result.get("cacheScope") == "public":
            # 2026-07-28: a "public" list may be served by a shared cache to any user; through
            # the gateway the list depends on who asks (tool rules, pinning), on every page.
            result["cacheScope"] = "private"
        return {**self.message, "result": result}

    def render(self, keep: Callable[[dict, str], bool]) -> bytes:
        """`filtered(keep)` as compact JSON (a body, or one SSE event's data)."""
        return dump_message(self.filtered(keep))


def read_tools_result(result: object) -> tuple[list[dict], list[str], str | None]:
    """(tools, hashes, nextCursor) of a tools/list result object, checked."""
    if not isinstance(result, dict):
        raise ToolListError("the tools/list result is not an object")
    tools = result.get("tools")
    if not isinstance(tools, list):
        raise ToolListError("the tools/list result has no list of tools")
    if len(tools) > MAX_TOOLS:
        raise ToolListError(f"the tools/list result has {len(tools)} tools (at most {MAX_TOOLS} a page)")
    cursor = result.get("nextCursor")
    if cursor is not None and not isinstance(cursor, str):
        raise ToolListError("the tools/list nextCursor is not text")
    seen: set[str] = set()
    hashes = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise ToolListError("a tool that is not an object")
        name = check_tool_name(tool.get("name"))
        if name in seen:
            # Two definitions under one name: which one would a call reach?
            raise ToolListError(f"the tool name {name!r} is listed twice")
        seen.add(name)
        for member in ("annotations", "inputSchema"):
            if member in tool and not isinstance(tool[member], dict):
                raise ToolListError(f"the {member} of tool {name!r} is not an object")
        try:
            hashes.append(tool_hash(tool))
        except ValueError as exc:
            raise ToolListError(f"tool {name!r}: {exc}") from None
    return tools, hashes, cursor


def read_tools_response(data: bytes | str, max_bytes: int = MAX_LIST_BYTES) -> ToolListing:
    """Parse one JSON-RPC response answering tools/list (a JSON body, or the data of one SSE
    event). A JSON-RPC error response is kept as it is (it lists nothing)."""
    if len(data) > max_bytes:
        raise ToolListError(f"the tools/list answer is larger than {max_bytes // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        message = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ToolListError("the tools/list answer is not valid JSON") from None
    return read_tools_message(message)


def read_tools_message(message: object) -> ToolListing:
    """`read_tools_response` for a message parsed already (a member of a JSON-RPC batch)."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise ToolListError("the tools/list answer is not a JSON-RPC response")
    if "result" not in message:
        if isinstance(message.get("error"), Mapping):
            return ToolListing(message, [], [], None, is_error=True)
        raise ToolListError("the tools/list answer has neither a result nor an error")
    tools, hashes, cursor = read_tools_result(message["result"])
    return ToolListing(message, tools, hashes, cursor)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def dump_message(message: dict) -> bytes:
    # ASCII: whatever the upstream put in other members (a lone surrogate in _meta), the
    # answer the client gets is valid JSON in valid UTF-8.
    return json.dumps(message, separators=(",", ":")).encode("ascii")
