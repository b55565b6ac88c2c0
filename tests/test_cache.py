"""TtlCache (services/common/cache.py): per-entry TTL on an injected clock, LRU eviction
when full (never clearing everything), get/set/pop/clear/len/items/in; and services on it
whose clock the test moves (rate limiting, sign-in session checks)."""

from __future__ import annotations

import math

import pytest

from services import build_services
from services.authserver.signin import SESSION_CHECK_TTL
from services.common.cache import TtlCache
from services.common.ratelimit import RateLimiter
from storage.base import User
from tests.support.inprocess import make_config, run


class Clock:
    """A clock the test moves: no sleeping for time to pass."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_entry_lives_its_ttl_and_not_a_moment_longer():
    clock = Clock()
    cache = TtlCache(10, ttl=3.0, clock=clock)
    cache.set("a", 1)
    clock.now += 2.999
    assert cache.get("a") == 1 and "a" in cache
    clock.now += 0.001
    assert cache.get("a") is None and "a" not in cache
    assert cache.get("a", "gone") == "gone"
    assert len(cache) == 0  # dropped when touched


def test_a_per_entry_ttl_overrides_the_default_and_none_means_until_evicted():
    clock = Clock()
    cache = TtlCache(10, ttl=3.0, clock=clock)
    cache.set("short", 1, ttl=0.5)
    cache.set("long", 2, ttl=60)
    forever = TtlCache(10, clock=clock)
    forever.set("k", "v")
    clock.now += 1
    assert cache.get("short") is None and cache.get("long") == 2
    clock.now += 10**9
    assert forever.get("k") == "v"
    cache.set("past", 3, ttl=-1)  # already expired (a token whose exp has passed)
    assert cache.get("past") is None
    cache.set("literal", 4, ttl=math.inf)  # never expires, though the cache has a default TTL
    clock.now += 10**12
    assert cache.get("literal") == 4 and cache.get("long") is None


def test_when_full_the_least_recently_used_entry_goes_and_only_that_one():
    cache = TtlCache(3, clock=Clock())
    for key in "abc":
        cache.set(key, key.upper())
    assert cache.get("a") == "A"  # a is now the most recently used; b the least
    cache.set("d", "D")
    assert len(cache) == 3
    assert [key for key, _ in cache.items()] == ["c", "a", "d"]
    assert cache.get("b") is None
    cache.set("c", "C2")  # re-setting refreshes recency too
    cache.set("e", "E")
    assert cache.get("a") is None and cache.get("c") == "C2"
    assert {key for key, _ in cache.items()} == {"c", "d", "e"}


def test_membership_and_items_do_not_change_recency():
    cache = TtlCache(2, clock=Clock())
    cache.set("a", 1)
    cache.set("b", 2)
    assert "a" in cache and [k for k, _ in cache.items()] == ["a", "b"]
    cache.set("c", 3)
    assert "a" not in cache and "b" in cache


def test_pop_and_clear():
    clock = Clock()
    cache = TtlCache(10, ttl=5, clock=clock)
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.pop("a") == 1 and cache.pop("a") is None and cache.pop("a", 0) == 0
    clock.now += 5
    assert cache.pop("b", "expired") == "expired" and len(cache) == 0
    cache.set("c", 3)
    cache.clear()
    assert len(cache) == 0 and cache.get("c") is None


def test_items_skip_expired_entries():
    clock = Clock()
    cache = TtlCache(10, clock=clock)
    cache.set("old", 1, ttl=1)
    cache.set("new", 2, ttl=10)
    clock.now += 2
    assert cache.items() == [("new", 2)]


def test_a_cache_needs_room_for_one_entry():
    with pytest.raises(ValueError):
        TtlCache(0)


# ------------------------------------------------- services on the cache and a moved clock


def test_rate_limit_buckets_refill_on_the_limiters_clock():
    clock = Clock()
    limiter = RateLimiter({"x": (2.0, 0.5)}, clock=clock)  # 2 at once, then one every 2 s
    assert [limiter.allow("x", "k") for _ in range(3)] == [True, True, False]
    assert limiter.allow("x", "other")  # buckets are per key
    clock.now += 1.9
    assert not limiter.allow("x", "k")
    clock.now += 0.1
    assert limiter.allow("x", "k") and not limiter.allow("x", "k")
    clock.now += 3600  # a full bucket again: the same as a key never seen
    assert [limiter.allow("x", "k") for _ in range(3)] == [True, True, False]


def test_a_positive_sign_in_check_is_reused_for_one_second_of_the_clock(tmp_path):
    @run
    async def main():
        clock = Clock()
        a = build_services(make_config(tmp_path), clock=clock)
        b = build_services(make_config(tmp_path))
        await a.start(background=False)
        await b.start(background=False)
        try:
            await a.storage.upsert_user(User("u-live", "live@example.com", True, "", "Live"))
            session = await a.accounts.start_session("u-live")
            assert await a.accounts.session_is_live(session.sid, "u-live")
            await b.accounts.end_session(session.sid)  # logout served by another instance
            clock.now += SESSION_CHECK_TTL - 0.01
            assert await a.accounts.session_is_live(session.sid, "u-live")  # a's check still holds
            clock.now += 0.01
            assert not await a.accounts.session_is_live(session.sid, "u-live")
        finally:
            await a.stop()
            await b.stop()
    main()
