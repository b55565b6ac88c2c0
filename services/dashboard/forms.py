"""Form parsing for the dashboard: check boxes, header lines as typed, messages as sentences."""

from __future__ import annotations


def sentence(message: str) -> str:
    message = message.strip().rstrip(".")
    return (message[:1].upper() + message[1:] + ".") if message else message


def form_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value or "").strip().lower() in ("1", "on", "true", "yes")


def header_lines(value) -> list[str]:
    """Headers as typed: a textarea ('Name: value' per line) or a JSON list."""
    if value is None:
        return []
    if isinstance(value, list):
        return [v if isinstance(v, str) else str(v) for v in value if str(v).strip()]
    return [line for line in str(value).splitlines() if line.strip()]
