"""
The secret layer's own metrics, labelled by store name only (several
stores may share one registry; the families are created once per registry).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from appliance.host.metrics import lock_free
from appliance.resilience._support import metric


class SecretMetrics:
    """
    C{appliance_secretproxy_secret_fetch_seconds{store}},
    C{appliance_secretproxy_secret_cache_total{store,result}} (hit, miss,
    stale), C{appliance_secretproxy_secret_fallback_total{store}} and
    C{appliance_secretproxy_secret_rotations_total{store}}, bound to one store.
    """

    def __init__(self, registry: CollectorRegistry, store: str) -> None:
        results = metric(Counter, registry, "appliance_secretproxy_secret_cache_total",
                         "Secret lookups: fresh hit, miss, or stale (fallback) value.",
                         ("store", "result"))
        self.hit = lock_free(results.labels(store, "hit"))  # every proxied request
        self.miss = results.labels(store, "miss")
        self.stale = results.labels(store, "stale")
        self.fallbacks = metric(
            Counter, registry, "appliance_secretproxy_secret_fallback_total",
            "Loads answered from the fallback cache while the store failed.",
            ("store",)).labels(store)
        self.rotations = metric(
            Counter, registry, "appliance_secretproxy_secret_rotations_total",
            "Fetches that returned a new version of a cached secret.",
            ("store",)).labels(store)
        histogram: Any = Histogram
        self.fetch_seconds = metric(histogram, registry,
                                    "appliance_secretproxy_secret_fetch_seconds",
                                    "Time of store fetches.", ("store",)).labels(store)
