"""
The shared Prometheus registry, process and reactor metrics, and the
scrape-time view of the host's services.

Names follow C{appliance_<service>_<what>_<unit>}; labels are bounded
(service names, outcomes), never peers, paths or request ids.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

import appliance

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)
"""SLO-friendly latency buckets (seconds) shared by every service."""


def new_registry() -> CollectorRegistry:
    """
    A registry with process, platform and garbage-collector metrics.
    """
    prometheus_client.disable_created_metrics()
    registry = CollectorRegistry(auto_describe=True)
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return registry


class ReactorMonitor(Service):
    """
    Measures how late the reactor runs a timer (a blocked reactor shows up
    as lag) and reports its readers, writers and pending timers.
    """

    log = Logger()
    interval = 0.5

    def __init__(self, reactor: Any, registry: CollectorRegistry) -> None:
        self._reactor = reactor
        self.setName("reactor-monitor")
        self._lag = Histogram(
            "appliance_reactor_lag_seconds",
            "How late the reactor ran a timer scheduled every 0.5s.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        registry.register(_ReactorCollector(reactor))
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._expected: float | None = None

    def startService(self) -> None:
        """Start sampling."""
        Service.startService(self)
        self._expected = None
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        """Stop sampling."""
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self._reactor.seconds()
        if self._expected is not None:
            self._lag.observe(max(0.0, now - self._expected))
        self._expected = now + self.interval


class _ReactorCollector(Collector):
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def collect(self) -> Iterable[Metric]:
        reactor = self._reactor
        for name, getter, text in (
            ("appliance_reactor_readers", "getReaders", "File descriptors watched for reading."),
            ("appliance_reactor_writers", "getWriters", "File descriptors watched for writing."),
            ("appliance_reactor_delayed_calls", "getDelayedCalls", "Timers pending."),
        ):
            method = getattr(reactor, getter, None)
            if method is not None:
                yield GaugeMetricFamily(name, text, value=len(method()))


class CallbackCollector(Collector):
    """
    A collector that yields whatever C{produce} returns at scrape time.
    """

    def __init__(self, produce: Callable[[], Iterable[Metric]]) -> None:
        self._produce = produce

    def collect(self) -> Iterable[Metric]:
        return self._produce()


class PlainValue:
    """
    A counter child's value without a lock: bumped and read on the reactor
    thread only, where C{prometheus_client} takes a lock per increment
    (about 0.7 us, several times per request).
    """

    __slots__ = ("value",)

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        """Add C{amount}."""
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        """Replace the value."""
        self.value = value

    def get(self) -> float:
        """The value (what a scrape reads)."""
        return self.value

    def set_exemplar(self, exemplar: Any) -> None:
        """Exemplars are not kept."""

    def get_exemplar(self) -> None:
        """No exemplar."""
        return None


def lock_free(child: Any) -> Any:
    """
    An object whose C{inc()} counts into the counter child C{child} (of a
    family that other code may share, so the family stays as it is) without
    taking the child's lock. Only for children bumped on the reactor thread;
    if C{prometheus_client} keeps its value differently, C{child} itself.
    """
    current = getattr(child, "_value", None)
    if isinstance(current, PlainValue):
        return current  # another user of the same series made it lock-free already
    if current is None or not hasattr(current, "get") or not hasattr(child, "_samples"):
        return child
    value = PlainValue(current.get())
    child._value = value
    return value


def info_metric() -> GaugeMetricFamily:
    """C{appliance_info{version}} = 1."""
    family = GaugeMetricFamily("appliance_info", "Appliance version.", labels=["version"])
    family.add_metric([appliance.__version__], 1)
    return family


class FastHistogram(Collector):
    """
    A histogram for hot paths: plain lists of counts updated without a lock
    (only the reactor thread observes) and exported at scrape time, where
    C{prometheus_client.Histogram} takes two locks per observation.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = LATENCY_BUCKETS,
                 registry: CollectorRegistry | None = None) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = list(buckets)
        self._series: dict[tuple[str, ...], list[Any]] = {}
        if registry is not None:
            registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Record C{value} for the label values C{labels}."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [[0] * (len(self._bounds) + 1), 0.0]
        series[0][bisect_left(self._bounds, value)] += 1
        series[1] += value

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation,
                                       labels=self._labelnames)
        for labels, (counts, total) in list(self._series.items()):
            cumulative, running = [], 0
            for bound, count in zip(self._bounds + [float("inf")], counts, strict=True):
                running += count
                cumulative.append((_bound_text(bound), running))
            family.add_metric(list(labels), cumulative, sum_value=total)
        yield family

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation,
                                      labels=self._labelnames)]


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
