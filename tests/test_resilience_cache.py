"""Tests for the TTL + LRU cache: expiry, bounds, stale reads, single-flight loading."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from appliance.resilience import TTLCache


def make(max_entries: int = 3, ttl: float = 10.0, **kw: object
         ) -> tuple[TTLCache[str, object], Clock, CollectorRegistry]:
    """A cache named "secrets" with a fake clock and its own registry."""
    clock = Clock()
    registry = CollectorRegistry()
    cache: TTLCache[str, object] = TTLCache("secrets", clock, max_entries, ttl,
                                            registry=registry, **kw)  # type: ignore[arg-type]
    return cache, clock, registry


def count(registry: CollectorRegistry, what: str) -> float | None:
    """A cache counter's value."""
    return registry.get_sample_value(f"appliance_cache_{what}_total", {"cache": "secrets"})


def results(d: Deferred[object]) -> list[object]:
    """What ``d`` fired with so far (value or exception), consumed."""
    seen: list[object] = []
    d.addCallbacks(seen.append, lambda f: seen.append(f.value))
    return seen


def test_get_put_and_expiry() -> None:
    """A value is served until its TTL passes; per-put TTL overrides the default."""
    cache, clock, registry = make()
    cache.put("a", 1)
    cache.put("b", 2, ttl=1.0)
    assert cache.get("a") == 1 and cache.get("b") == 2
    clock.advance(1.0)
    assert cache.get("b") is None and cache.get("b", "dflt") == "dflt"
    assert cache.get("a") == 1
    clock.advance(9.0)
    assert cache.get("a") is None
    assert count(registry, "hits") == 3 and count(registry, "misses") == 3


def test_lru_eviction_by_count() -> None:
    """Past max_entries the least recently used entry goes."""
    cache, _, registry = make(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")  # a is now more recent than b
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2 and count(registry, "evictions") == 1
    assert registry.get_sample_value("appliance_cache_entries", {"cache": "secrets"}) == 2


def test_eviction_by_size_and_oversized_values() -> None:
    """max_size bounds the total sizeof; a value bigger than it is not stored."""
    cache, _, _ = make(max_entries=10, max_size=10, sizeof=len)
    cache.put("a", "xxxx")
    cache.put("b", "yyyy")
    cache.put("c", "zzzz")
    assert cache.size == 8 and cache.get("a") is None
    assert cache.put("b", "w" * 11) is False
    assert cache.get("b") is None and cache.size == 4
    with pytest.raises(ValueError):
        TTLCache("x", Clock(), 1, 1.0, max_size=5)


def test_get_stale_serves_recently_expired() -> None:
    """get_stale returns fresh values, and expired ones up to max_stale past expiry."""
    cache, clock, registry = make(ttl=5.0)
    cache.put("a", "v")
    assert cache.get_stale("a", 1.0) == "v"
    clock.advance(5.5)
    assert cache.get("a") is None
    assert cache.get_stale("a", 1.0) == "v"
    clock.advance(1.0)
    assert cache.get_stale("a", 1.0) is None
    assert cache.get_stale("a", 60.0) == "v"
    assert count(registry, "stale_hits") == 2
    assert cache.purge(max_stale=1.0) == 1 and len(cache) == 0


def test_invalidate_and_clear() -> None:
    """invalidate drops one key, clear all."""
    cache, _, _ = make()
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.invalidate("a") is True and cache.invalidate("a") is False
    cache.clear()
    assert len(cache) == 0 and cache.get("b") is None


def test_single_flight_one_loader_call_for_concurrent_misses() -> None:
    """Concurrent misses share one loader call; the value is then cached."""
    cache, _, _ = make()
    calls: list[Deferred[object]] = []

    def loader() -> Deferred[object]:
        calls.append(Deferred())
        return calls[-1]

    waiters = [results(cache.get_or_load("k", loader)) for _ in range(5)]
    assert len(calls) == 1 and all(w == [] for w in waiters)
    calls[0].callback("loaded")
    assert all(w == ["loaded"] for w in waiters)
    assert results(cache.get_or_load("k", loader)) == ["loaded"] and len(calls) == 1


def test_loader_failure_reaches_every_waiter_and_is_not_cached() -> None:
    """A failed load fails all waiters; the next call loads again."""
    cache, _, _ = make()
    pending: Deferred[object] = Deferred()
    waiters = [results(cache.get_or_load("k", lambda: pending)) for _ in range(3)]
    pending.errback(ConnectionError("backend down"))
    assert all(isinstance(w[0], ConnectionError) for w in waiters)
    assert cache.get("k") is None
    assert results(cache.get_or_load("k", lambda: "second")) == ["second"]


def test_synchronous_loader_and_exceptions() -> None:
    """A loader returning a value or raising works like a Deferred one."""
    cache, _, _ = make()
    assert results(cache.get_or_load("a", lambda: 42)) == [42]
    assert cache.get("a") == 42
    failed = results(cache.get_or_load("b", lambda: 1 / 0))
    assert isinstance(failed[0], ZeroDivisionError)


def test_stale_if_error_serves_old_value_when_load_fails() -> None:
    """With stale_if_error, a failed refresh returns a recently expired value."""
    cache, clock, _ = make(ttl=1.0)
    cache.put("k", "old")
    clock.advance(2.0)
    seen = results(cache.get_or_load("k", lambda: 1 / 0, stale_if_error=5.0))
    assert seen == ["old"]
    clock.advance(10.0)
    seen = results(cache.get_or_load("k", lambda: 1 / 0, stale_if_error=5.0))
    assert isinstance(seen[0], ZeroDivisionError)


def test_cancel_one_waiter_keeps_the_load_for_others() -> None:
    """One waiter leaving does not disturb the others; the last one cancels the load."""
    cache, _, _ = make()
    cancelled: list[bool] = []
    pending: Deferred[object] = Deferred(lambda _: cancelled.append(True))
    first_d = cache.get_or_load("k", lambda: pending)
    second_d = cache.get_or_load("k", lambda: pending)
    first, second = results(first_d), results(second_d)
    first_d.cancel()
    assert isinstance(first[0], CancelledError) and cancelled == []
    second_d.cancel()
    assert isinstance(second[0], CancelledError) and cancelled == [True]
    assert results(cache.get_or_load("k", lambda: "fresh")) == ["fresh"]


def test_invalidate_during_load_does_not_store_result() -> None:
    """A value loaded while its key was invalidated is delivered but not cached."""
    cache, _, _ = make()
    pending: Deferred[object] = Deferred()
    waiter = results(cache.get_or_load("k", lambda: pending))
    cache.invalidate("k")
    pending.callback("outdated")
    assert waiter == ["outdated"] and cache.get("k") is None


def test_two_caches_share_a_registry() -> None:
    """Two caches in one registry have separate labelled counters."""
    registry = CollectorRegistry()
    one: TTLCache[str, int] = TTLCache("one", Clock(), 1, 1.0, registry=registry)
    one.get("x")
    TTLCache("two", Clock(), 1, 1.0, registry=registry)
    assert registry.get_sample_value("appliance_cache_misses_total", {"cache": "one"}) == 1
    assert registry.get_sample_value("appliance_cache_misses_total", {"cache": "two"}) == 0
