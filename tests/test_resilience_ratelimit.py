"""Tests for rates, quotas, headers and the in-memory limiters (fake clock, hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter
from twisted.internet.task import Clock

from appliance.host.metrics import lock_free
from appliance.resilience import (
    Decision,
    MemoryLimiter,
    Quota,
    Rate,
    parse_rate,
    rate_limit_headers,
)
from appliance.resilience._support import metric

ALGORITHMS = ("token_bucket", "gcra")


# -- parse_rate ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "limit", "period"), [
    ("100/s", 100, 1.0),
    ("6000/m", 6000, 60.0),
    ("10/1s", 10, 1.0),
    (" 5 / 500ms ", 5, 0.5),
    ("1/2.5h", 1, 9000.0),
    ("7/d", 7, 86400.0),
])
def test_parse_rate_accepts(text: str, limit: int, period: float) -> None:
    """The documented forms parse into limit and period."""
    assert parse_rate(text) == Rate(limit, period)


@pytest.mark.parametrize("text", ["", "100", "100/", "/s", "0/s", "100/0s", "-1/s",
                                  "1.5/s", "100/x", "100/sec", "100 per s", "١٠/s"])
def test_parse_rate_rejects(text: str) -> None:
    """Anything else raises ValueError saying what was expected."""
    with pytest.raises(ValueError, match="expected a rate such as 100/s"):
        parse_rate(text)


@given(st.integers(1, 10**9), st.one_of(st.none(), st.integers(1, 10**6)),
       st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_parse_rate_round_trips(limit: int, count: int | None, unit: str) -> None:
    """Every well-formed rate parses to its limit and period."""
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}[unit]
    text = f"{limit}/{'' if count is None else count}{unit}"
    rate = parse_rate(text)
    assert rate.limit == limit
    assert rate.period == pytest.approx((count or 1) * scale)
    assert parse_rate(str(rate)).limit == limit


@given(st.text(max_size=30))
def test_parse_rate_never_raises_anything_else(text: str) -> None:
    """Arbitrary text either parses to a positive rate or raises the ValueError."""
    try:
        rate = parse_rate(text)
    except ValueError as error:
        assert str(error).startswith("expected a rate such as 100/s")
    else:
        assert rate.limit > 0 and 0 < rate.period < math.inf


# -- Quota, Decision, headers ---------------------------------------------------


def test_quota_defaults_and_derived_values() -> None:
    """burst defaults to the limit; interval and window follow."""
    quota = Quota("gcra", Rate(10, 1.0))
    assert quota.burst == 10 and quota.interval == 0.1 and quota.window == pytest.approx(1.0)
    wide = Quota("token_bucket", Rate(60, 60.0), burst=5)
    assert wide.interval == 1.0 and wide.window == 5.0
    with pytest.raises(ValueError):
        Quota("leaky", Rate(1, 1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        wide.check_cost(6)


def test_headers_allowed_and_denied() -> None:
    """Allowed: policy and current state; denied: plus Retry-After, rounded up."""
    allowed = Decision(allowed=True, remaining=7, retry_after=0.0, reset=2.2, limit=10,
                       window=60.0)
    assert rate_limit_headers(allowed) == {
        "RateLimit-Policy": '"default";q=10;w=60',
        "RateLimit": '"default";r=7;t=3',
    }
    denied = Decision(allowed=False, remaining=0, retry_after=0.3, reset=59.5, limit=10,
                      window=60.0)
    headers = rate_limit_headers(denied, policy='per "client"')
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit"] == '"per \\"client\\"";r=0;t=60'
    with pytest.raises(ValueError):
        rate_limit_headers(denied, policy="bad\nname")


# -- memory limiter ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_burst_then_refill(algorithm: str) -> None:
    """A full bucket admits the burst at once, then one unit per interval."""
    clock = Clock()
    limiter = MemoryLimiter("api", clock, Quota(algorithm, Rate(2, 1.0), burst=4))  # type: ignore[arg-type]
    decisions = [limiter.try_acquire("c") for _ in range(5)]
    assert [d.allowed for d in decisions] == [True] * 4 + [False]
    assert [d.remaining for d in decisions] == [3, 2, 1, 0, 0]
    assert decisions[-1].retry_after == pytest.approx(0.5)
    assert decisions[3].reset == pytest.approx(2.0)
    clock.advance(0.5)
    assert limiter.try_acquire("c").allowed
    assert not limiter.try_acquire("c").allowed
    clock.advance(10)
    assert limiter.try_acquire("c").remaining == 3  # capped at the burst


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_keys_are_independent_and_costs_count(algorithm: str) -> None:
    """Each key has its own bucket; cost takes several units."""
    clock = Clock()
    limiter = MemoryLimiter("api", clock, Quota(algorithm, Rate(10, 1.0)))  # type: ignore[arg-type]
    assert limiter.try_acquire("a", cost=10).allowed
    assert not limiter.try_acquire("a").allowed
    assert limiter.try_acquire("b", cost=3).remaining == 7
    denied = limiter.try_acquire("b", cost=8)
    assert not denied.allowed and denied.retry_after == pytest.approx(0.1)
    assert limiter.try_acquire("b", cost=0).remaining == 7
    with pytest.raises(ValueError):
        limiter.try_acquire("a", cost=11)


def test_lru_bounds_keys() -> None:
    """A flood of distinct keys keeps at most max_keys; the oldest are forgotten."""
    clock = Clock()
    registry = CollectorRegistry()
    limiter = MemoryLimiter("api", clock, Quota("gcra", Rate(1, 60.0)), max_keys=100,
                            registry=registry)
    assert limiter.try_acquire("victim").allowed
    for n in range(10_000):
        limiter.try_acquire(f"flood-{n}")
    assert len(limiter) == 100
    assert registry.get_sample_value("appliance_ratelimit_evictions_total",
                                     {"limiter": "api"}) == 9_901
    assert registry.get_sample_value("appliance_ratelimit_decisions_total",
                                     {"limiter": "api", "decision": "allowed"}) == 10_001
    assert limiter.try_acquire("victim").allowed  # forgotten: full again


def test_recently_used_key_survives_flood() -> None:
    """A key in use stays while older idle keys are evicted."""
    limiter = MemoryLimiter("api", Clock(), Quota("token_bucket", Rate(1, 60.0)), max_keys=3)
    limiter.try_acquire("hot")
    for n in range(10):
        limiter.try_acquire(f"cold-{n}")
        assert not limiter.try_acquire("hot").allowed


def test_acquire_is_the_async_form() -> None:
    """acquire() returns an already fired Deferred with the same decision."""
    limiter = MemoryLimiter("api", Clock(), Quota("gcra", Rate(1, 1.0)))
    seen: list[Decision] = []
    limiter.acquire("k").addCallback(seen.append)
    assert seen[0].allowed and limiter.status()["keys"] == 1


# -- properties ------------------------------------------------------------------

steps = st.lists(st.tuples(st.floats(0, 3, allow_nan=False), st.integers(0, 6)),
                 min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), limit=st.integers(1, 20),
       period=st.sampled_from([0.1, 1.0, 7.0]), burst=st.integers(6, 30), steps=steps)
def test_never_admits_more_than_burst_plus_rate(algorithm: str, limit: int, period: float,
                                                burst: int, steps: list[tuple[float, int]]
                                                ) -> None:
    """Over any stretch of calls, admitted units <= burst + rate * elapsed."""
    clock = Clock()
    quota = Quota(algorithm, Rate(limit, period), burst=burst)  # type: ignore[arg-type]
    limiter = MemoryLimiter("p", clock, quota)
    admitted: list[tuple[float, int]] = []
    for delay, cost in steps:
        clock.advance(delay)
        if limiter.try_acquire("k", cost).allowed:
            admitted.append((clock.seconds(), cost))
    rate = quota.rate.per_second
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, cost in admitted[i:]:
            total += cost
            assert total <= burst + rate * (end - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(algorithm=st.sampled_from(ALGORITHMS), limit=st.integers(1, 20),
       burst=st.integers(6, 30), steps=steps)
def test_waiting_retry_after_admits(algorithm: str, limit: int, burst: int,
                                    steps: list[tuple[float, int]]) -> None:
    """A denied request is admitted after waiting its retry_after."""
    clock = Clock()
    limiter = MemoryLimiter("p", clock, Quota(algorithm, Rate(limit, 1.0), burst=burst))  # type: ignore[arg-type]
    for delay, cost in steps:
        clock.advance(delay)
        decision = limiter.try_acquire("k", cost)
        assert decision.allowed == (decision.retry_after == 0)
        assert 0 <= decision.remaining <= burst and decision.reset <= quota_window(limit, burst)
        if not decision.allowed:
            clock.advance(decision.retry_after)
            assert limiter.try_acquire("k", cost).allowed


def quota_window(limit: int, burst: int) -> float:
    """The refill time of a whole bucket, with float slack."""
    return burst / limit + 1e-6


def _decisions(registry: CollectorRegistry) -> tuple[float | None, ...]:
    """The allowed, denied and eviction counts of limiter C{api}."""
    return tuple(registry.get_sample_value(name, labels) for name, labels in (
        ("appliance_ratelimit_decisions_total", {"limiter": "api", "decision": "allowed"}),
        ("appliance_ratelimit_decisions_total", {"limiter": "api", "decision": "denied"}),
        ("appliance_ratelimit_evictions_total", {"limiter": "api"})))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ALGORITHMS), st.integers(1, 5), st.integers(0, 3),
       st.lists(st.tuples(st.floats(0, 3), st.sampled_from("abc")), max_size=40))
def test_admit_agrees_with_try_acquire(algorithm: str, limit: int, extra: int,
                                       steps: list[tuple[float, str]]) -> None:
    """admit() is try_acquire() with a cost of 1: same refusals, state and metrics."""
    clocks, registries = (Clock(), Clock()), (CollectorRegistry(), CollectorRegistry())
    quota = Quota(algorithm, Rate(limit, 1.0), burst=limit + extra)  # type: ignore[arg-type]
    fast, full = (MemoryLimiter("api", clock, quota, max_keys=2, registry=registry)
                  for clock, registry in zip(clocks, registries, strict=True))
    for advance, key in steps:
        for clock in clocks:
            clock.advance(advance)
        decision = full.try_acquire(key)
        assert fast.admit(key) == (None if decision.allowed else decision)
        assert fast._states == full._states
    assert _decisions(registries[0]) == _decisions(registries[1])


def test_admit_refusal_is_the_decision_for_429() -> None:
    """A refused admit() carries what the 429 headers need."""
    limiter = MemoryLimiter("api", Clock(), Quota("token_bucket", Rate(1, 2.0)))
    assert limiter.admit("k") is None
    refused = limiter.admit("k")
    assert refused is not None and not refused.allowed
    assert refused.retry_after == pytest.approx(2.0)
    assert rate_limit_headers(refused)["Retry-After"] == "2"


def test_lock_free_counts_stay_in_the_shared_family() -> None:
    """Lock-free children still export through the family others share, once each."""
    registry = CollectorRegistry()
    quota = Quota("token_bucket", Rate(1, 60.0))
    first = MemoryLimiter("api", Clock(), quota, registry=registry)
    second = MemoryLimiter("api", Clock(), quota, registry=registry)  # same series
    assert first.admit("k") is None
    assert second.admit("k") is None
    assert first.admit("k") is not None
    family = metric(Counter, registry, "appliance_ratelimit_decisions_total",
                    "Rate limit decisions.", ("limiter", "decision"))
    family.labels("api", "allowed").inc()  # as a Redis limiter of that name would
    assert _decisions(registry)[:2] == (3.0, 1.0)
    assert lock_free(family.labels("other", "allowed")) is lock_free(
        family.labels("other", "allowed"))
