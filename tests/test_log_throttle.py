"""Throttled log lines, on a fake clock."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from appliance.host.log_throttle import LogThrottle


def throttle(interval: float = 10.0, max_kinds: int = 256) -> tuple[LogThrottle, Clock,
                                                                     list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    clock = Clock()
    return LogThrottle(Logger(observer=events.append), clock, interval, max_kinds), clock, events


def lines(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


def test_first_event_of_a_kind_is_logged_at_once() -> None:
    log, _, events = throttle()
    log.warn(("api", "unreachable"), "upstream {upstream}: {reason}", upstream="api",
             reason="refused")
    assert lines(events) == ["upstream api: refused"]
    assert events[0]["log_level"] is LogLevel.warn


def test_a_flood_gives_one_line_and_one_summary_per_interval() -> None:
    log, clock, events = throttle()
    for number in range(5000):
        log.warn("down", "upstream down: attempt {n}", n=number)
    assert lines(events) == ["upstream down: attempt 0"]
    clock.advance(10)
    assert lines(events)[1] == "upstream down: attempt 4999 (4999 more like this in the last 10s)"
    assert events[1]["throttle_suppressed"] == 4999
    for number in range(3):  # the flood goes on: still no line until the interval ends
        log.warn("down", "upstream down: attempt {n}", n=number)
    assert len(events) == 2
    clock.advance(10)
    assert lines(events)[2] == "upstream down: attempt 2 (3 more like this in the last 10s)"


def test_after_a_quiet_interval_the_next_event_is_logged_at_once() -> None:
    log, clock, events = throttle()
    log.error("tls", "handshake refused")
    clock.advance(10)  # nothing more: no summary, the window closes
    assert len(events) == 1 and not clock.getDelayedCalls()
    log.error("tls", "handshake refused again")
    assert lines(events) == ["handshake refused", "handshake refused again"]
    assert events[1]["log_level"] is LogLevel.error


def test_kinds_are_throttled_separately() -> None:
    log, _, events = throttle()
    for _ in range(3):
        log.warn("a", "a failed")
        log.warn("b", "b failed")
    assert lines(events) == ["a failed", "b failed"]


def test_beyond_the_kind_limit_events_share_one_window() -> None:
    log, clock, events = throttle(max_kinds=2)
    for kind in range(100):
        log.warn(kind, "kind {kind}", kind=kind)
    assert lines(events) == ["kind 0", "kind 1", "kind 2"]
    clock.advance(10)
    assert lines(events)[-1] == "kind 99 (97 more like this in the last 10s)"


def test_flush_writes_pending_summaries_and_stops_the_timers() -> None:
    log, clock, events = throttle()
    log.warn("x", "x")
    log.warn("x", "x")
    log.warn("y", "y")
    log.flush()
    assert lines(events) == ["x", "y", "x (1 more like this in the last 10s)"]
    assert not clock.getDelayedCalls()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([0.0, 1.0, 4.0, 11.0])),
                max_size=60))
def test_every_event_is_logged_or_counted(steps: list[tuple[str, float]]) -> None:
    """Nothing is lost: lines plus the counts in summaries equal the events."""
    log, clock, events = throttle()
    for kind, pause in steps:
        log.warn(kind, "event {kind}", kind=kind)
        clock.advance(pause)
    log.flush()
    accounted = sum(1 + event.get("throttle_suppressed", 0) - ("throttle_suppressed" in event)
                    for event in events)
    assert accounted == len(steps)
