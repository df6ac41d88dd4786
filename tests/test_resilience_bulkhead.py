"""Tests for the bulkhead: slots, FIFO queue, rejection, timeouts, cancellation, metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from appliance.resilience import Bulkhead, BulkheadFull, BulkheadTimeout, Permit


def make(max_concurrent: int = 2, max_queue: int = 2,
         queue_timeout: float | None = None) -> tuple[Bulkhead, Clock, CollectorRegistry]:
    """A bulkhead named "db" with a fake clock and its own registry."""
    clock = Clock()
    registry = CollectorRegistry()
    return Bulkhead("db", clock, max_concurrent, max_queue, queue_timeout, registry), clock, \
        registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """A sample of the bulkhead metrics."""
    return registry.get_sample_value(name, {"bulkhead": "db", **labels})


def results(d: Deferred[Any]) -> list[Any]:
    """What ``d`` fired with so far (value or exception), consumed."""
    seen: list[Any] = []
    d.addCallbacks(seen.append, lambda f: seen.append(f.value))
    return seen


def test_slots_then_queue_then_fail_fast() -> None:
    """Two run, two wait, the fifth is rejected at once; gauges follow."""
    bulkhead, _, registry = make()
    granted = [results(bulkhead.acquire()) for _ in range(4)]
    assert [len(g) for g in granted] == [1, 1, 0, 0]
    assert value(registry, "appliance_bulkhead_in_flight") == 2
    assert value(registry, "appliance_bulkhead_queued") == 2
    rejected = results(bulkhead.acquire())
    assert isinstance(rejected[0], BulkheadFull)
    assert value(registry, "appliance_bulkhead_rejected_total", reason="full") == 1


def test_release_hands_slot_to_queue_in_fifo_order() -> None:
    """A released slot goes to the oldest waiter; double release is harmless."""
    bulkhead, _, _ = make(max_concurrent=1, max_queue=3)
    first = results(bulkhead.acquire())
    second, third = results(bulkhead.acquire()), results(bulkhead.acquire())
    permit = first[0]
    assert isinstance(permit, Permit)
    permit()
    permit()
    assert len(second) == 1 and third == []
    assert bulkhead.in_flight == 1 and bulkhead.queued == 1
    second[0].release()
    assert len(third) == 1
    third[0].release()
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0


def test_queue_timeout() -> None:
    """A waiter that gets no slot in time fails with BulkheadTimeout and leaves the queue."""
    bulkhead, clock, registry = make(max_concurrent=1, max_queue=1, queue_timeout=2.0)
    results(bulkhead.acquire())
    waiting = results(bulkhead.acquire())
    clock.advance(2.0)
    assert isinstance(waiting[0], BulkheadTimeout) and isinstance(waiting[0], BulkheadFull)
    assert bulkhead.queued == 0
    assert value(registry, "appliance_bulkhead_rejected_total", reason="timeout") == 1


def test_granted_waiter_timer_is_cancelled() -> None:
    """A waiter that gets its slot leaves no timeout timer behind."""
    bulkhead, clock, _ = make(max_concurrent=1, max_queue=1, queue_timeout=2.0)
    first = results(bulkhead.acquire())
    second = results(bulkhead.acquire())
    first[0].release()
    assert len(second) == 1 and not clock.getDelayedCalls()


def test_cancel_removes_waiter() -> None:
    """Cancelling a queued acquire removes it; the slot goes to the next waiter."""
    bulkhead, clock, registry = make(max_concurrent=1, max_queue=2, queue_timeout=5.0)
    first = results(bulkhead.acquire())
    second_d = bulkhead.acquire()
    second = results(second_d)
    third = results(bulkhead.acquire())
    second_d.cancel()
    assert isinstance(second[0], CancelledError)
    assert bulkhead.queued == 1 and value(registry, "appliance_bulkhead_queued") == 1
    first[0].release()
    assert len(third) == 1 and isinstance(third[0], Permit)
    assert not clock.getDelayedCalls()


def test_run_releases_on_success_and_failure() -> None:
    """run() holds a slot for the call and releases it however the call ends."""
    bulkhead, _, _ = make(max_concurrent=1, max_queue=1)
    pending: Deferred[str] = Deferred()
    first = results(bulkhead.run(lambda: pending))
    second = results(bulkhead.run(lambda: 1 / 0))
    assert bulkhead.in_flight == 1 and bulkhead.queued == 1
    pending.callback("done")
    assert first == ["done"] and isinstance(second[0], ZeroDivisionError)
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0


def test_run_cancel_cancels_the_running_call() -> None:
    """Cancelling run() while the call runs cancels the call and frees the slot."""
    bulkhead, _, _ = make(max_concurrent=1, max_queue=0)
    cancelled: list[bool] = []
    d = bulkhead.run(lambda: Deferred(lambda _: cancelled.append(True)))
    seen = results(d)
    d.cancel()
    assert cancelled == [True] and isinstance(seen[0], CancelledError)
    assert bulkhead.in_flight == 0


def test_reentrant_release_in_callback() -> None:
    """A waiter releasing synchronously in its callback passes the slot on correctly."""
    bulkhead, _, _ = make(max_concurrent=1, max_queue=3)
    first = results(bulkhead.acquire())
    order: list[int] = []

    def use(permit: Permit, n: int) -> None:
        order.append(n)
        permit()

    for n in range(3):
        bulkhead.acquire().addCallback(use, n)
    first[0].release()
    assert order == [0, 1, 2] and bulkhead.in_flight == 0 and bulkhead.queued == 0


def test_two_bulkheads_share_a_registry() -> None:
    """Several bulkheads report under one metric family with their own labels."""
    registry = CollectorRegistry()
    a = Bulkhead("a", Clock(), 1, registry=registry)
    Bulkhead("b", Clock(), 1, registry=registry)
    a.acquire()
    assert registry.get_sample_value("appliance_bulkhead_in_flight", {"bulkhead": "a"}) == 1
    assert registry.get_sample_value("appliance_bulkhead_in_flight", {"bulkhead": "b"}) == 0


def test_validation() -> None:
    """Zero slots or a negative queue are refused."""
    with pytest.raises(ValueError):
        Bulkhead("x", Clock(), 0)
    with pytest.raises(ValueError):
        Bulkhead("x", Clock(), 1, max_queue=-1)
