"""Logging vocabulary shared by every area: the request id of the request being served, security
events (one WARNING line each, on the `mcpgw.security` logger, with fields), and the two output
formats (`text` for a terminal, `json`: one object a line for journald and log shippers)."""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import re
import sys
import threading
import time

# Set by the handler for the request being served; read by the log formatter and by the
# proxy when it forwards X-Request-Id upstream. "-" outside a request.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

security_log = logging.getLogger("mcpgw.security")

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128
# What a client's X-Request-Id may be (UUIDs, hex, base64, W3C trace ids all fit). The id goes
# into every log line of the request, into a response header and into upstream requests, so a
# value with CR/LF, quotes, spaces or non-ASCII, or 10 kB of it, would let a client forge or
# bloat log lines (log injection): such a value is replaced by a fresh id.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/@-]+")
MAX_FIELD = 1024  # longest string field in a record; beyond: cut, with a marker
MAX_MESSAGE = 8192  # longest message
MAX_ITEMS = 32  # longest list field

# The attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "request_id",
}
# Fields the text access line already shows in its message: not repeated after it.
_TEXT_SHOWN_IN_MESSAGE = frozenset({"status", "method", "path", "remote_ip", "duration_ms", "route"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_PRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def security_event(event: str, message: str, **fields: object) -> None:
    """One WARNING line an operator can alert on. `event` is a short stable name
    (``refresh_reuse``, ``access_denied``, ``key_rotated``…); fields are the standard log fields
    (``user_sub``, ``client_id``, ``server_id``…) and never a secret or token."""
    security_log.warning(message, extra={"event": event, **fields})


def new_request_id() -> str:
    """16 hex characters from os.urandom, drawn 256 ids at a time (one getrandom call instead
    of one a request: ~0.1 µs; a counter with a random prefix would tell every client how many
    requests the gateway has served). Fork-safe: a forked worker starts on fresh bytes."""
    try:
        return next(_request_ids)  # a list iterator's next() is atomic: threads never share an id
    except StopIteration:
        return _refill_request_ids()


def _refill_request_ids() -> str:
    global _request_ids
    text = os.urandom(8 * _IDS_PER_DRAW).hex()
    ids = iter([text[i:i + 16] for i in range(0, len(text), 16)])
    _request_ids = ids
    return next(ids)


def _forget_request_ids() -> None:
    global _request_ids
    _request_ids = iter(())


_IDS_PER_DRAW = 256
_request_ids = iter(())
os.register_at_fork(after_in_child=_forget_request_ids)


def accept_request_id(value: str | None) -> str:
    """The client's X-Request-Id when it is a sane token (≤ 128 characters of
    ``[A-Za-z0-9._:+=/@-]``), else a new id."""
    if value and len(value) <= MAX_REQUEST_ID and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


# ------------------------------------------------------------------------- formats

_json_lines = False  # set by configure_logging


def configure_logging(format: str = "text", level: int = logging.INFO) -> None:
    """Root logging to stderr (journald under systemd) in `format`: ``json`` gives one JSON
    object a line; anything else is text (Config.from_env, which runs next, refuses a value
    other than text/json with a clear error)."""
    global _json_lines
    json_lines = _json_lines = format.strip().lower() == "json"
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    tornado_general = logging.getLogger("tornado.general")
    if not any(isinstance(f, MalformedRequestFilter) for f in tornado_general.filters):
        tornado_general.addFilter(MalformedRequestFilter())
    logging.captureWarnings(True)  # warnings.warn() output becomes a record, not loose stderr text
    if json_lines:
        # A traceback printed by the interpreter would be many lines that are not JSON.
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def announce(lines: list[str]) -> None:
    """Start-up lines for a person at a terminal (the listening banner): printed to stdout
    as they are in text format; in json format one INFO record on the `gateway` logger (the
    lines joined with "; ", runs of spaces as one), since under systemd stdout goes to the
    same journal."""
    if _json_lines:
        logging.getLogger("gateway").info("; ".join(" ".join(line.split()) for line in lines))
    else:
        print("\n".join(lines), flush=True)


def _log_uncaught(typ, value, tb) -> None:
    logging.getLogger("gateway").critical("uncaught exception", exc_info=(typ, value, tb))


class MalformedRequestFilter(logging.Filter):
    """Tornado's "Malformed HTTP message from …: Invalid header value '…'" quotes the
    refused value, which may be an Authorization header with one bad byte: the line keeps
    the reason and drops the quoted value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Malformed HTTP message from %s: %s" and isinstance(record.args, tuple) \
                and len(record.args) == 2:
            reason = str(record.args[1])
            quote = min((i for i in (reason.find("'"), reason.find('"')) if i >= 0), default=-1)
            if quote >= 0:
                record.args = (record.args[0], reason[:quote].rstrip(": ") + " (the value is not logged)")
        return True


class LineHandler(logging.StreamHandler):
    """A StreamHandler whose own failures (a record that cannot be formatted or written) are
    one line too, never logging's multi-line "--- Logging error ---" report."""

    def handleError(self, record: logging.LogRecord) -> None:
        try:
            kind = type(sys.exc_info()[1]).__name__
            self.stream.write(f'{{"level":"ERROR","logger":"mcpgw.logs","message":"a log record of logger '
                              f'{_json_str(record.name)} could not be written ({kind})"}}\n')
            self.flush()
        except Exception:  # nowhere left to report to
            pass


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC, ms), level, logger, message, pid, request_id
    (inside a request), every `extra=` field (user_sub, client_id, server_id, status,
    duration_ms, event, reason…; a field that is unknown is absent, never null) and exc_info
    (the traceback, one string). Pure ASCII: control characters, non-ASCII and lone surrogates
    are escaped or replaced, so no value can end a line or make it invalid."""

    _second = -1
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception:  # a record must never break the log
            return json.dumps({"time": self.timestamp(record), "level": "ERROR", "logger": "mcpgw.logs",
                               "message": f"a record of logger {_no_surrogates(str(record.name))} could not be formatted"},
                              separators=(",", ":"))

    def _format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
            # Workers share the parent's stdout/stderr: the journal files every line under the
            # parent's pid, so the line says which process wrote it.
            "pid": record.process,
        }
        rid = record.__dict__.get("request_id") or request_id.get()
        if rid != "-":
            entry["request_id"] = _field(rid)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in entry and not _unknown(value):
                entry[key] = _field(value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        line = json.dumps(entry, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        if "\\ud" in line:
            # A surrogate escape: a character outside the BMP (a valid pair) or a lone
            # surrogate (from undecodable bytes), which strict parsers refuse. Rare: redo it
            # with every surrogate code point replaced by U+FFFD.
            line = json.dumps({key: _no_surrogates(value) for key, value in entry.items()},
                              ensure_ascii=True, separators=(",", ":"))
        return line

    def timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a record
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message key=value…``: the request id inside a
    request, extra fields after the message. Control characters in the message and the
    fields are escaped (a client-chosen value cannot start a forged line); a traceback
    follows on its own lines, as usual for text logs."""

    def format(self, record: logging.LogRecord) -> str:
        rid = record.__dict__.get("request_id") or request_id.get()
        head = f"{self.formatTime(record)} {record.levelname} {record.name}"
        if rid != "-":
            head += f" [{_printable(str(rid))}]"
        line = f"{head}: {_printable(_message(record))}"
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in _TEXT_SHOWN_IN_MESSAGE and not _unknown(value):
                text = _printable(str(_field(value)))
                line += f' {key}="{text}"' if (" " in text or '"' in text or not text) else f" {key}={text}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


# ------------------------------------------------------------------------- values


def _message(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # arguments that do not fit the format string
        text = f"{_safe_str(record.msg)} (unformattable arguments: {_safe_str(record.args)})"
    return _cut(text, MAX_MESSAGE)


def _unknown(value: object) -> bool:
    """None or "": a field nobody knows is left out of the line (never null)."""
    return value is None or (isinstance(value, str) and not value)


def _field(value: object) -> object:
    """A JSON-safe value: str (cut at MAX_FIELD), bool, int, finite float, a list or tuple of
    those (at most MAX_ITEMS); else its str()."""
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple | frozenset | set):
        return [_field(item) if isinstance(item, str | int | float) else _cut(_safe_str(item))
                for item, _ in zip(value, range(MAX_ITEMS), strict=False)]
    return _cut(_safe_str(value))


def _cut(text: str, limit: int = MAX_FIELD) -> str:
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a __str__ that raises
        return f"<unprintable {type(value).__name__}>"


def _no_surrogates(value: object) -> object:
    if isinstance(value, list):
        return [_no_surrogates(item) for item in value]
    return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


def _json_str(text: str) -> str:
    """`text` inside a JSON string literal (without the quotes), ASCII only."""
    return json.dumps(_SURROGATE.sub("\ufffd", text), ensure_ascii=True)[1:-1]


def _printable(text: str) -> str:
    """`text` with control characters (CR, LF, ESC…, U+2028/9) shown as escapes."""
    if text.isprintable():
        return text
    return _NOT_PRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
