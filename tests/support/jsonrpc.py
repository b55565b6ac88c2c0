"""JSON-RPC messages as the proxy tests write them by hand."""

from __future__ import annotations


def rpc(method: str, request_id: int | str | None = 1, **params) -> dict:
    """A request (or, with request_id=None, a notification)."""
    message: dict = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        message["id"] = request_id
    if params:
        message["params"] = params
    return message
