"""
The two algorithms in Python, and the in-memory keyed limiter.

Both algorithms keep a tiny state per key and compute refills from the
clock, so no timer runs per key:

 - token bucket: C{(tokens, updated)}; the bucket earns one token every
   C{quota.interval} seconds up to C{burst}; a request takes C{cost}
   tokens if it has them.
 - GCRA (generic cell rate algorithm): one number, the theoretical arrival
   time C{tat}; a request of C{cost} moves it C{cost * interval} later and
   is admitted if the new C{tat} is at most C{burst * interval} ahead of now.

The Lua scripts in L{appliance.resilience.ratelimit_lua} implement the very
same arithmetic on Redis server time.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.defer import Deferred, succeed

from appliance.resilience._support import ReactorTime, metric, registry_or_private
from appliance.resilience.ratelimit import Decision, Quota

EPSILON = 1e-9
"""Tolerance, in units, against floating-point drift in refills."""

TokenState = tuple[float, float]
"""Token bucket state: (tokens, time of the last update)."""


def token_bucket(
    quota: Quota, state: TokenState | None, now: float, cost: int
) -> tuple[Decision, TokenState]:
    """
    One token bucket step: the decision and the state to keep.

    A missing C{state} is a full bucket.
    """
    interval, burst = quota.interval, quota.burst
    tokens, updated = state if state is not None else (float(burst), now)
    if now > updated:
        tokens = min(float(burst), tokens + (now - updated) / interval)
        updated = now
    allowed = tokens + EPSILON >= cost
    retry_after = 0.0
    if allowed:
        tokens = max(0.0, tokens - cost)
    else:
        retry_after = (cost - tokens) * interval
    decision = Decision(
        allowed=allowed,
        remaining=int(math.floor(tokens + EPSILON)),
        retry_after=retry_after,
        reset=(burst - tokens) * interval,
        limit=burst,
        window=quota.window,
    )
    return decision, (tokens, updated)


def gcra(quota: Quota, tat: float | None, now: float, cost: int) -> tuple[Decision, float]:
    """
    One GCRA step: the decision and the theoretical arrival time to keep.

    A missing C{tat} (or one in the past) is a full bucket.
    """
    interval, burst = quota.interval, quota.burst
    tolerance = burst * interval
    tat = now if tat is None or tat < now else tat
    new_tat = tat + cost * interval
    allow_at = new_tat - tolerance
    allowed = allow_at - now <= EPSILON * interval
    kept = new_tat if allowed else tat
    decision = Decision(
        allowed=allowed,
        remaining=max(0, int(math.floor((tolerance - (kept - now)) / interval + EPSILON))),
        retry_after=0.0 if allowed else allow_at - now,
        reset=kept - now,
        limit=burst,
        window=quota.window,
    )
    return decision, kept


class MemoryLimiter:
    """
    Per-key limits kept in this process, for at most C{max_keys} keys.

    Keys are kept in least-recently-used order; past C{max_keys} the least
    recently used key is forgotten (its bucket starts full again if it comes
    back), so a flood of distinct keys costs bounded memory and can only
    reset idle keys' buckets.

    Metrics (label C{limiter}):
    C{appliance_ratelimit_decisions_total{decision="allowed"|"denied"}} and
    C{appliance_ratelimit_evictions_total}.
    """

    def __init__(
        self,
        name: str,
        clock: ReactorTime,
        quota: Quota,
        max_keys: int = 10_000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param name: a fixed name, used as the metric label.
        @param clock: the L{IReactorTime} refills are computed from.
        @param quota: the algorithm, rate and burst per key.
        @param max_keys: keys remembered at most.
        @param registry: where the metrics go (None: not exported).
        """
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.name = name
        self.quota = quota
        self.max_keys = max_keys
        self._clock = clock
        self._step = token_bucket if quota.algorithm == "token_bucket" else gcra
        self._states: OrderedDict[str, Any] = OrderedDict()
        registry = registry_or_private(registry)
        decisions = metric(Counter, registry, "appliance_ratelimit_decisions_total",
                           "Rate limit decisions.", ("limiter", "decision"))
        self._allowed = decisions.labels(name, "allowed")
        self._denied = decisions.labels(name, "denied")
        self._evictions = metric(
            Counter, registry, "appliance_ratelimit_evictions_total",
            "Keys forgotten by an in-memory limiter to stay within max_keys.",
            ("limiter",)).labels(name)

    def __len__(self) -> int:
        """Keys remembered now."""
        return len(self._states)

    def try_acquire(self, key: str, cost: int = 1) -> Decision:
        """
        Take C{cost} units from C{key}'s bucket if it has them (hot path,
        synchronous).

        @raise ValueError: if C{cost} exceeds the burst or is negative.
        """
        self.quota.check_cost(cost)
        states = self._states
        decision, state = self._step(self.quota, states.get(key), self._clock.seconds(), cost)
        states[key] = state
        states.move_to_end(key)
        if len(states) > self.max_keys:
            states.popitem(last=False)
            self._evictions.inc()
        (self._allowed if decision.allowed else self._denied).inc()
        return decision

    def acquire(self, key: str, cost: int = 1) -> Deferred[Decision]:
        """L{try_acquire}, as an already fired L{Deferred}."""
        return succeed(self.try_acquire(key, cost))

    def forget(self, key: str) -> None:
        """Drop C{key}'s state (its bucket is full again)."""
        self._states.pop(key, None)

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status}."""
        return {"backend": "memory", "algorithm": self.quota.algorithm,
                "rate": str(self.quota.rate), "burst": self.quota.burst,
                "keys": len(self._states), "max_keys": self.max_keys}
