"""
Deadline sweeps: one reactor timer per listener instead of one per
connection.

A connection keeps its deadlines as plain numbers and offers
C{check_deadlines(now)}; a L{DeadlineSweep} calls it on every live
connection of a L{appliance.host.drain.ConnectionTracker} a few times a
second. Creating, moving and cancelling a reactor timer per connection or
per request was a measurable share of the hot paths' cost; the price is
that a deadline fires up to one interval late.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class DeadlineSweep:
    """
    Checks the deadlines of a tracker's connections every C{interval}
    seconds on C{clock}: from L{start} (the factory's C{startFactory})
    until L{stop} was called (C{stopFactory}) and no connection is left.
    """

    log = Logger()

    def __init__(self, clock: Any, tracker: Any, interval: float) -> None:
        self.clock = clock
        self.tracker = tracker
        self.interval = interval
        self._call: LoopingCall | None = None
        self._listening = False

    @property
    def running(self) -> bool:
        """Whether the sweep's timer is scheduled."""
        return self._call is not None

    def start(self) -> None:
        """Sweep from now on (a second start while running changes nothing)."""
        self._listening = True
        if self._call is None:
            self._call = LoopingCall(self._sweep)
            self._call.clock = self.clock
            self._call.start(self.interval, now=False)

    def stop(self) -> None:
        """Keep sweeping only until the connections that remain are gone."""
        self._listening = False

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for connection in list(self.tracker.connections()):
            try:
                connection.check_deadlines(now)
            except Exception:
                self.log.failure("deadline check failed for {connection!r}",
                                 connection=connection)
        if not self._listening and not len(self.tracker) and self._call is not None:
            self._call.stop()
            self._call = None
