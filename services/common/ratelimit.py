"""RateLimiter: in-memory token buckets per (action, key), generous enough for clients
behind shared egress addresses (claude.ai) and bounded in memory."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.common.cache import TtlCache

# action -> (burst, refill per second)
DEFAULT_RULES = {
    "register": (60.0, 1.0),  # per client IP: 60 at once, then one a second
    "token": (300.0, 20.0),  # per (client_id, IP)
}
MAX_KEYS = 50000


class RateLimiter:
    def __init__(self, rules: dict[str, tuple[float, float]] | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self._rules = rules or DEFAULT_RULES
        self._clock = clock
        # (action, key) -> (tokens, when counted). An entry lives until its bucket would be
        # full again, when it is the same as no entry; beyond MAX_KEYS the least recently
        # seen key starts afresh.
        self._buckets = TtlCache(MAX_KEYS, clock=clock)

    def allow(self, action: str, key: str) -> bool:
        burst, rate = self._rules[action]
        now = self._clock()
        tokens, stamp = self._buckets.get((action, key)) or (burst, now)
        tokens = min(burst, tokens + (now - stamp) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets.set((action, key), (tokens, now), ttl=(burst - tokens) / rate)
        return allowed
