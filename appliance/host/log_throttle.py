"""
Throttled log lines for events that can repeat once per request or per
connection: an upstream that is down, a secret store that fails, a scanner
failing TLS handshakes. Logging each would flood the journal exactly when an
operator needs it (thousands of lines a second under load) and would let a
hostile client fill the disk.

The first event of a kind is logged at once, with its details. Later ones in
the same interval are counted, and when the interval ends one line repeats
the last event's message with how many more there were; a flood that goes on
gives one line per interval, and the next event after a quiet interval is
logged at once again. Counters in the metrics keep the exact figures.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from twisted.logger import Logger, LogLevel

DEFAULT_INTERVAL = 10.0
"""Seconds in which one kind of event is logged at most twice (first and summary)."""

MAX_KINDS = 256
"""Kinds tracked at once; events of further kinds share one summary line."""

_OTHER = object()
_SUMMARY = " ({throttle_suppressed} more like this in the last {throttle_interval:.0f}s)"


class _Window:
    __slots__ = ("level", "format", "fields", "suppressed", "call")

    def __init__(self, level: LogLevel, format: str, fields: dict[str, Any]) -> None:
        self.level = level
        self.format = format
        self.fields = fields
        self.suppressed = 0
        self.call: Any = None


class LogThrottle:
    """At most one line per kind of event per interval, plus a summary of the rest."""

    def __init__(self, log: Logger, clock: Any, interval: float = DEFAULT_INTERVAL,
                 max_kinds: int = MAX_KINDS) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self.max_kinds = max_kinds
        self._windows: dict[Any, _Window] = {}

    def warn(self, kind: Hashable, format: str, /, **fields: Any) -> None:
        """A warning; C{kind} says which events count as the same (bounded values only)."""
        self._event(LogLevel.warn, kind, format, fields)

    def error(self, kind: Hashable, format: str, /, **fields: Any) -> None:
        """An error; as L{warn}."""
        self._event(LogLevel.error, kind, format, fields)

    def flush(self) -> None:
        """Write the pending summaries now and stop the timers (at shutdown)."""
        windows, self._windows = self._windows, {}
        for window in windows.values():
            if window.call is not None and window.call.active():
                window.call.cancel()
            self._summarise(window)

    def _event(self, level: LogLevel, kind: Hashable, format: str,
               fields: dict[str, Any]) -> None:
        window = self._windows.get(kind)
        if window is None and len(self._windows) >= self.max_kinds:
            kind, window = _OTHER, self._windows.get(_OTHER)
        if window is not None:
            window.level, window.format, window.fields = level, format, fields
            window.suppressed += 1
            return
        self.log.emit(level, format, **fields)
        window = self._windows[kind] = _Window(level, format, fields)
        window.call = self.clock.callLater(self.interval, self._interval_over, kind)

    def _interval_over(self, kind: Any) -> None:
        window = self._windows.get(kind)
        if window is None:
            return
        if not window.suppressed:
            del self._windows[kind]  # quiet: the next event is logged at once
            return
        self._summarise(window)
        window.suppressed = 0
        window.call = self.clock.callLater(self.interval, self._interval_over, kind)

    def _summarise(self, window: _Window) -> None:
        if window.suppressed:
            self.log.emit(window.level, window.format + _SUMMARY, **window.fields,
                          throttle_suppressed=window.suppressed,
                          throttle_interval=self.interval)
