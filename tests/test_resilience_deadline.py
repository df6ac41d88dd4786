"""Tests for Deadline with a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock

from appliance.resilience import Deadline, DeadlineExceeded


def failure_of(d: Deferred[object]) -> BaseException:
    """The exception a fired Deferred failed with (consumed)."""
    failures: list[BaseException] = []
    d.addErrback(lambda f: failures.append(f.value))
    assert failures, "the Deferred has not failed"
    return failures[0]


def test_remaining_and_expired() -> None:
    """Remaining time counts down to zero and never below; expired follows."""
    clock = Clock()
    deadline = Deadline(clock, 2.0)
    assert deadline.remaining() == 2.0 and not deadline.expired
    clock.advance(1.5)
    assert deadline.remaining() == pytest.approx(0.5)
    clock.advance(1.0)
    assert deadline.remaining() == 0.0 and deadline.expired


def test_child_is_never_later_than_parent() -> None:
    """A child deadline is the earlier of its own time and the parent's."""
    clock = Clock()
    parent = Deadline(clock, 5.0)
    assert parent.child(1.0).remaining() == 1.0
    assert parent.child(10.0).remaining() == 5.0
    clock.advance(4.0)
    assert parent.child(3.0).at == parent.at


def test_bound_times_out_with_deadline_exceeded() -> None:
    """An unfinished Deferred is cancelled at the deadline and fails with DeadlineExceeded."""
    clock = Clock()
    cancelled: list[bool] = []
    d: Deferred[object] = Deferred(lambda _: cancelled.append(True))
    Deadline(clock, 1.0).bound(d)
    clock.advance(0.99)
    assert not d.called
    clock.advance(0.01)
    error = failure_of(d)
    assert isinstance(error, DeadlineExceeded) and isinstance(error, TimeoutError)
    assert cancelled == [True]


def test_bound_passes_results_and_clears_timer() -> None:
    """A result before the deadline passes through and leaves no timer behind."""
    clock = Clock()
    d: Deferred[int] = Deferred()
    Deadline(clock, 1.0).bound(d)
    d.callback(7)
    results: list[int] = []
    d.addCallback(results.append)
    assert results == [7] and not clock.getDelayedCalls()


def test_bound_on_expired_deadline_cancels_at_once() -> None:
    """An already expired deadline fails the Deferred immediately, without a timer."""
    clock = Clock()
    deadline = Deadline(clock, 0.0)
    d: Deferred[object] = deadline.bound(Deferred())
    assert isinstance(failure_of(d), DeadlineExceeded)
    assert not clock.getDelayedCalls()


def test_caller_cancel_stays_a_cancel() -> None:
    """A caller's own cancel before the deadline is a CancelledError, not a timeout."""
    clock = Clock()
    d: Deferred[object] = Deadline(clock, 5.0).bound(Deferred())
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    assert not clock.getDelayedCalls()


def test_bound_of_fired_deferred_is_untouched() -> None:
    """Bounding an already fired Deferred schedules nothing."""
    clock = Clock()
    d: Deferred[int] = Deferred()
    d.callback(1)
    Deadline(clock, 0.0).bound(d)
    assert not clock.getDelayedCalls()
    assert d.result == 1
