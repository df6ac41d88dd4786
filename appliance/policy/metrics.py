"""
Decision metrics kept as plain numbers and exported at scrape time.

A C{prometheus_client} counter increment and histogram observation take a
lock each and cost about as much as a whole rules evaluation, so the hot
path instead bumps list entries (one L{bisect} for the bucket) and a
collector turns them into:

 - C{appliance_policy_decisions_total{service, decision, source}}
 - C{appliance_policy_decision_seconds{service, source}} (a histogram with
   L{LATENCY_BUCKETS})

Decisions are made on the reactor thread and C{/metrics} is rendered there
too, so no lock is needed.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from appliance.host.metrics import LATENCY_BUCKETS
from appliance.policy.model import SOURCES, PolicyDecision

_DECISIONS = "appliance_policy_decisions"
_SECONDS = "appliance_policy_decision_seconds"


class Timings:
    """One histogram series: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class ServiceStats:
    """
    The numbers of one service: C{counts[source][allowed]} and
    C{timings[source]}.
    """

    __slots__ = ("counts", "timings")

    def __init__(self) -> None:
        self.counts = {source: [0, 0] for source in SOURCES}
        self.timings = {source: Timings() for source in SOURCES}

    def record(self, decision: PolicyDecision, seconds: float) -> None:
        """Count C{decision}, made in C{seconds}."""
        source = decision.source
        self.counts[source][decision.allowed] += 1
        timings = self.timings[source]  # Timings.observe(), inlined: once per request
        timings.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        timings.sum += seconds


class DecisionCollector:
    """The scrape-time view of every service's L{ServiceStats} in one registry."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceStats] = {}

    def describe(self) -> Iterator[Metric]:
        """The two families, without samples (for registration)."""
        yield CounterMetricFamily(_DECISIONS, _DECISIONS_HELP,
                                  labels=("service", "decision", "source"))
        yield HistogramMetricFamily(_SECONDS, _SECONDS_HELP, labels=("service", "source"))

    def collect(self) -> Iterator[Metric]:
        """The families with one series per service, decision and source."""
        decisions = CounterMetricFamily(_DECISIONS, _DECISIONS_HELP,
                                        labels=("service", "decision", "source"))
        seconds = HistogramMetricFamily(_SECONDS, _SECONDS_HELP, labels=("service", "source"))
        for service, stats in sorted(self.services.items()):
            for source in SOURCES:
                deny, allow = stats.counts[source]
                decisions.add_metric((service, "allow", source), allow)
                decisions.add_metric((service, "deny", source), deny)
                timings = stats.timings[source]
                cumulative, buckets = 0, []
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), timings.buckets,
                                        strict=True):
                    cumulative += count
                    buckets.append((_le(bound), cumulative))
                seconds.add_metric((service, source), buckets, timings.sum)
        yield decisions
        yield seconds


_DECISIONS_HELP = "Policy decisions, by service, decision (allow/deny) and source."
_SECONDS_HELP = "Time to a policy decision, by service and source."


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, DecisionCollector] = (
    weakref.WeakKeyDictionary()
)


def service_stats(registry: CollectorRegistry, service: str) -> ServiceStats:
    """
    The L{ServiceStats} of C{service} in C{registry}, registering the
    collector on first use; a service asking again gets the same numbers.
    """
    collector = _collectors.get(registry)
    if collector is None:
        collector = _collectors[registry] = DecisionCollector()
        registry.register(collector)  # type: ignore[arg-type]
    stats = collector.services.get(service)
    if stats is None:
        stats = collector.services[service] = ServiceStats()
    return stats
