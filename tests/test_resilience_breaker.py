"""State-machine tests for the circuit breaker with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from appliance.resilience import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(**policy: Any) -> tuple[CircuitBreaker, Clock, CollectorRegistry]:
    """A breaker named "upstream" with a fake clock and its own registry."""
    settings: dict[str, Any] = dict(failure_threshold=3, failure_ratio=None, open_base=10.0,
                                    open_multiplier=2.0, open_max=35.0)
    settings.update(policy)
    clock = Clock()
    registry = CollectorRegistry()
    return CircuitBreaker("upstream", clock, BreakerPolicy(**settings), registry=registry), \
        clock, registry


def gauge(registry: CollectorRegistry) -> float | None:
    """The breaker state gauge."""
    return registry.get_sample_value("appliance_breaker_state", {"breaker": "upstream"})


def transitions(registry: CollectorRegistry, to: str) -> float | None:
    """Transitions into ``to``."""
    return registry.get_sample_value("appliance_breaker_transitions_total",
                                     {"breaker": "upstream", "to": to})


def fail_times(breaker: CircuitBreaker, n: int) -> None:
    """Record n failures through the hot-path API."""
    for _ in range(n):
        assert breaker.allow()
        breaker.record_failure()


def results(d: Deferred[object]) -> list[object]:
    """What ``d`` fired with so far (value or exception), consumed."""
    seen: list[object] = []
    d.addCallbacks(seen.append, lambda f: seen.append(f.value))
    return seen


def test_consecutive_failures_trip_and_success_resets_count() -> None:
    """Three failures in a row open the breaker; a success in between resets the count."""
    breaker, _, registry = make()
    fail_times(breaker, 2)
    breaker.allow()
    breaker.record_success()
    fail_times(breaker, 2)
    assert breaker.state is CLOSED and gauge(registry) == 0
    fail_times(breaker, 1)
    assert breaker.state is OPEN and gauge(registry) == 1
    assert transitions(registry, "open") == 1
    assert not breaker.allow()
    assert registry.get_sample_value("appliance_breaker_rejected_total",
                                     {"breaker": "upstream"}) == 1


def test_failure_ratio_over_window_with_minimum_calls() -> None:
    """The ratio trips only with min_calls in the window; old calls slide out."""
    breaker, clock, _ = make(failure_threshold=0, failure_ratio=0.5, window=10.0, min_calls=4)
    for ok in (True, False, True):
        breaker.allow()
        (breaker.record_success if ok else breaker.record_failure)()
    assert breaker.state is CLOSED  # 1 of 3: below min_calls
    clock.advance(11.0)  # everything slides out of the window
    for ok in (True, False, True):
        breaker.allow()
        (breaker.record_success if ok else breaker.record_failure)()
    assert breaker.state is CLOSED
    breaker.allow()
    breaker.record_failure()  # 2 of 4 = 0.5 within the window
    assert breaker.state is OPEN
    assert breaker.status()["state"] == "open"


def test_open_period_then_half_open_probe_closes() -> None:
    """After the open period one probe is admitted; its success closes the breaker."""
    breaker, clock, registry = make()
    fail_times(breaker, 3)
    clock.advance(9.9)
    assert breaker.state is OPEN and breaker.retry_after() == pytest.approx(0.1)
    clock.advance(0.1)
    assert gauge(registry) == 2  # scrape sees half-open without any call
    assert breaker.state is HALF_OPEN
    probe = breaker.ticket()
    assert probe is not None
    assert breaker.ticket() is None  # half_open_max = 1: others fail fast
    probe.success()
    assert breaker.state is CLOSED and gauge(registry) == 0
    assert transitions(registry, "half-open") == 1 and transitions(registry, "closed") == 1


def test_open_period_backs_off_and_resets_after_success() -> None:
    """Repeated trips lengthen the open period (capped); a closed breaker starts over."""
    breaker, clock, _ = make()
    fail_times(breaker, 3)
    periods = []
    for _ in range(3):
        periods.append(breaker.retry_after())
        clock.advance(periods[-1])
        probe = breaker.ticket()
        assert probe is not None
        probe.failure()
        assert breaker.state is OPEN
    assert periods == [10.0, 20.0, 35.0]
    assert breaker.retry_after() == 35.0
    clock.advance(35.0)
    breaker.ticket().success()  # type: ignore[union-attr]
    fail_times(breaker, 3)
    assert breaker.retry_after() == 10.0


def test_bounded_concurrent_probes_and_success_threshold() -> None:
    """Up to half_open_max probes run at once; success_threshold successes close."""
    breaker, clock, _ = make(half_open_max=2, success_threshold=2)
    fail_times(breaker, 3)
    clock.advance(10.0)
    first, second = breaker.ticket(), breaker.ticket()
    assert first is not None and second is not None and breaker.ticket() is None
    rejected = results(breaker.call(lambda: "x"))[0]
    assert isinstance(rejected, CircuitOpen) and rejected.retry_after == 10.0
    first.success()
    assert breaker.state is HALF_OPEN
    second.success()
    assert breaker.state is CLOSED


def test_stale_ticket_outcomes_are_ignored() -> None:
    """A call admitted while closed cannot close or reopen a later half-open breaker."""
    breaker, clock, _ = make()
    old = breaker.ticket()
    assert old is not None
    fail_times(breaker, 3)
    clock.advance(10.0)
    assert breaker.state is HALF_OPEN
    old.success()
    assert breaker.state is HALF_OPEN
    old.failure()
    assert breaker.state is HALF_OPEN


def test_call_counts_outcomes_and_fails_fast() -> None:
    """call() counts values and failures, then fails fast with CircuitOpen."""
    breaker, clock, _ = make()
    assert results(breaker.call(lambda: succeed(5))) == [5]
    for _ in range(3):
        seen = results(breaker.call(lambda: fail(ConnectionError("down"))))
        assert isinstance(seen[0], ConnectionError)
    called: list[int] = []
    seen = results(breaker.call(lambda: called.append(1)))
    assert called == [] and isinstance(seen[0], CircuitOpen)
    assert seen[0].retry_after == 10.0  # type: ignore[attr-defined]
    clock.advance(4.0)
    assert results(breaker.call(lambda: None))[0].retry_after == 6.0  # type: ignore[attr-defined]


def test_is_failure_predicate_and_cancellation() -> None:
    """Failures the predicate rejects count as successes; cancellation counts neither."""
    clock = Clock()

    class ClientError(Exception):
        """A 4xx: the dependency is fine."""

    def is_failure(failure: Failure) -> bool:
        return not failure.check(ClientError)

    breaker = CircuitBreaker("upstream", clock, BreakerPolicy(failure_threshold=2,
                                                              failure_ratio=None),
                             is_failure=is_failure)
    for _ in range(5):
        results(breaker.call(lambda: fail(ClientError("404"))))
    assert breaker.state is CLOSED
    results(breaker.call(lambda: fail(ConnectionError())))
    pending: Deferred[object] = Deferred()
    d = breaker.call(lambda: pending)
    d.cancel()
    assert isinstance(results(d)[0], CancelledError)
    assert breaker.state is CLOSED and breaker.status()["consecutive_failures"] == 1
    results(breaker.call(lambda: fail(ConnectionError())))
    assert breaker.state is OPEN


def test_cancelled_probe_frees_its_slot() -> None:
    """A cancelled probe releases the half-open slot without deciding."""
    breaker, clock, _ = make()
    fail_times(breaker, 3)
    clock.advance(10.0)
    pending: Deferred[object] = Deferred()
    d = breaker.call(lambda: pending)
    assert breaker.ticket() is None
    d.cancel()
    results(d)
    assert breaker.state is HALF_OPEN
    assert breaker.ticket() is not None


def test_listener_and_logs() -> None:
    """Listeners see every change; a failing listener is logged, not raised."""
    breaker, clock, _ = make()
    seen: list[tuple[str, str]] = []
    breaker.on_state_change(lambda b, old, new: seen.append((old.label, new.label)))

    def broken(b: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("listener bug")

    breaker.on_state_change(broken)
    with capturedLogs() as events:
        fail_times(breaker, 3)
        clock.advance(10.0)
        breaker.ticket().success()  # type: ignore[union-attr]
    assert seen == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
    texts = [e.get("log_format", "") for e in events]
    assert any("opened" in t for t in texts)
    assert sum(1 for e in events if e.get("log_failure") is not None) == 3


def test_reset_and_hot_path_in_half_open() -> None:
    """reset() closes at once; record_* while half-open act as probe results."""
    breaker, clock, _ = make()
    fail_times(breaker, 3)
    breaker.reset()
    assert breaker.state is CLOSED and breaker.allow()
    fail_times(breaker, 3)
    clock.advance(10.0)
    assert breaker.allow() and not breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN and breaker.retry_after() == 20.0


def test_two_breakers_share_a_registry() -> None:
    """Breakers of one process report under one family, one label each."""
    registry = CollectorRegistry()
    a = CircuitBreaker("a", Clock(), BreakerPolicy(failure_threshold=1), registry=registry)
    CircuitBreaker("b", Clock(), registry=registry)
    a.allow()
    a.record_failure()
    assert registry.get_sample_value("appliance_breaker_state", {"breaker": "a"}) == 1
    assert registry.get_sample_value("appliance_breaker_state", {"breaker": "b"}) == 0


def test_is_failure_that_raises_counts_as_failure() -> None:
    """A broken is_failure predicate is logged and the call counts as a failure."""
    clock = Clock()

    def broken(failure: Failure) -> bool:
        raise RuntimeError("predicate bug")

    breaker = CircuitBreaker("upstream", clock, BreakerPolicy(failure_threshold=1),
                             is_failure=broken)
    with capturedLogs() as events:
        seen = results(breaker.call(lambda: fail(ConnectionError())))
    assert isinstance(seen[0], ConnectionError) and breaker.state is OPEN
    assert any(e.get("log_failure") is not None for e in events)


def test_no_timers_are_left_behind() -> None:
    """The breaker schedules nothing: open -> half-open is computed from the clock."""
    breaker, clock, _ = make()
    fail_times(breaker, 3)
    assert not clock.getDelayedCalls()


def test_policy_validation_and_metric_shape_conflicts() -> None:
    """Nonsense policies are refused; a metric name reused with another shape is an error."""
    with pytest.raises(ValueError):
        BreakerPolicy(failure_ratio=1.5)
    with pytest.raises(ValueError):
        BreakerPolicy(half_open_max=0)
    from prometheus_client import Counter

    from appliance.resilience._support import metric

    registry = CollectorRegistry()
    CircuitBreaker("a", Clock(), registry=registry)
    with pytest.raises(ValueError, match="another shape"):
        metric(Counter, registry, "appliance_breaker_state", "x", ("breaker",))
