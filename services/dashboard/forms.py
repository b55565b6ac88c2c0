"""Form parsing for the dashboard: check boxes, header lines as typed, messages as sentences."""

from __future__ import annotations

from services.common.upstream_settings import UpstreamAuthChange

UPSTREAM_KEYS = ("upstream_auth", "upstream_client_id", "upstream_client_secret", "clear_upstream_client_secret",
                 "upstream_scope", "upstream_audience", "upstream_resource", "upstream_send_resource",
                 "upstream_issuer")


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


def upstream_form(form: dict) -> UpstreamAuthChange | None:
    """The upstream authorization fields of the server form (or /api's members of the same
    names); None when none was sent. An empty secret field keeps the stored secret (it is
    never shown, so it is never sent back); `clear_upstream_client_secret` removes it."""
    if not any(key in form for key in UPSTREAM_KEYS):
        return None

    def text(key: str) -> str | None:
        value = form.get(key)
        return None if value is None else value if not isinstance(value, str) else value.strip()

    secret = text("upstream_client_secret") or None
    if form_bool(form.get("clear_upstream_client_secret")) and secret is None:
        secret = ""
    send = None
    if "upstream_send_resource" in form:
        send = form_bool(form["upstream_send_resource"])
    elif form.get("upstream_resource") in ("send", "omit"):
        send = form["upstream_resource"] == "send"
    return UpstreamAuthChange(mode=text("upstream_auth"), client_id=text("upstream_client_id"), client_secret=secret,
                              scope=text("upstream_scope"), audience=text("upstream_audience"), send_resource=send,
                              issuer=text("upstream_issuer"))
