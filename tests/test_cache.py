"""TtlCache (services/common/cache.py): per-entry TTL on an injected clock, LRU eviction
when full (never clearing everything), get/set/pop/clear/len/items/in."""

from __future__ import annotations

import pytest

from services.common.cache import TtlCache


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
