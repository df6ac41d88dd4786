"""The secret proxy's metrics; label values are bounded (upstream names, classes, reasons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from appliance.host.metrics import LATENCY_BUCKETS, FastHistogram

REFUSALS = ("unknown_upstream", "bad_request", "unauthenticated", "auth_unavailable",
            "policy_denied", "secret_unavailable", "egress_refused", "bulkhead_full",
            "injection_refused", "too_many_connections", "audit_unavailable")


class ProxyMetrics:
    """Request histograms by upstream and status class, refusals by reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = FastHistogram(
            "appliance_secretproxy_request_seconds",
            "Request duration (client view) by upstream and status class.",
            ["upstream", "class"], LATENCY_BUCKETS, registry)
        self._upstream = FastHistogram(
            "appliance_secretproxy_upstream_seconds",
            "Time from sending a request upstream to its response head.",
            ["upstream"], LATENCY_BUCKETS, registry)
        self._refused = Counter("appliance_secretproxy_refused",
                                "Requests answered by the proxy itself, by reason.",
                                ["reason"], registry=registry)
        self._limited = Counter("appliance_secretproxy_rate_limited",
                                "Requests refused with 429, by limit.", ["scope"],
                                registry=registry)
        self._upstream_failures = Counter(
            "appliance_secretproxy_upstream_failures",
            "Requests an upstream failed, by upstream and kind (unreachable, tls, closed, "
            "bad_response, timeout).", ["upstream", "kind"], registry=registry)
        self._refetched = Counter("appliance_secretproxy_secret_refetches",
                                  "Secrets fetched again after an upstream 401 (and changed).",
                                  registry=registry)
        self._audit_failures = Counter("appliance_secretproxy_audit_failures",
                                       "Policy decisions the audit log could not record.",
                                       registry=registry)
        for reason in REFUSALS:
            self._refused.labels(reason)
        for scope in ("global", "upstream", "identity"):
            self._limited.labels(scope)

    def request(self, upstream: str, klass: str, duration: float,
                upstream_seconds: float) -> None:
        """One finished request."""
        self._requests.observe((upstream, klass), duration)
        if upstream_seconds:
            self._upstream.observe((upstream,), upstream_seconds)

    def refused(self, reason: str) -> None:
        """A request the proxy answered itself."""
        self._refused.labels(reason if reason in REFUSALS else "bad_request").inc()

    def upstream_failed(self, upstream: str, kind: str) -> None:
        """A request the upstream failed (L{appliance.http.exchange.UPSTREAM_FAILURES})."""
        self._upstream_failures.labels(upstream, kind).inc()

    def rate_limited(self, scope: str) -> None:
        """A 429."""
        self._limited.labels(scope).inc()

    def secret_refetched(self) -> None:
        """An upstream 401 led to a new secret."""
        self._refetched.inc()

    def audit_failed(self) -> None:
        """A decision could not be audited."""
        self._audit_failures.inc()
