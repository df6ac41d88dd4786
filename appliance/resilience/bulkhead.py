"""
Bulkheads: bounded concurrency with a bounded FIFO queue in front.

A bulkhead keeps one slow dependency from eating every connection, timer
and byte of memory of the process: at most C{max_concurrent} calls run, at
most C{max_queue} wait (in arrival order, optionally for at most
C{queue_timeout} seconds), and anything beyond fails at once with
L{BulkheadFull}, which a service maps to a 503.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed

from appliance.resilience._support import ReactorTime, metric, registry_or_private


class BulkheadFull(Exception):
    """
    No slot and no room in the queue: the call was rejected without waiting.

    @ivar name: the bulkhead's name.
    """

    def __init__(self, name: str, message: str = "") -> None:
        super().__init__(message or f"bulkhead {name} is full")
        self.name = name


class BulkheadTimeout(BulkheadFull):
    """
    The call waited in the queue for C{queue_timeout} seconds without
    getting a slot (a subclass of L{BulkheadFull}).
    """


class Permit:
    """
    A granted slot; call it (or L{release}) exactly when the work is done.
    Releasing twice is harmless.
    """

    __slots__ = ("_bulkhead", "released")

    def __init__(self, bulkhead: Bulkhead) -> None:
        self._bulkhead = bulkhead
        self.released = False

    def release(self) -> None:
        """Give the slot back; the next queued waiter (if any) gets it."""
        if not self.released:
            self.released = True
            self._bulkhead._release()

    __call__ = release


class _Waiter:
    __slots__ = ("deferred", "timer")

    def __init__(self, bulkhead: Bulkhead) -> None:
        self.deferred: Deferred[Permit] = Deferred(lambda _: bulkhead._forget(self))
        self.timer: Any = None


class Bulkhead:
    """
    Bounded concurrency plus a bounded FIFO queue; see the module docstring.

    Metrics (label C{bulkhead}): C{appliance_bulkhead_in_flight},
    C{appliance_bulkhead_queued} and
    C{appliance_bulkhead_rejected_total{reason="full"|"timeout"}}.
    """

    def __init__(
        self,
        name: str,
        clock: ReactorTime,
        max_concurrent: int,
        max_queue: int = 0,
        queue_timeout: float | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param name: a fixed name, used as the metric label and in errors.
        @param clock: the L{IReactorTime} for queue timeouts.
        @param max_concurrent: calls that may run at once (at least 1).
        @param max_queue: calls that may wait for a slot (0: none wait).
        @param queue_timeout: longest wait in the queue, in seconds, or None.
        @param registry: where the metrics go (None: not exported).
        """
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must not be negative")
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._in_flight = 0
        self._queue: deque[_Waiter] = deque()
        registry = registry_or_private(registry)
        # Read at scrape time: setting a gauge takes a lock on every call.
        metric(Gauge, registry, "appliance_bulkhead_in_flight",
               "Calls running inside the bulkhead.", ("bulkhead",)).labels(name).set_function(
            lambda: self._in_flight)
        metric(Gauge, registry, "appliance_bulkhead_queued",
               "Calls waiting for a bulkhead slot.", ("bulkhead",)).labels(name).set_function(
            lambda: len(self._queue))
        rejected = metric(
            Counter, registry, "appliance_bulkhead_rejected_total",
            "Calls rejected by the bulkhead (full, or waited too long).",
            ("bulkhead", "reason"))
        self._rejected_full = rejected.labels(name, "full")
        self._rejected_timeout = rejected.labels(name, "timeout")

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return len(self._queue)

    def acquire(self) -> Deferred[Permit]:
        """
        A slot: a L{Deferred} firing with a L{Permit} to call when done.

        Fails at once with L{BulkheadFull} when every slot and queue place
        is taken, or later with L{BulkheadTimeout}. Cancelling a queued
        request removes it from the queue.
        """
        if self._in_flight < self.max_concurrent and not self._queue:
            return succeed(self._grant())
        if len(self._queue) >= self.max_queue:
            self._rejected_full.inc()
            return fail(BulkheadFull(self.name))
        waiter = _Waiter(self)
        if self.queue_timeout is not None:
            waiter.timer = self._clock.callLater(self.queue_timeout, self._expire, waiter)
        self._queue.append(waiter)
        return waiter.deferred

    def try_acquire(self) -> Permit | None:
        """A slot now if one is free and nobody is queued (the hot path), else None."""
        if self._in_flight < self.max_concurrent and not self._queue:
            return self._grant()
        return None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Call C{fn(*args, **kwargs)} inside a slot and return its result; the
        slot is released however C{fn} ends. C{fn} may return a L{Deferred}.
        Cancelling the result cancels the wait or the running call.
        """

        def call(permit: Permit) -> Deferred[Any]:
            d = maybeDeferred(fn, *args, **kwargs)

            def release(result: Any) -> Any:
                permit.release()
                return result

            return d.addBoth(release)

        return self.acquire().addCallback(call)

    def status(self) -> dict[str, Any]:
        """JSON-ready numbers for C{/status}."""
        return {"in_flight": self._in_flight, "max_concurrent": self.max_concurrent,
                "queued": len(self._queue), "max_queue": self.max_queue}

    def _grant(self) -> Permit:
        self._in_flight += 1
        return Permit(self)

    def _release(self) -> None:
        self._in_flight -= 1
        while self._queue and self._in_flight < self.max_concurrent:
            waiter = self._queue.popleft()
            self._stop_timer(waiter)
            waiter.deferred.callback(self._grant())

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if self._remove(waiter):
            self._rejected_timeout.inc()
            waiter.deferred.errback(BulkheadTimeout(
                self.name, f"bulkhead {self.name}: no slot within {self.queue_timeout}s"))

    def _forget(self, waiter: _Waiter) -> None:
        self._remove(waiter)

    def _remove(self, waiter: _Waiter) -> bool:
        self._stop_timer(waiter)
        try:
            self._queue.remove(waiter)
        except ValueError:
            return False
        return True

    @staticmethod
    def _stop_timer(waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
