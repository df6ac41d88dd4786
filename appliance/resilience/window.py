"""
Success and failure counts over a sliding time window, in constant memory.

The window is cut into C{buckets} slices; counts older than the window fall
out a slice at a time, so the window really covers between
M{window * (buckets - 1) / buckets} and M{window} seconds. Memory stays at
C{buckets} small lists whatever the call rate.
"""

from __future__ import annotations

from collections import deque


class SlidingCounts:
    """
    Successes and failures in the last C{window} seconds.
    """

    __slots__ = ("_buckets", "_count", "_width")

    def __init__(self, window: float, buckets: int = 10) -> None:
        """
        @param window: the window length, in seconds.
        @param buckets: slices the window is cut into.
        """
        if window <= 0 or buckets < 1:
            raise ValueError("window and buckets must be positive")
        self._width = window / buckets
        self._count = buckets
        self._buckets: deque[list[int]] = deque()

    def add(self, now: float, ok: bool) -> None:
        """Count one outcome at time C{now}."""
        index = int(now // self._width)
        self._expire(index)
        buckets = self._buckets
        if not buckets or buckets[-1][0] < index:
            buckets.append([index, 0, 0])
        buckets[-1][1 if ok else 2] += 1

    def totals(self, now: float) -> tuple[int, int]:
        """C{(successes, failures)} within the window ending at C{now}."""
        self._expire(int(now // self._width))
        successes = failures = 0
        for _, ok, bad in self._buckets:
            successes += ok
            failures += bad
        return successes, failures

    def clear(self) -> None:
        """Forget everything."""
        self._buckets.clear()

    def _expire(self, index: int) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - self._count:
            buckets.popleft()
