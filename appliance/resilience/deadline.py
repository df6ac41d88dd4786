"""
Deadlines: one absolute point in time that a whole operation (several
calls, retries, a queue wait) must finish by.

A request that arrives with 2 s to live hands a L{Deadline} down; each step
asks for the L{Deadline.remaining} time or bounds its L{Deferred} with
L{Deadline.bound}, and a sub-step can take a shorter L{Deadline.child}.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure

from appliance.resilience._support import ReactorTime

_T = TypeVar("_T")


class DeadlineExceeded(TimeoutError):
    """
    The deadline passed before the bounded work finished.

    A subclass of L{twisted.internet.defer.TimeoutError}, so code that
    already handles Twisted timeouts handles this too.
    """


class Deadline:
    """
    A point in time, C{seconds} after creation on C{clock}.

    @ivar at: the absolute time (in C{clock.seconds()} terms).
    """

    __slots__ = ("_clock", "at")

    def __init__(self, clock: ReactorTime, seconds: float) -> None:
        """
        @param clock: the L{IReactorTime} to measure with.
        @param seconds: time from now; C{0} or less is already expired.
        """
        self._clock = clock
        self.at: float = clock.seconds() + seconds

    @classmethod
    def at_time(cls, clock: ReactorTime, at: float) -> Deadline:
        """A deadline at the absolute time C{at} on C{clock}."""
        deadline = cls(clock, 0.0)
        deadline.at = at
        return deadline

    @property
    def clock(self) -> ReactorTime:
        """The clock this deadline is measured on."""
        return self._clock

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.at - self._clock.seconds())

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self._clock.seconds() >= self.at

    def child(self, seconds: float) -> Deadline:
        """
        A deadline C{seconds} from now, but never later than this one.
        """
        return Deadline.at_time(self._clock, min(self.at, self._clock.seconds() + seconds))

    def bound(self, d: Deferred[_T]) -> Deferred[_T]:
        """
        Cancel C{d} when the deadline passes, failing it with
        L{DeadlineExceeded}; C{d} is returned for chaining.

        If C{d} has a canceller, it runs (closing a connection, removing a
        queued waiter). An already expired deadline cancels C{d} at once.
        """
        if d.called:
            return d
        remaining = self.remaining()
        if remaining <= 0:
            d.addErrback(_already_expired)
            d.cancel()
            return d
        return d.addTimeout(remaining, self._clock, onTimeoutCancel=self._timed_out)

    def _timed_out(self, result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(CancelledError):
            raise DeadlineExceeded(f"deadline exceeded after {timeout:.3f}s")
        return result

    def __repr__(self) -> str:
        """Show the remaining time."""
        return f"<Deadline remaining={self.remaining():.3f}s>"


def _already_expired(failure: Failure) -> Any:
    if failure.check(CancelledError):
        raise DeadlineExceeded("deadline already expired")
    return failure
