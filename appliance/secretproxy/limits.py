"""
Rate limits of the secret proxy: global, per upstream, per identity; in
memory (answered synchronously) or in Redis (shared by several appliances).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from appliance.resilience import Decision, MemoryLimiter, Quota, Rate, RedisLimiter
from appliance.secretproxy.config import SecretProxyConfig


class Limits:
    """The proxy's limiters and the order they are checked in."""

    def __init__(self, config: SecretProxyConfig, runtime: Any) -> None:
        redis = runtime.redis if config.limits_backend != "memory" else None
        self.shared = redis is not None

        def limiter(name: str, rate: Rate | None, keys: int) -> Any:
            if rate is None:
                return None
            quota = Quota("token_bucket", rate)
            if redis is not None:
                return RedisLimiter(name, redis, runtime.clock, quota,
                                    on_redis_error=config.on_redis_error,
                                    registry=runtime.metrics)
            return MemoryLimiter(name, runtime.clock, quota, max_keys=keys,
                                 registry=runtime.metrics)

        self.global_limiter = limiter("secretproxy-global", config.rate_limit, 1)
        self.identity_limiter = limiter("secretproxy-identity", config.identity_rate_limit,
                                        100_000)
        self.upstream_limiters = {
            upstream.name: limiter(f"secretproxy-upstream-{upstream.name}",
                                   upstream.rate_limit, 1)
            for upstream in config.upstreams}

        # The checks before authentication, per upstream, built once.
        self._before = {name: self._pre_auth(name) for name in self.upstream_limiters}
        self._anywhere = self._pre_auth(None)

    def _pre_auth(self, upstream: str | None) -> tuple[tuple[str, Any, str], ...]:
        checks = [("global", self.global_limiter, "all")]
        if upstream is not None:
            checks.append(("upstream", self.upstream_limiters[upstream], upstream))
        return tuple(check for check in checks if check[1] is not None)

    def check(self, upstream: str, identity: str | None
              ) -> tuple[str, Decision] | None | Deferred[tuple[str, Decision] | None]:
        """
        Before authentication (C{identity} None): the global and the
        upstream limits; after it: the identity limit. Returns the first
        exceeded (scope, decision), None, or a Deferred of either.
        """
        checks = self._checks(upstream, identity)
        if not checks:
            return None
        if self.shared:
            return self._check_shared(checks)
        for scope, limiter, key in checks:
            refused = limiter.admit(key)
            if refused is not None:
                return scope, refused
        return None

    def _checks(self, upstream: str, identity: str | None) -> tuple[tuple[str, Any, str], ...]:
        if identity is None:
            return self._before.get(upstream, self._anywhere)
        limiter = self.identity_limiter
        return () if limiter is None else (("identity", limiter, identity),)

    def _check_shared(self, checks: tuple[tuple[str, Any, str], ...]
                      ) -> Deferred[tuple[str, Decision] | None]:
        if not checks:
            return succeed(None)
        scope, limiter, key = checks[0]

        def decided(decision: Decision) -> Any:
            if not decision.allowed:
                return scope, decision
            return self._check_shared(checks[1:])

        return limiter.acquire(key).addCallback(decided)

    def status(self) -> dict[str, Any]:
        """Each configured limiter's state."""
        found = {"global": self.global_limiter, "identity": self.identity_limiter,
                 **{f"upstream:{name}": limiter
                    for name, limiter in self.upstream_limiters.items()}}
        return {name: limiter.status() for name, limiter in found.items()
                if limiter is not None}
