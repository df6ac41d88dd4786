"""Tests for retry with backoff, jitter, deadlines and cancellation (fake clock)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock

from appliance.resilience import Deadline, DeadlineExceeded, RetryPolicy, retry, retry_on_types


class Flaky:
    """Fails the first ``failures`` calls (synchronously), then returns "ok"."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> Deferred[str]:
        self.calls += 1
        if self.calls <= self.failures:
            return fail(self.error(f"failure {self.calls}"))
        return succeed("ok")


def outcome(d: Deferred[object]) -> list[object]:
    """Collect whatever ``d`` fires with (a value or an exception)."""
    seen: list[object] = []
    d.addCallbacks(seen.append, lambda f: seen.append(f.value))
    return seen


def always(value: float) -> Callable[[], float]:
    """A jitter source returning a constant."""
    return lambda: value


def test_succeeds_after_transient_failures_with_backoff() -> None:
    """Failures are retried after base * multiplier ** n (jitter 1 = the full bound)."""
    clock = Clock()
    fn = Flaky(2)
    policy = RetryPolicy(max_attempts=5, base_delay=1.0, multiplier=2.0, max_delay=10.0)
    seen = outcome(retry(clock, policy, fn, jitter=always(0.999999)))
    assert fn.calls == 1 and seen == []
    clock.advance(0.99)
    assert fn.calls == 1
    clock.advance(0.01)
    assert fn.calls == 2
    clock.advance(1.99)
    assert fn.calls == 2
    clock.advance(0.01)
    assert fn.calls == 3 and seen == ["ok"]
    assert not clock.getDelayedCalls()


def test_full_jitter_draws_between_zero_and_bound() -> None:
    """The wait is jitter() times the backoff bound, capped by max_delay."""
    policy = RetryPolicy(base_delay=0.5, multiplier=3.0, max_delay=2.0)
    assert [policy.backoff(n) for n in (1, 2, 3)] == [0.5, 1.5, 2.0]
    clock = Clock()
    fn = Flaky(1)
    retry(clock, policy, fn, jitter=always(0.5))
    assert clock.getDelayedCalls()[0].getTime() == pytest.approx(0.25)  # type: ignore[misc]


def test_gives_up_after_max_attempts_with_last_failure() -> None:
    """After max_attempts the last failure is delivered."""
    clock = Clock()
    fn = Flaky(10)
    seen = outcome(retry(clock, RetryPolicy(max_attempts=3, base_delay=0.1), fn,
                         jitter=always(1.0)))
    clock.pump([0.1] * 20)
    assert fn.calls == 3
    assert isinstance(seen[0], ConnectionError) and str(seen[0]) == "failure 3"


def test_retry_on_predicate_stops_at_once() -> None:
    """A failure the predicate rejects is not retried."""
    clock = Clock()
    fn = Flaky(5, error=ValueError)
    policy = RetryPolicy(max_attempts=5, retry_on=retry_on_types(ConnectionError))
    seen = outcome(retry(clock, policy, fn))
    assert fn.calls == 1 and isinstance(seen[0], ValueError)
    assert not clock.getDelayedCalls()


def test_max_total_cuts_a_hanging_attempt() -> None:
    """An attempt that hangs past max_total is cancelled with DeadlineExceeded."""
    clock = Clock()
    attempts: list[Deferred[object]] = []

    def hang() -> Deferred[object]:
        attempts.append(Deferred())
        return attempts[-1]

    seen = outcome(retry(clock, RetryPolicy(max_attempts=5, max_total=3.0), hang))
    clock.advance(3.0)
    assert len(attempts) == 1 and isinstance(seen[0], DeadlineExceeded)
    assert not clock.getDelayedCalls()


def test_no_retry_whose_wait_outlasts_the_deadline() -> None:
    """A backoff longer than the time left ends the retries with the last failure."""
    clock = Clock()
    fn = Flaky(10)
    policy = RetryPolicy(max_attempts=10, base_delay=1.0, multiplier=2.0)
    seen = outcome(retry(clock, policy, fn, deadline=Deadline(clock, 2.5), jitter=always(1.0)))
    clock.pump([0.5] * 10)
    # waits 1 then 2 would end at 3 > 2.5: two attempts only
    assert fn.calls == 2 and isinstance(seen[0], ConnectionError)


def test_cancel_during_backoff_cancels_timer() -> None:
    """Cancelling while waiting removes the timer; no further attempt is made."""
    clock = Clock()
    fn = Flaky(10)
    d = retry(clock, RetryPolicy(max_attempts=5, base_delay=1.0), fn, jitter=always(1.0))
    seen = outcome(d)
    assert len(clock.getDelayedCalls()) == 1
    d.cancel()
    assert isinstance(seen[0], CancelledError)
    assert not clock.getDelayedCalls()
    clock.advance(100)
    assert fn.calls == 1


def test_cancel_during_attempt_cancels_it() -> None:
    """Cancelling while an attempt runs cancels that attempt and stops."""
    clock = Clock()
    cancelled: list[bool] = []
    calls: list[int] = []

    def slow() -> Deferred[object]:
        calls.append(1)
        return Deferred(lambda _: cancelled.append(True))

    d = retry(clock, RetryPolicy(max_attempts=5), slow)
    seen = outcome(d)
    d.cancel()
    assert cancelled == [True] and isinstance(seen[0], CancelledError)
    clock.advance(100)
    assert calls == [1] and not clock.getDelayedCalls()


def test_synchronous_exceptions_and_plain_values() -> None:
    """fn may raise or return a plain value."""
    clock = Clock()
    state = {"n": 0}

    def sometimes() -> str:
        state["n"] += 1
        if state["n"] == 1:
            raise ConnectionError("first")
        return "plain"

    seen = outcome(retry(clock, RetryPolicy(base_delay=0.0), sometimes, jitter=always(0.0)))
    clock.advance(0)
    assert seen == ["plain"]


def test_policy_validation() -> None:
    """Nonsense policies are refused."""
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)
