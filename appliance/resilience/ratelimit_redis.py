"""
A rate limiter whose buckets live in Redis, shared by every appliance
that uses the same Redis, limiter name and quota.

Each request is one atomic Lua step (L{appliance.resilience.ratelimit_lua})
on Redis time, so N appliances together admit exactly what one would.

When Redis fails or times out (the bound is the L{RedisLink} timeout), the
C{on_redis_error} mode decides instead:

 - C{allow}: admit everything (availability over protection);
 - C{deny}: admit nothing (protection over availability);
 - C{local}: an in-memory limiter with the same quota decides, per
   appliance, so N appliances admit up to N times the quota.

While degraded the limiter does not wait for a dead Redis on every request:
it falls back at once, and once C{retry_interval} has passed and the link's
health check does not say "down", one request at a time tries Redis again.
The first answer from Redis ends the degraded period.
"""

from __future__ import annotations

from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.resilience._support import ReactorTime, metric, registry_or_private
from appliance.resilience.ratelimit import Decision, Quota
from appliance.resilience.ratelimit_lua import GCRA, TOKEN_BUCKET, RedisCaller
from appliance.resilience.ratelimit_memory import MemoryLimiter

OnRedisError = Literal["allow", "deny", "local"]
"""What decides while Redis is unavailable."""

ON_REDIS_ERROR: tuple[OnRedisError, ...] = ("allow", "deny", "local")


