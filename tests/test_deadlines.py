"""Tests for the deadline sweep shared by the HTTP engine and pow."""

from __future__ import annotations

from twisted.internet.task import Clock

from appliance.host.deadlines import DeadlineSweep
from appliance.host.drain import ConnectionTracker


class Late:
    """A connection with one deadline; remembers when it was found late."""

    def __init__(self, deadline: float, fail: bool = False) -> None:
        self.deadline = deadline
        self.fail = fail
        self.timed_out_at: float | None = None
        self.transport = None

    def begin_drain(self) -> None:
        """Nothing to finish."""

    def check_deadlines(self, now: float) -> None:
        if self.fail:
            raise RuntimeError("a bug in one connection")
        if self.timed_out_at is None and now >= self.deadline:
            self.timed_out_at = now


def test_a_deadline_fires_within_one_interval() -> None:
    """Each connection is checked every interval: a deadline is seen at most one late."""
    clock = Clock()
    tracker = ConnectionTracker(clock, "test")
    early, later = Late(0.25), Late(1.0)
    tracker.add(early)
    tracker.add(later)
    sweep = DeadlineSweep(clock, tracker, 0.1)
    sweep.start()
    clock.pump([0.1] * 12)
    assert early.timed_out_at is not None and 0.25 <= early.timed_out_at <= 0.35
    assert later.timed_out_at is not None and 1.0 <= later.timed_out_at <= 1.1


def test_one_failing_check_does_not_stop_the_others() -> None:
    """A connection whose check raises is logged; the rest are still checked."""
    clock = Clock()
    tracker = ConnectionTracker(clock, "test")
    broken, fine = Late(0.0, fail=True), Late(0.1)
    tracker.add(broken)
    tracker.add(fine)
    sweep = DeadlineSweep(clock, tracker, 0.1)
    sweep.start()
    clock.pump([0.1] * 3)
    assert fine.timed_out_at is not None
    assert sweep.running


def test_the_sweep_ends_after_stop_once_no_connection_is_left() -> None:
    """Stopped while connections remain, it keeps sweeping until they are gone."""
    clock = Clock()
    tracker = ConnectionTracker(clock, "test")
    connection = Late(100.0)
    tracker.add(connection)
    sweep = DeadlineSweep(clock, tracker, 0.1)
    sweep.start()
    sweep.stop()
    clock.advance(0.1)
    assert sweep.running
    tracker.discard(connection)
    clock.advance(0.1)
    assert not sweep.running and not clock.getDelayedCalls()
    sweep.start()  # listening again
    assert sweep.running
