"""
Retry with exponential backoff and full jitter.

Only for idempotent work: a failed attempt may have had its effect (the
request reached the server, the reply was lost), so the next attempt must
be safe to repeat. Reads, PUT-style writes and operations with an
idempotency key qualify; "append", "charge" or "increment" do not.

The delay before attempt M{n+1} is drawn uniformly from
M{[0, min(max_delay, base_delay * multiplier ** (n - 1))]} ("full jitter"),
which spreads the retries of many clients instead of synchronising them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

from attrs import field, frozen, validators
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.resilience._support import ReactorTime
from appliance.resilience.deadline import Deadline, DeadlineExceeded

_T = TypeVar("_T")

log = Logger()


def retry_everything(failure: Failure) -> bool:
    """The default C{retry_on}: every failure is worth another attempt."""
    return True


def retry_on_types(*types: type[BaseException]) -> Callable[[Failure], bool]:
    """A C{retry_on} predicate that retries only failures of these types."""

    def retry_on(failure: Failure) -> bool:
        return failure.check(*types) is not None

    return retry_on


@frozen
class RetryPolicy:
    """
    How often and how patiently to retry.

    @ivar max_attempts: attempts in total, the first one included.
    @ivar base_delay: the upper bound of the first backoff, in seconds.
    @ivar multiplier: growth of that bound per attempt.
    @ivar max_delay: cap of the bound, in seconds.
    @ivar max_total: time budget for all attempts and waits together, in
        seconds (C{None}: no budget). Each attempt is cancelled when the
        budget runs out, and no retry is scheduled whose wait would
        outlast it.
    @ivar retry_on: C{retry_on(failure) -> bool}; C{False} fails at once.
    """

    max_attempts: int = field(default=3, validator=validators.ge(1))
    base_delay: float = field(default=0.1, validator=validators.ge(0))
    multiplier: float = field(default=2.0, validator=validators.ge(1))
    max_delay: float = field(default=10.0, validator=validators.ge(0))
    max_total: float | None = None
    retry_on: Callable[[Failure], bool] = retry_everything

    def backoff(self, attempt: int) -> float:
        """The upper bound of the wait after failed attempt C{attempt} (1-based)."""
        return min(self.max_delay, self.base_delay * self.multiplier ** (attempt - 1))


def retry(
    clock: ReactorTime,
    policy: RetryPolicy,
    fn: Callable[..., Any],
    *args: Any,
    deadline: Deadline | None = None,
    jitter: Callable[[], float] = random.random,
    **kwargs: Any,
) -> Deferred[Any]:
    """
    Call C{fn(*args, **kwargs)} until it succeeds, C{policy} gives up, or
    the deadline passes; for idempotent work only.

    C{fn} may return a value or a L{Deferred}. The result is the first
    success, or the last failure (L{DeadlineExceeded} if the budget ran
    out during an attempt). Cancelling the returned L{Deferred} cancels the
    attempt in progress or the pending backoff timer, and no further
    attempt is made.

    @param deadline: an outer deadline; the effective one is the earlier of
        it and C{policy.max_total}.
    @param jitter: returns a float in M{[0, 1)}; injectable for tests.
    """
    if policy.max_total is not None:
        own = Deadline(clock, policy.max_total)
        deadline = own if deadline is None or own.at < deadline.at else deadline
    return _Retrying(clock, policy, fn, args, kwargs, deadline, jitter).start()


class _Retrying:
    """The state of one L{retry} call."""

    def __init__(
        self,
        clock: ReactorTime,
        policy: RetryPolicy,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: Deadline | None,
        jitter: Callable[[], float],
    ) -> None:
        self._clock = clock
        self._policy = policy
        self._call = lambda: fn(*args, **kwargs)
        self._deadline = deadline
        self._jitter = jitter
        self._attempt = 0
        self._pending: Deferred[Any] | None = None
        self._timer: Any = None
        self._cancelled = False
        self._result: Deferred[Any] = Deferred(self._cancel)

    def start(self) -> Deferred[Any]:
        """Make the first attempt; return the overall result."""
        self._run()
        return self._result

    def _run(self) -> None:
        self._timer = None
        self._attempt += 1
        attempt = maybeDeferred(self._call)
        if self._deadline is not None:
            attempt = self._deadline.bound(attempt)
        self._pending = attempt
        attempt.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, value: Any) -> None:
        self._pending = None
        if not self._cancelled:
            self._result.callback(value)

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if self._cancelled:
            return
        policy = self._policy
        if (self._attempt >= policy.max_attempts or failure.check(DeadlineExceeded)
                or not policy.retry_on(failure)):
            self._result.errback(failure)
            return
        delay = self._jitter() * policy.backoff(self._attempt)
        if self._deadline is not None and delay >= self._deadline.remaining():
            self._result.errback(failure)
            return
        log.debug("attempt {attempt} failed ({error}); retrying in {delay:.3f}s",
                  attempt=self._attempt, error=failure.getErrorMessage(), delay=delay)
        self._timer = self._clock.callLater(delay, self._run)

    def _cancel(self, result: Deferred[Any]) -> None:
        self._cancelled = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pending is not None:
            self._pending.cancel()
