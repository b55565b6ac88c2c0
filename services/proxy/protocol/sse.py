"""`SseParser`: incremental Server-Sent Events framing; each event keeps its exact raw bytes
(forwarded unchanged) beside its parsed fields. Pure, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event: its exact bytes plus the parsed fields.

    ``data`` is the data lines joined with "\\n" ("" when there is none; ``has_data``
    tells an empty data line from no data field, as for a comment-only keep-alive).
    ``raw`` includes the blank line that ended the event, so concatenating every raw
    reproduces the stream byte for byte.
    """

    raw: bytes
    id: str | None = None
    event: str | None = None
    data: str = ""
    has_data: bool = False
    retry: int | None = None
    comments: tuple[str, ...] = ()

    @property
    def is_comment_only(self) -> bool:
        return not self.has_data and self.id is None and self.event is None and self.retry is None

    @property
    def type(self) -> str:
        """The event type a browser would dispatch ("message" by default)."""
        return self.event or "message"


_LINE_END = re.compile(rb"\r\n|\r|\n")


class SseParser:
    """Incremental ``text/event-stream`` framing (WHATWG HTML §9.2.6).

    Lines end with CRLF, LF or CR; a blank line ends an event. Feed bytes as they arrive
    in any split; partial events are kept until complete. A CR at the very end of the
    fed bytes is held until the next byte shows whether it is half of a CRLF, so the
    result never depends on where chunks were split; events that end with LF or CRLF
    (all real servers) come out as soon as their last byte arrives.
    """

    __slots__ = ("_buffer", "_scan", "_line_start", "_lines", "_first", "max_event_size")

    def __init__(self, *, max_event_size: int | None = None) -> None:
        self._buffer = bytearray()
        self._scan = 0  # where to look for the next line end
        self._line_start = 0  # start of the line being completed
        self._lines: list[bytes] = []  # complete lines of the event being built
        self._first = True  # a UTF-8 BOM is stripped from the very first line only
        self.max_event_size = max_event_size

    @property
    def pending(self) -> int:
        """How many bytes of a begun event are waiting for the rest of it."""
        return len(self._buffer)

    @property
    def pending_bytes(self) -> bytes:
        """The bytes of the event not yet complete (what a stream's abrupt end leaves behind)."""
        return bytes(self._buffer)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes; return the events completed by them, in order."""
        buffer = self._buffer
        buffer += chunk
        events: list[SseEvent] = []
        event_start = 0
        size = len(buffer)
        position = self._scan
        while True:
            match = _LINE_END.search(buffer, position)
            if match is None:
                position = size
                break
            end = match.end()
            if end == size and buffer[end - 1] == 0x0D:
                # A lone CR at the end may be the first half of CRLF: decide with the next byte.
                position = match.start()
                break
            line = bytes(buffer[self._line_start : match.start()])
            self._line_start = end
            position = end
            if line:
                self._lines.append(line)
                continue
            events.append(self._dispatch(bytes(buffer[event_start:end])))
            event_start = end
        if event_start:
            del buffer[:event_start]
            position -= event_start
            self._line_start -= event_start
        self._scan = position
        if self.max_event_size is not None and len(buffer) > self.max_event_size:
            raise ValueError(f"SSE event larger than {self.max_event_size} bytes")
        return events

    def flush(self) -> list[SseEvent]:
        """At the end of the stream: the event a trailing CR completed, if any.

        An event without its final blank line is incomplete and, as the SSE spec says,
        dropped; its bytes stay in `pending_bytes`.
        """
        buffer = self._buffer
        if not buffer.endswith(b"\r"):
            return []
        # The held CR ends a line; if that line is blank, the event is complete.
        line = bytes(buffer[self._line_start : len(buffer) - 1])
        if line:
            self._lines.append(line)
            self._line_start = len(buffer)
            self._scan = len(buffer)
            return []
        event = self._dispatch(bytes(buffer))
        buffer.clear()
        self._scan = self._line_start = 0
        return [event]

    def _dispatch(self, raw: bytes) -> SseEvent:
        lines = self._lines
        self._lines = []
        event_id: str | None = None
        event_type: str | None = None
        data: list[str] | None = None
        retry: int | None = None
        comments: list[str] = []
        for raw_line in lines:
            line = raw_line.decode("utf-8", "replace")
            if self._first:
                self._first = False
                if line.startswith("\ufeff"):
                    line = line[1:]
            if line.startswith(":"):
                comments.append(line[1:].removeprefix(" "))
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                if data is None:
                    data = [value]
                else:
                    data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id":
                if "\0" not in value:
                    event_id = value
            elif name == "retry":
                if value.isascii() and value.isdigit():
                    retry = int(value)
        return SseEvent(
            raw=raw,
            id=event_id,
            event=event_type,
            data="" if data is None else "\n".join(data),
            has_data=data is not None,
            retry=retry,
            comments=tuple(comments),
        )
