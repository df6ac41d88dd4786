"""
Circuit breakers: stop calling a dependency that keeps failing, give it
time, then probe it carefully.

States:

 - B{closed}: calls pass; outcomes are counted. The breaker trips (opens)
   after C{failure_threshold} consecutive failures, or when at least
   C{min_calls} calls ended in the last C{window} seconds and the share of
   failures among them reached C{failure_ratio}.
 - B{open}: calls fail fast with L{CircuitOpen} for the open period. The
   period starts at C{open_base} seconds and is multiplied by
   C{open_multiplier} (capped at C{open_max}) each time the breaker trips
   again without having closed in between.
 - B{half-open}: after the open period at most C{half_open_max} probe calls
   run at once; others fail fast. C{success_threshold} probe successes close
   the breaker (and reset the open period); one probe failure opens it again.

The open -> half-open step happens lazily, on the first call, L{state} read
or scrape after the open period: no timer is left pending.

Two styles: L{CircuitBreaker.call} wraps a function; the hot-path style is
L{CircuitBreaker.ticket} (a ticket that knows which state admitted it) or
L{CircuitBreaker.allow} with L{CircuitBreaker.record_success} /
L{CircuitBreaker.record_failure}.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from attrs import field, frozen, validators
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.resilience._support import ReactorTime, metric, registry_or_private
from appliance.resilience.window import SlidingCounts


class BreakerState(Enum):
    """The three breaker states; C{code} is the metric value."""

    CLOSED = ("closed", 0)
    OPEN = ("open", 1)
    HALF_OPEN = ("half-open", 2)

    def __init__(self, label: str, code: int) -> None:
        self.label = label
        self.code = code


class CircuitOpen(Exception):
    """
    The breaker rejected the call without making it.

    @ivar name: the breaker's name.
    @ivar retry_after: seconds until a call may be admitted again (a hint
        for C{Retry-After}).
    """

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name} is open; retry after {retry_after:.3f}s")
        self.name = name
        self.retry_after = retry_after


def every_failure(failure: Failure) -> bool:
    """The default C{is_failure}: any error counts against the dependency."""
    return True


@frozen
class BreakerPolicy:
    """
    When a L{CircuitBreaker} trips and how long it stays open.

    @ivar failure_threshold: consecutive failures that trip it (0: off).
    @ivar failure_ratio: failure share over C{window} that trips it
        (None: off), once C{min_calls} calls ended in the window.
    @ivar window: the sliding window, in seconds.
    @ivar min_calls: calls needed in the window before the ratio counts.
    @ivar open_base: the first open period, in seconds.
    @ivar open_multiplier: growth of the open period per repeated trip.
    @ivar open_max: cap of the open period, in seconds.
    @ivar half_open_max: probes allowed at once while half-open.
    @ivar success_threshold: probe successes that close the breaker.
    """

    failure_threshold: int = field(default=5, validator=validators.ge(0))
    failure_ratio: float | None = field(default=0.5)
    window: float = field(default=10.0, validator=validators.gt(0))
    min_calls: int = field(default=20, validator=validators.ge(1))
    open_base: float = field(default=5.0, validator=validators.gt(0))
    open_multiplier: float = field(default=2.0, validator=validators.ge(1))
    open_max: float = field(default=60.0, validator=validators.gt(0))
    half_open_max: int = field(default=1, validator=validators.ge(1))
    success_threshold: int = field(default=1, validator=validators.ge(1))

    @failure_ratio.validator
    def _check_ratio(self, attribute: Any, value: float | None) -> None:
        if value is not None and not 0 < value <= 1:
            raise ValueError("failure_ratio must be in (0, 1] or None")

    def open_period(self, trips: int) -> float:
        """The open period after the C{trips}-th trip in a row (1-based)."""
        return min(self.open_max, self.open_base * self.open_multiplier ** (trips - 1))


class Ticket:
    """
    Admission of one call: report its outcome exactly once with
    L{success}, L{failure} or L{release} (neither: cancelled, not the
    dependency's fault). Outcomes of calls admitted before the breaker
    last changed state are ignored.
    """

    __slots__ = ("_breaker", "_done", "_generation", "_probe")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._done = False

    def success(self) -> None:
        """The call succeeded."""
        self._finish(True)

    def failure(self) -> None:
        """The call failed in a way that counts against the dependency."""
        self._finish(False)

    def release(self) -> None:
        """The call ended without saying anything about the dependency."""
        self._finish(None)

    def _finish(self, ok: bool | None) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(ok, self._generation, self._probe)


class CircuitBreaker:
    """
    A circuit breaker for one dependency; see the module docstring.

    Metrics (label C{breaker}): C{appliance_breaker_state} (0 closed,
    1 open, 2 half-open, read at scrape time),
    C{appliance_breaker_transitions_total{to}} and
    C{appliance_breaker_rejected_total}.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        clock: ReactorTime,
        policy: BreakerPolicy | None = None,
        is_failure: Callable[[Failure], bool] = every_failure,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param name: a fixed name, used as the metric label and in logs.
        @param clock: the L{IReactorTime} periods are measured on.
        @param policy: thresholds and periods (default: L{BreakerPolicy}()).
        @param is_failure: whether a failure of L{call} counts against the
            dependency (return False for, say, an HTTP 4xx).
        @param registry: where the metrics go (None: not exported).
        """
        self.name = name
        self.policy = policy if policy is not None else BreakerPolicy()
        self.is_failure = is_failure
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._consecutive = 0
        self._window = SlidingCounts(self.policy.window)
        self._trips = 0
        self._open_until = 0.0
        self._probes = 0
        self._probe_successes = 0
        self._listeners: list[Callable[[CircuitBreaker, BreakerState, BreakerState], None]] = []
        registry = registry_or_private(registry)
        metric(Gauge, registry, "appliance_breaker_state",
               "Breaker state: 0 closed, 1 open, 2 half-open.",
               ("breaker",)).labels(name).set_function(self._state_code)
        self._transitions = metric(
            Counter, registry, "appliance_breaker_transitions_total",
            "Breaker state changes, by the state entered.", ("breaker", "to"))
        self._rejected = metric(
            Counter, registry, "appliance_breaker_rejected_total",
            "Calls the breaker failed fast.", ("breaker",)).labels(name)

    @property
    def state(self) -> BreakerState:
        """The current state (moving open -> half-open if the period is over)."""
        self._maybe_half_open()
        return self._state

    def on_state_change(
        self, listener: Callable[[CircuitBreaker, BreakerState, BreakerState], None]
    ) -> None:
        """Call C{listener(breaker, old, new)} after every state change."""
        self._listeners.append(listener)

    def retry_after(self) -> float:
        """Seconds until a call may be admitted (0 when closed)."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._open_until - self._clock.seconds())
        if state is BreakerState.HALF_OPEN and self._probes >= self.policy.half_open_max:
            return self.policy.open_base
        return 0.0

    def ticket(self) -> Ticket | None:
        """
        A L{Ticket} for one call, or None when the call must fail fast.

        A ticket taken while half-open holds one of the C{half_open_max}
        probe slots until its outcome is reported: bound the call with a
        timeout (a L{Deadline}), or a hung probe keeps the breaker from
        admitting anything else.
        """
        probe = self._admit()
        return None if probe is None else Ticket(self, self._generation, probe)

    def allow(self) -> bool:
        """
        Whether to make a call now (hot path, no allocation). Report its
        outcome with L{record_success} or L{record_failure}. Prefer
        L{ticket} when a call can outlive a state change.
        """
        return self._admit() is not None

    def record_success(self) -> None:
        """A call admitted by L{allow} succeeded."""
        self._record(True, self._generation, self._state is BreakerState.HALF_OPEN)

    def record_failure(self) -> None:
        """A call admitted by L{allow} failed."""
        self._record(False, self._generation, self._state is BreakerState.HALF_OPEN)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Call C{fn(*args, **kwargs)} (a value or a L{Deferred}) through the
        breaker. Fails with L{CircuitOpen} without calling when open.
        Failures count unless C{is_failure} says otherwise; a cancelled
        call (L{CancelledError}) counts neither way.
        """
        ticket = self.ticket()
        if ticket is None:
            return fail(CircuitOpen(self.name, self.retry_after()))

        def succeeded(result: Any) -> Any:
            ticket.success()
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(CancelledError):
                ticket.release()
            elif self._counts(failure):
                ticket.failure()
            else:
                ticket.success()
            return failure

        return maybeDeferred(fn, *args, **kwargs).addCallbacks(succeeded, failed)

    def _counts(self, failure: Failure) -> bool:
        try:
            return bool(self.is_failure(failure))
        except Exception:
            self.log.failure("breaker {breaker}: is_failure raised; counting a failure",
                             breaker=self.name)
            return True

    def reset(self) -> None:
        """Close the breaker and forget all history (an operator's action)."""
        self._trips = 0
        self._transition(BreakerState.CLOSED, "reset")

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status}."""
        state = self.state
        successes, failures = self._window.totals(self._clock.seconds())
        return {"state": state.label, "retry_after": round(self.retry_after(), 3),
                "consecutive_failures": self._consecutive, "trips": self._trips,
                "window_successes": successes, "window_failures": failures}

    # -- state machine -----------------------------------------------------

    def _admit(self) -> bool | None:
        """None: rejected; else whether the admitted call is a probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and self._probes < self.policy.half_open_max:
            self._probes += 1
            return True
        self._rejected.inc()
        return None

    def _record(self, ok: bool | None, generation: int, probe: bool) -> None:
        if generation != self._generation:
            return
        if self._state is BreakerState.HALF_OPEN:
            if probe and self._probes > 0:
                self._probes -= 1
            if ok is True:
                self._probe_successes += 1
                if self._probe_successes >= self.policy.success_threshold:
                    self._trips = 0
                    self._transition(BreakerState.CLOSED, "probe succeeded")
            elif ok is False:
                self._trip("probe failed")
            return
        if self._state is not BreakerState.CLOSED or ok is None:
            return
        now = self._clock.seconds()
        self._window.add(now, ok)
        if ok:
            self._consecutive = 0
            return
        self._consecutive += 1
        policy = self.policy
        if policy.failure_threshold and self._consecutive >= policy.failure_threshold:
            self._trip(f"{self._consecutive} consecutive failures")
            return
        if policy.failure_ratio is not None:
            successes, failures = self._window.totals(now)
            total = successes + failures
            if total >= policy.min_calls and failures / total >= policy.failure_ratio:
                self._trip(f"{failures} of {total} calls failed in {policy.window}s")

    def _trip(self, reason: str) -> None:
        self._trips += 1
        period = self.policy.open_period(self._trips)
        self._open_until = self._clock.seconds() + period
        self._transition(BreakerState.OPEN, reason, period)

    def _maybe_half_open(self) -> None:
        if self._state is BreakerState.OPEN and self._clock.seconds() >= self._open_until:
            self._transition(BreakerState.HALF_OPEN, "open period over")

    def _transition(self, new: BreakerState, reason: str, period: float = 0.0) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._probes = 0
        self._probe_successes = 0
        self._consecutive = 0
        if new is BreakerState.CLOSED:
            self._window.clear()
        if old is new and new is not BreakerState.OPEN:
            return
        self._transitions.labels(self.name, new.label).inc()
        if new is BreakerState.OPEN:
            self.log.warn("breaker {breaker} opened for {period:.1f}s: {reason}",
                          breaker=self.name, period=period, reason=reason)
        else:
            self.log.info("breaker {breaker} is {state}: {reason}",
                          breaker=self.name, state=new.label, reason=reason)
        for listener in list(self._listeners):
            try:
                listener(self, old, new)
            except Exception:
                self.log.failure("breaker {breaker} state listener failed",
                                 breaker=self.name)

    def _state_code(self) -> float:
        if self._state is BreakerState.OPEN and self._clock.seconds() >= self._open_until:
            return float(BreakerState.HALF_OPEN.code)
        return float(self._state.code)
