"""
The authentication metrics, created once per registry and shared by every
method and chain that reports into it.

The two counters sit on the per-request hot path, where a
C{prometheus_client} counter (a lock per increment) would cost more than
the rest of a cached check. They are plain integers, bumped on the reactor
thread, and turned into counter families only when the registry is
scraped (as the host's scrape-time gauges are). The TokenReview histogram
is observed only around network calls and is a regular one.

Labels are fixed words only: the method name, the result and the cache
outcome. Never an identity, a token digest or a peer address.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.auth.model import INVALID, METHODS, MISSING, OK, UNAVAILABLE

# Seconds; TokenReview answers in a few milliseconds when healthy and the
# client gives up at the configured timeout (2 s by default).
TOKENREVIEW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
                       5.0, 10.0)

_shared: weakref.WeakKeyDictionary[CollectorRegistry, AuthMetrics] = (
    weakref.WeakKeyDictionary()
)


class Count:
    """One counter value; L{inc} costs an attribute update."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        """Add one."""
        self.value += 1


class AuthMetrics(Collector):
    """
    C{appliance_auth_results_total{method,result}} (method C{none}: no
    credential for any method of a chain),
    C{appliance_auth_cache_total{result}} (C{hit}, C{miss}) and the
    histogram C{appliance_auth_tokenreview_seconds}.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register in C{registry}; use L{for_registry} instead."""
        self.registry = registry
        self.results: dict[tuple[str, str], Count] = {
            (method, result): Count()
            for method in METHODS for result in (OK, INVALID, UNAVAILABLE)
        }
        self.results[("none", MISSING)] = Count()
        self.cache_hit = Count()
        self.cache_miss = Count()
        registry.register(self)
        self.tokenreview_seconds = Histogram(
            "appliance_auth_tokenreview_seconds",
            "Duration of TokenReview calls to the Kubernetes API server, failures included.",
            registry=registry, buckets=TOKENREVIEW_BUCKETS)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> AuthMetrics:
        """
        The metrics of C{registry}, created on first use (a private registry
        nobody reads when None).
        """
        if registry is None:
            return cls(CollectorRegistry(auto_describe=True))
        metrics = _shared.get(registry)
        if metrics is None:
            metrics = _shared[registry] = cls(registry)
        return metrics

    def counter(self, method: str, result: str) -> Count:
        """The counter for one method and result."""
        return self.results[(method, result)]

    def describe(self) -> list[Metric]:
        """The families, without samples (for the registry's name checks)."""
        return list(self._families(with_samples=False))

    def collect(self) -> Iterator[Metric]:
        """The counter families with their current values (at scrape time)."""
        return self._families(with_samples=True)

    def _families(self, with_samples: bool) -> Iterator[Metric]:
        results = CounterMetricFamily(
            "appliance_auth_results", "Authentication outcomes by deciding method and "
            "result (method none: no credential presented).", labels=("method", "result"))
        cache = CounterMetricFamily(
            "appliance_auth_cache", "Kubernetes token lookups answered from a cache (hit: "
            "memory or Redis) or needing a TokenReview call (miss).", labels=("result",))
        if with_samples:
            for (method, result), count in self.results.items():
                results.add_metric((method, result), count.value)
            cache.add_metric(("hit",), self.cache_hit.value)
            cache.add_metric(("miss",), self.cache_miss.value)
        yield results
        yield cache
