"""The secretproxy service: wiring of config, engine, auth, policy, secrets and limits."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList

from appliance.auth import Authenticator, build_authenticators
from appliance.host.hosted import HostedService
from appliance.host.ini import Section
from appliance.host.log_throttle import LogThrottle
from appliance.host.plugin import READY, Readiness, ReloadNotSupported
from appliance.host.runtime import Runtime
from appliance.http.egress import EgressPolicy, EgressResolver
from appliance.http.headers import ENGINE_OWNED_REQUEST
from appliance.http.server import CONNECTION_REFUSALS, ProxyServerFactory, ServerLimits
from appliance.http.upstream import UpstreamPool
from appliance.policy import build_policy
from appliance.resilience import Bulkhead
from appliance.secretproxy import config as config_module
from appliance.secretproxy.config import SecretProxyConfig, UpstreamConfig
from appliance.secretproxy.limits import Limits
from appliance.secretproxy.metrics import ProxyMetrics
from appliance.secretproxy.pipeline import ALWAYS_DROPPED, Pipeline
from appliance.secretproxy.records import REQUEST_ID
from appliance.secretproxy.secrets import build_secrets
from appliance.secretproxy.upstreams import UpstreamRuntime

__all__ = ["parse", "build", "SecretProxyService"]


def parse(section: Section) -> SecretProxyConfig:
    """Validate C{[secretproxy]}; also check every upstream's auth methods exist."""
    config = config_module.parse(section)
    available = {"mtls"}
    if config.auth.sessions:
        available.add("session")
    if config.auth.kubernetes is not None:
        available.add("kubernetes")
    for upstream in config.upstreams:
        for method in upstream.auth:
            if method not in available:
                section.problem(None, f"upstream {upstream.name} uses auth {method}, which is "
                                "not configured (session: [secretproxy.session:NAME] sections;"
                                " kubernetes: kubernetes_api)")
        if "mtls" in upstream.auth and not config.tls:
            section.problem("tls", f"upstream {upstream.name} uses mtls: set tls to a "
                            "[tls:NAME] context with client_ca")
    return config


