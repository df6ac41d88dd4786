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

from appliance.host.metrics import lock_free
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
        self._allowed = lock_free(decisions.labels(name, "allowed"))
        self._denied = lock_free(decisions.labels(name, "denied"))
        self._burst = float(quota.burst)
        self._interval = quota.interval
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
        decision, state = self._step(self.quota, self._states.get(key), self._clock.seconds(),
                                     cost)
        self._keep(key, state)
        (self._allowed if decision.allowed else self._denied).inc()
        return decision

    def admit(self, key: str) -> Decision | None:
        """
        Take one unit from C{key}'s bucket: None if it had one, else the
        refusal. The hot path: L{try_acquire} with a cost of 1 (same state
        and metrics) without building a L{Decision} for an admitted request.
        """
        if self._step is not token_bucket:
            return self._admit_gcra(key)
        now = self._clock.seconds()
        state = self._states.get(key)
        # The arithmetic of token_bucket() for an admitted unit, inlined, with
        # min() and max() as comparisons (same results, no builtin calls).
        burst = self._burst
        if state is None:
            tokens, updated = burst, now
        else:
            tokens, updated = state
            if now > updated:
                tokens += (now - updated) / self._interval
                if not tokens < burst:
                    tokens = burst
                updated = now
        if tokens + EPSILON < 1:
            decision, refused = token_bucket(self.quota, state, now, 1)
            self._keep(key, refused)
            self._denied.inc()
            return decision
        tokens -= 1
        self._keep(key, (tokens if tokens > 0.0 else 0.0, updated))
        self._allowed.inc()
        return None

    def _admit_gcra(self, key: str) -> Decision | None:
        """L{admit} for GCRA: the arithmetic of L{gcra} for one unit, inlined."""
        now = self._clock.seconds()
        stored = self._states.get(key)
        tat = now if stored is None or stored < now else stored
        interval = self._interval
        new_tat = tat + interval
        if new_tat - self._burst * interval - now > EPSILON * interval:
            decision, kept = gcra(self.quota, stored, now, 1)
            self._keep(key, kept)
            self._denied.inc()
            return decision
        self._keep(key, new_tat)
        self._allowed.inc()
        return None

    def _keep(self, key: str, state: Any) -> None:
        """Store C{key}'s state as the most recently used; forget the least if over."""
        states = self._states
        states[key] = state
        states.move_to_end(key)
        if len(states) > self.max_keys:
            states.popitem(last=False)
            self._evictions.inc()

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
