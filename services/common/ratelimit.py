"""RateLimiter: in-memory token buckets per (action, key), generous enough for clients
behind shared egress addresses (claude.ai) and bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict

# action -> (burst, refill per second)
DEFAULT_RULES = {
    "register": (60.0, 1.0),  # per client IP: 60 at once, then one a second
    "token": (300.0, 20.0),  # per (client_id, IP)
}
MAX_KEYS = 50000


class RateLimiter:
    def __init__(self, rules: dict[str, tuple[float, float]] | None = None):
        self._rules = rules or DEFAULT_RULES
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def allow(self, action: str, key: str) -> bool:
        burst, rate = self._rules[action]
        now = time.monotonic()
        tokens, stamp = self._buckets.pop((action, key), (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate)
        allowed = tokens >= 1.0
        self._buckets[(action, key)] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_KEYS:
            self._buckets.popitem(last=False)  # the least recently seen key starts afresh
        return allowed
