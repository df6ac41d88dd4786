"""
Small things the resilience modules share: the clock type and metric
families that several instances (one per breaker, limiter, ...) can share
in one registry.

Prometheus refuses to register the same metric name twice in a registry,
while every breaker of a process reports under C{appliance_breaker_state}
with its own C{breaker} label. L{metric} therefore creates a family once per
registry and hands the same object to every later caller.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

ReactorTime = Any
"""
Any L{twisted.internet.interfaces.IReactorTime} provider: the reactor, or a
L{twisted.internet.task.Clock} in tests. (An alias of C{Any} because mypy
runs without the zope plugin here.)
"""

_M = TypeVar("_M", Counter, Gauge)

_families: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, tuple[Any, tuple[str, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def metric(
    kind: type[_M],
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    labels: tuple[str, ...],
) -> _M:
    """
    The C{kind} family called C{name} in C{registry}, created on first use.

    @raise ValueError: when the name is already used with another kind or
        other labels (a programming error).
    """
    known = _families.setdefault(registry, {})
    entry = known.get(name)
    if entry is None:
        entry = known[name] = (kind(name, documentation, labels, registry=registry), labels)
    family, known_labels = entry
    if not isinstance(family, kind) or known_labels != labels:
        raise ValueError(f"metric {name} already registered with another shape")
    return family


def registry_or_private(registry: CollectorRegistry | None) -> CollectorRegistry:
    """
    C{registry}, or a private one when the caller does not export metrics.
    """
    return registry if registry is not None else CollectorRegistry(auto_describe=True)