class SecretProxyService(HostedService):
    """The secret-injecting reverse proxy."""

    def __init__(self, config: SecretProxyConfig, runtime: Runtime) -> None:
        super().__init__("secretproxy", runtime)
        self.config = config
        registry = runtime.metrics
        self.metrics = ProxyMetrics(registry)
        self.secrets = build_secrets(config.store, runtime.clock, runtime.reactor, registry)
        self.policy = build_policy(config.policy, runtime.clock, runtime.reactor, registry,
                                   "secretproxy")
        self.auth_methods = build_authenticators(config.auth, runtime.clock, runtime.reactor,
                                                 registry, runtime.redis)
        self.limits = Limits(config, runtime)
        upstreams = {u.name: self._upstream(u) for u in config.upstreams}
        self.warnings = LogThrottle(Pipeline.log, runtime.clock)
        self.pipeline = Pipeline(config, upstreams, self.policy, self.secrets, self.limits,
                                 self.metrics, runtime.audit, runtime.clock, self.warnings)
        self.pool = UpstreamPool(runtime.reactor, self._client_tls,
                                 max_idle_per_target=config.pool_idle,
                                 idle_timeout=config.pool_idle_timeout)
        self._upstreams = upstreams
        factory = ProxyServerFactory(self.pipeline, self.pool, runtime.clock,
                                     _server_limits(config), self.tracker,
                                     on_rejected=self._rejected)
        self.listen(config.listen, factory, "https" if config.tls else "http", tls=config.tls)

    def _rejected(self, status: int, reason: str) -> None:
        """A connection or request refused by the engine, before the pipeline."""
        self.metrics.refused("too_many_connections" if reason in CONNECTION_REFUSALS
                             else "bad_request")

    def _upstream(self, config: UpstreamConfig) -> UpstreamRuntime:
        runtime = self.runtime
        drop = (ALWAYS_DROPPED | ENGINE_OWNED_REQUEST | {self.config.route_header,
                                                         self.config.auth.session_header,
                                                         config.injection.header,
                                                         REQUEST_ID})
        if self.config.auth.kubernetes is not None:
            drop |= {self.config.auth.kubernetes.header}
        resolver = EgressResolver(runtime.reactor,
                                  EgressPolicy(allow=config.allow,
                                               own_addresses=self._own_addresses()),
                                  ttl=self.config.resolve_ttl)
        bulkhead = Bulkhead(f"secretproxy-{config.name}", runtime.clock,
                            config.max_concurrent, config.max_queue, config.queue_timeout,
                            registry=runtime.metrics)
        client_tls = runtime.tls.client(config.tls_client)
        return UpstreamRuntime(
            config=config,
            authenticator=Authenticator([self.auth_methods[m] for m in config.auth]),
            resolver=resolver, bulkhead=bulkhead, drop=frozenset(drop),
            client_tls=client_tls)

    def _own_addresses(self) -> list[Any]:
        found = []
        for listener in getattr(self, "listeners", []):
            host = listener.port.getHost() if listener.port is not None else None
            if host is not None and hasattr(host, "port"):
                found.append((host.host, host.port))
        return found

    def _client_tls(self, server_name: str) -> Any:
        for upstream in self._upstreams.values():
            if upstream.config.host == server_name:
                return upstream.client_tls.for_host(server_name)
        return self.runtime.tls.client().for_host(server_name)

    def startService(self) -> None:
        """Listen; then learn our own addresses (never an upstream); start the store."""
        super().startService()
        own = self._own_addresses()
        for upstream in self._upstreams.values():
            upstream.resolver.policy = EgressPolicy(allow=upstream.config.allow,
                                                    own_addresses=own)
        self.secrets.start()

    def close(self) -> Deferred[None]:
        """After the drain: close pools, the store, policy and TokenReview clients."""
        self.warnings.flush()
        self.pool.close_all()
        closing = [self.secrets.stop(), self.policy.close()]
        for method in self.auth_methods.values():
            close = getattr(method, "close", None)
            if close is not None:
                closing.append(close())
        return DeferredList([d for d in closing if isinstance(d, Deferred)],
                            consumeErrors=True).addCallback(lambda _: None)

    def readiness(self) -> Readiness:
        """Listening, the store (or its fallback) usable, policy reachable."""
        base = super().readiness()
        if not base.ready:
            return base
        ready, reason = self.secrets.readiness()
        if not ready:
            return Readiness(False, f"secret store: {reason}")
        ready, reason = self.policy.readiness()
        if not ready:
            return Readiness(False, f"policy: {reason}")
        return READY

    def status(self) -> dict[str, Any]:
        """Listeners plus upstreams, pool, store, policy and limits."""
        status = super().status()
        status.update({
            "upstreams": {name: {"hosts": list(u.config.hosts),
                                 "path_prefix": u.config.path_prefix,
                                 "bulkhead": u.bulkhead.status()}
                          for name, u in self._upstreams.items()},
            "pool": {"open": self.pool.open_connections, "idle": self.pool.idle_connections},
            "secrets": self.secrets.status(),
            "policy": self.policy.status(),
            "limits": self.limits.status(),
        })
        return status

    def reload(self, config: SecretProxyConfig) -> Deferred[None] | None:
        """
        Apply a new upstream table, rules and injection templates for new
        requests; in-flight requests finish with what they started with.
        """
        if (config.listen, config.tls, config.store, config.auth) != (
                self.config.listen, self.config.tls, self.config.store, self.config.auth):
            raise ReloadNotSupported("secretproxy listen, tls, store or auth changed: "
                                     "restart to apply")
        runtime = self.runtime
        policy = build_policy(config.policy, runtime.clock, runtime.reactor, runtime.metrics,
                              "secretproxy")
        old_policy = self.policy
        self.config = config
        self.policy = policy
        self.limits = Limits(config, runtime)
        self._upstreams = {u.name: self._upstream(u) for u in config.upstreams}
        own = self._own_addresses()
        for upstream in self._upstreams.values():
            upstream.resolver.policy = EgressPolicy(allow=upstream.config.allow,
                                                    own_addresses=own)
        self.pipeline = Pipeline(config, self._upstreams, policy, self.secrets, self.limits,
                                 self.metrics, runtime.audit, runtime.clock, self.warnings)
        for listener in self.listeners:
            factory = listener.factory
            wrapped = getattr(factory, "wrappedFactory", factory)
            wrapped.handler = self.pipeline
            wrapped.limits = _server_limits(config)  # sizes, deadlines, connection limits
        self.pool.configure(config.pool_idle, config.pool_idle_timeout)
        return old_policy.close()


def _server_limits(config: SecretProxyConfig) -> ServerLimits:
    return ServerLimits(max_head=config.max_head, max_body=config.max_body,
                        header_timeout=config.header_timeout, idle_timeout=config.idle_timeout,
                        body_timeout=config.body_timeout, max_connections=config.max_connections,
                        max_connections_per_client=config.max_connections_per_client)


def build(config: Any, runtime: Runtime) -> SecretProxyService:
    """Build the secretproxy service."""
    return SecretProxyService(config, runtime)
