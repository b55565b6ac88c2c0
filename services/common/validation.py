"""Text checks for every edge that takes strings from outside: valid Unicode (lone surrogates pass
regexes, then fail in storage as a 500), no control characters, sane length; shared header parsing."""

from __future__ import annotations

import re

from services.common.errors import InvalidInput

__all__ = ["InvalidInput", "check_text", "max_age", "media_type", "scrub_text", "text_problem"]

_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls, DEL and C1 controls; the multi-line variant keeps tab, LF and CR.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_MULTILINE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def text_problem(value: str, *, multiline: bool = False) -> str | None:
    """What is wrong with `value` as text (no field name), or None when it is fine."""
    if value.isascii() and value.isprintable():
        return None  # the common case, two C loops
    if _SURROGATE.search(value):
        return "is not valid Unicode text (it holds a lone surrogate)"
    if (_CONTROL_MULTILINE if multiline else _CONTROL).search(value):
        return "must not contain control characters"
    return None


def check_text(value: object, field: str, *, limit: int, multiline: bool = False, label: str = "") -> str:
    """`value` when it is a string of valid Unicode text, without control characters (tab
    and line breaks allowed when `multiline`), at most `limit` characters; else raise
    InvalidInput naming `field` (`label`, e.g. "the name", is how the message says it)."""
    label = label or field
    if not isinstance(value, str):
        raise InvalidInput(f"{label} must be a string", field)
    problem = text_problem(value, multiline=multiline)
    if problem is not None:
        raise InvalidInput(f"{label} {problem}", field)
    if len(value) > limit:
        raise InvalidInput(f"{label} must be at most {limit} characters", field)
    return value


def scrub_text(value: str, limit: int) -> str:
    """`value` made safe to store as is: lone surrogates and control characters replaced
    by U+FFFD, cut to `limit` characters. For values that are recorded rather than
    refused (usage events: a client's bad tool name must not cost anyone their history)."""
    if len(value) > limit:
        value = value[:limit]
    if text_problem(value) is None:
        return value
    return _CONTROL.sub("\ufffd", _SURROGATE.sub("\ufffd", value))


# Header values read the same way everywhere.
_MAX_AGE = re.compile(r"max-age=(\d+)", re.IGNORECASE)


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value, lower-cased, without parameters ("" for none)."""
    return (content_type or "").split(";")[0].strip().lower()


def max_age(cache_control: str | None) -> int | None:
    """The max-age of a Cache-Control value in seconds, None when it has none."""
    match = _MAX_AGE.search(cache_control or "")
    return int(match.group(1)) if match else None