class RedisLimiter:
    """
    Per-key limits kept in Redis; see the module docstring.

    Metrics (label C{limiter}):
    C{appliance_ratelimit_decisions_total{decision}},
    C{appliance_ratelimit_redis_errors_total} and
    C{appliance_ratelimit_degraded} (1 while Redis is not used).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        redis: RedisCaller,
        clock: ReactorTime,
        quota: Quota,
        on_redis_error: OnRedisError = "local",
        prefix: str = "appliance:ratelimit",
        retry_interval: float = 1.0,
        max_local_keys: int = 10_000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param name: a fixed name: the metric label and part of the Redis
            key; appliances sharing buckets use the same name and quota.
        @param redis: the shared L{appliance.host.redis.RedisLink}.
        @param clock: the L{IReactorTime} for the retry interval and the
            local fallback.
        @param quota: the algorithm, rate and burst per key.
        @param on_redis_error: C{"allow"}, C{"deny"} or C{"local"}.
        @param prefix: Redis key prefix; keys are C{prefix:name:key}.
        @param retry_interval: seconds between attempts to use Redis again.
        @param max_local_keys: C{max_keys} of the local fallback.
        @param registry: where the metrics go (None: not exported).
        """
        if on_redis_error not in ON_REDIS_ERROR:
            raise ValueError(f"on_redis_error must be one of {', '.join(ON_REDIS_ERROR)}")
        period_us = round(quota.rate.period * 1_000_000)
        if period_us < 1:
            raise ValueError("the rate's period must be at least one microsecond")
        self.name = name
        self.quota = quota
        self.on_redis_error = on_redis_error
        self.retry_interval = retry_interval
        self._redis = redis
        self._clock = clock
        self._script = TOKEN_BUCKET if quota.algorithm == "token_bucket" else GCRA
        kind = "tb" if quota.algorithm == "token_bucket" else "gcra"
        self._key_prefix = f"{prefix}:{name}:{kind}:"
        self._args = (quota.burst, quota.rate.limit, period_us)
        self._local = MemoryLimiter(name, clock, quota, max_keys=max_local_keys)
        self._degraded = False
        self._degraded_since: float | None = None
        self._retry_at = 0.0
        self._probing = False
        self._errors = 0
        self.last_error = ""
        registry = registry_or_private(registry)
        decisions = metric(Counter, registry, "appliance_ratelimit_decisions_total",
                           "Rate limit decisions.", ("limiter", "decision"))
        self._allowed = decisions.labels(name, "allowed")
        self._denied = decisions.labels(name, "denied")
        self._error_counter = metric(
            Counter, registry, "appliance_ratelimit_redis_errors_total",
            "Redis calls of a rate limiter that failed or timed out.",
            ("limiter",)).labels(name)
        self._degraded_gauge = metric(
            Gauge, registry, "appliance_ratelimit_degraded",
            "1 while a Redis rate limiter falls back (on_redis_error).",
            ("limiter",)).labels(name)
        self._degraded_gauge.set(0)

    @property
    def degraded(self) -> bool:
        """Whether decisions currently come from the fallback."""
        return self._degraded

    def acquire(self, key: str, cost: int = 1) -> Deferred[Decision]:
        """
        Take C{cost} units from C{key}'s shared bucket if it has them.

        Never fails because of Redis: the fallback decides then. Cancelling
        the result does not cancel the Redis call (its outcome still
        updates the degraded state).

        @raise ValueError: if C{cost} exceeds the burst or is negative.
        """
        self.quota.check_cost(cost)
        result: Deferred[Decision] = Deferred()
        probe = self._degraded
        if probe and not self._may_probe():
            self._settle(result, self._fallback(key, cost))
            return result
        if not probe and self._redis.state == "down":
            self._enter_degraded("the redis link is down")
            self._settle(result, self._fallback(key, cost))
            return result
        if probe:
            self._probing = True
        d = self._script.run(self._redis, [self._key_prefix + key], [*self._args, cost])
        # A malformed reply counts as a Redis error too: the fallback decides.
        d.addCallback(self._answered, probe)
        d.addErrback(self._failed, probe, key, cost)
        d.addCallback(lambda decision: self._settle(result, decision))
        return result

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status}."""
        return {"backend": "redis", "algorithm": self.quota.algorithm,
                "rate": str(self.quota.rate), "burst": self.quota.burst,
                "on_redis_error": self.on_redis_error, "degraded": self._degraded,
                "degraded_since": self._degraded_since, "redis_errors": self._errors,
                "last_error": self.last_error, "local_keys": len(self._local)}

    # -- internals ---------------------------------------------------------

    def _may_probe(self) -> bool:
        return (not self._probing and self._redis.state != "down"
                and self._clock.seconds() >= self._retry_at)

    def _answered(self, reply: Any, probe: bool) -> Decision:
        allowed, remaining, retry_us, reset_us = (int(value) for value in reply)
        if probe:
            self._probing = False
        if self._degraded:
            self._leave_degraded()
        return Decision(allowed=bool(allowed), remaining=remaining,
                        retry_after=retry_us / 1e6, reset=reset_us / 1e6,
                        limit=self.quota.burst, window=self.quota.window)

    def _failed(self, failure: Failure, probe: bool, key: str, cost: int) -> Decision:
        if probe:
            self._probing = False
        self._errors += 1
        self._error_counter.inc()
        self.last_error = failure.getErrorMessage()
        self._enter_degraded(self.last_error)
        return self._fallback(key, cost)

    def _fallback(self, key: str, cost: int) -> Decision:
        quota = self.quota
        if self.on_redis_error == "local":
            return self._local.try_acquire(key, cost)
        if self.on_redis_error == "allow":
            return Decision(allowed=True, remaining=quota.burst, retry_after=0.0, reset=0.0,
                            limit=quota.burst, window=quota.window)
        return Decision(allowed=False, remaining=0, retry_after=self.retry_interval,
                        reset=quota.window, limit=quota.burst, window=quota.window)

    def _settle(self, result: Deferred[Decision], decision: Decision) -> None:
        (self._allowed if decision.allowed else self._denied).inc()
        if not result.called:
            result.callback(decision)

    def _enter_degraded(self, error: str) -> None:
        self._retry_at = self._clock.seconds() + self.retry_interval
        if self._degraded:
            return
        self._degraded = True
        self._degraded_since = self._clock.seconds()
        self._degraded_gauge.set(1)
        self.log.warn("rate limiter {limiter}: redis unavailable ({error}); "
                      "on_redis_error={mode} decides until it answers",
                      limiter=self.name, error=error, mode=self.on_redis_error)

    def _leave_degraded(self) -> None:
        since = self._degraded_since or self._clock.seconds()
        self._degraded = False
        self._degraded_since = None
        self._degraded_gauge.set(0)
        self.log.info("rate limiter {limiter}: redis answers again after {seconds:.1f}s",
                      limiter=self.name, seconds=self._clock.seconds() - since)
