"""TtlCache: the one small in-process cache every area uses, bounded in size (least recently
used entry evicted when full) with a time-to-live per entry, on an injected clock."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class TtlCache:
    """A mapping of at most `maxsize` entries. An entry lives `ttl` seconds of `clock` (the
    cache's default, or the one given to `set`; None: until evicted). A hit makes an entry
    the most recently used; an expired entry is dropped when it is next touched."""

    __slots__ = ("_entries", "_maxsize", "_ttl", "_clock")

    def __init__(self, maxsize: int, ttl: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        # key -> (expires_at or None, value); order is recency, oldest first.
        self._entries: OrderedDict[Hashable, tuple[float | None, Any]] = OrderedDict()
        self._maxsize = maxsize
        self._ttl = ttl
        self._clock = clock

    def get(self, key: Hashable, default: Any = None) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return default
        expires = entry[0]
        if expires is not None and expires <= self._clock():
            del self._entries[key]
            return default
        self._entries.move_to_end(key)
        return entry[1]

    def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store `value`; `ttl` overrides the cache's default for this entry (`math.inf`:
        no expiry even in a cache with a default TTL)."""
        ttl = self._ttl if ttl is None else ttl
        entries = self._entries
        entries[key] = (None if ttl is None else self._clock() + ttl, value)
        entries.move_to_end(key)
        if len(entries) > self._maxsize:
            entries.popitem(last=False)  # never "clear everything": one lookup refills one entry

    def pop(self, key: Hashable, default: Any = None) -> Any:
        entry = self._entries.pop(key, None)
        if entry is None or (entry[0] is not None and entry[0] <= self._clock()):
            return default
        return entry[1]

    def items(self) -> list[tuple[Hashable, Any]]:
        """A snapshot of the live entries, oldest first (recency unchanged)."""
        now = self._clock()
        return [(key, value) for key, (expires, value) in self._entries.items()
                if expires is None or expires > now]

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: Hashable) -> bool:
        """Whether `key` has a live entry (recency unchanged)."""
        entry = self._entries.get(key)
        return entry is not None and (entry[0] is None or entry[0] > self._clock())

    def __len__(self) -> int:
        """Entries held, counting expired ones not yet touched (bounded by maxsize)."""
        return len(self._entries)
