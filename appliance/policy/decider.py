"""
L{Policy}: what services ask. It puts the builtin rules and OPA together
according to the mode, measures every decision, and reports readiness.

 - C{rules}: the builtin table decides (synchronously, always).
 - C{opa}: OPA decides (cached answers are served without I/O).
 - C{both}: the builtin table first; OPA is asked only when it allows, and
   both must allow.

Every mode first refuses a path no normaliser would produce (see
L{appliance.policy.model.path_is_normalised}).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed

from appliance.policy.config import PolicyConfig
from appliance.policy.metrics import service_stats
from appliance.policy.model import (
    PATH_NOT_NORMALISED,
    PolicyDecision,
    PolicyInput,
    path_is_normalised,
)
from appliance.policy.opa import OPAClient
from appliance.policy.rules import RulesEngine
from appliance.resilience import BreakerPolicy


class Policy:
    """
    May this caller reach this upstream with this method and path?

    L{decide_now} answers without I/O when it can (always in C{rules} mode,
    on a cached OPA answer otherwise) so the hot path needs no L{Deferred};
    L{decide} always answers, never with a failure (OPA's trouble is a
    denial with source C{"error"}).
    """

    def __init__(self, mode: str, service: str, registry: CollectorRegistry,
                 rules: RulesEngine | None = None, opa: OPAClient | None = None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        """
        @param mode: C{rules}, C{opa} or C{both}.
        @param service: the service name, a metric label.
        @param registry: where the decision metrics go.
        @param rules: the builtin engine (C{rules} and C{both}).
        @param opa: the OPA client (C{opa} and C{both}).
        @param timer: a monotonic clock for the latency histogram.
        """
        if mode not in ("rules", "opa", "both"):
            raise ValueError(f"unknown policy mode {mode!r}")
        if mode != "opa" and rules is None:
            raise ValueError(f"policy mode {mode} needs a rules engine")
        if mode != "rules" and opa is None:
            raise ValueError(f"policy mode {mode} needs an OPA client")
        self.mode = mode
        self.service = service
        self.rules = rules
        self.opa = opa
        self._timer = timer
        self._stats = service_stats(registry, service)

    def _record(self, decision: PolicyDecision, started: float) -> PolicyDecision:
        self._stats.record(decision, self._timer() - started)
        return decision

    def decide_now(self, input: PolicyInput) -> PolicyDecision | None:
        """
        The decision if it needs no I/O, else None (then call L{decide}).
        Only decisions returned are counted.
        """
        started = self._timer()
        if self.mode == "rules":
            decision = self.rules.evaluate(input)  # type: ignore[union-attr]
            self._stats.record(decision, self._timer() - started)
            return decision
        if self.mode == "both":
            decision = self.rules.evaluate(input)  # type: ignore[union-attr]
            if not decision.allowed:
                return self._record(decision, started)
        elif not path_is_normalised(input.path):
            return self._record(PATH_NOT_NORMALISED, started)
        cached = self.opa.lookup(input)  # type: ignore[union-attr]
        return None if cached is None else self._record(cached, started)

    def decide(self, input: PolicyInput) -> Deferred[PolicyDecision]:
        """
        The decision, asking OPA if needed. Fails only with
        L{CancelledError} if the caller cancels it.
        """
        started = self._timer()
        if self.mode == "rules":
            return succeed(self._record(self.rules.evaluate(input), started))  # type: ignore[union-attr]
        if self.mode == "both":
            decision = self.rules.evaluate(input)  # type: ignore[union-attr]
            if not decision.allowed:
                return succeed(self._record(decision, started))
        elif not path_is_normalised(input.path):
            return succeed(self._record(PATH_NOT_NORMALISED, started))
        return self.opa.ask(input).addCallback(self._record, started)  # type: ignore[union-attr]

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready unless OPA is configured and unreachable."""
        if self.opa is None:
            return True, ""
        return self.opa.readiness()

    def check(self) -> Deferred[bool]:
        """Probe OPA now (True without OPA); call it when the service starts."""
        if self.opa is None:
            return succeed(True)
        return self.opa.check()

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status}."""
        status: dict[str, Any] = {"mode": self.mode}
        if self.rules is not None:
            status["rules"] = len(self.rules)
        if self.opa is not None:
            status["opa"] = self.opa.status()
        return status

    def close(self) -> Deferred[None]:
        """Close OPA's idle connections (when the service stops)."""
        if self.opa is None:
            return succeed(None)
        return self.opa.close()


def build_policy(config: PolicyConfig, clock: Any, reactor: Any, registry: CollectorRegistry,
                 service_name: str, breaker_policy: BreakerPolicy | None = None,
                 http: Any = None) -> Policy:
    """
    The L{Policy} a service uses, from its parsed config.

    @param clock: the L{IReactorTime} for OPA timeouts, breaker and cache.
    @param reactor: the reactor OPA connections are made with.
    @param registry: the appliance's metrics registry.
    @param service_name: the service (metric label; names the breaker and
        cache C{policy-<service>}).
    @param breaker_policy: OPA's breaker settings (default L{BreakerPolicy}()).
    @param http: a treq C{HTTPClient}-like object for OPA (tests).
    """
    rules = RulesEngine(config.rules) if config.mode != "opa" else None
    opa = None
    if config.mode != "rules":
        assert config.opa is not None
        opa = OPAClient(config.opa, clock, reactor, name=f"policy-{service_name}",
                        registry=registry, breaker_policy=breaker_policy, http=http)
    return Policy(config.mode, service_name, registry, rules=rules, opa=opa)
