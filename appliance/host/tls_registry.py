"""
The named TLS contexts of one appliance: shared by name across services,
reloaded on SIGHUP and when their files change, reported in metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from appliance.host.metrics import CallbackCollector
from appliance.host.tls import ClientContexts, HostTLSFactory, ServerContext
from appliance.host.tls_config import (
    ClientTLSConfig,
    ServerMaterial,
    ServerTLSConfig,
    file_fingerprint,
    load_server_material,
)


class TLSRegistry(Service):
    """
    Server contexts by name (C{[tls:NAME]}) and client contexts by name
    (C{[tls-client:NAME]}); the default client context trusts the system CAs.
    """

    log = Logger()

    def __init__(self, servers: Iterable[ServerTLSConfig], clients: Iterable[ClientTLSConfig],
                 reactor: Any, registry: CollectorRegistry) -> None:
        self.setName("tls")
        self._reactor = reactor
        self.servers: dict[str, ServerContext] = {}
        for config in servers:
            assert config.material is not None, "validated configs carry their material"
            self.servers[config.name] = ServerContext(config, config.material)
        self.clients = {config.name: ClientContexts(config) for config in clients}
        self._default_client = ClientContexts(None)
        self._reload_results = Counter(
            "appliance_tls_reloads", "Certificate reloads by context and result.",
            ["context", "result"], registry=registry)
        self._handshake_failures = Counter(
            "appliance_tls_handshake_failures", "TLS handshakes refused or abandoned.",
            ["context", "reason"], registry=registry)
        registry.register(CallbackCollector(self._expiry_metrics))
        self._watch: LoopingCall | None = None

    # -- use ---------------------------------------------------------------

    def wrap(self, name: str, factory: IProtocolFactory) -> HostTLSFactory:
        """Wrap a listener's factory in TLS from context C{name}."""
        return HostTLSFactory(self.servers[name], factory, self._reactor,
                              on_refused=self._count_refusal)

    def client(self, name: str | None = None) -> ClientContexts:
        """Client contexts C{name}, or the system-trust default."""
        return self._default_client if name is None else self.clients[name]

    def _count_refusal(self, context: str, reason: str) -> None:
        self._handshake_failures.labels(context, reason).inc()

    # -- reload ------------------------------------------------------------

    def apply(self, servers: Iterable[ServerTLSConfig],
              clients: Iterable[ClientTLSConfig]) -> None:
        """
        Use freshly loaded configs (SIGHUP): every existing context gets its
        new material; new names need a restart (no listener uses them yet).
        """
        for config in servers:
            context = self.servers.get(config.name)
            if context is None:
                self.log.warn("tls:{context} is new: restart to use it", context=config.name)
                continue
            assert config.material is not None
            self._replace(context, config, config.material)
        for config in clients:
            self.clients[config.name] = ClientContexts(config)

    def _replace(self, context: ServerContext, config: ServerTLSConfig,
                 material: ServerMaterial) -> None:
        try:
            context.replace(config, material)
        except Exception as error:
            self._reload_results.labels(context.name, "failed").inc()
            self.log.error("tls:{context}: keeping the old certificate: {error}",
                           context=context.name, error=str(error))
        else:
            self._reload_results.labels(context.name, "applied").inc()

    def check_files(self) -> Deferred[None]:
        """
        Reload every context whose files changed on disk; a bad new file
        is logged and the old context stays.
        """
        pool = self._reactor.getThreadPool()
        checks = [deferToThreadPool(self._reactor, pool, self._reload_if_changed, context)
                  for context in self.servers.values()
                  if context.config.watch_interval > 0]
        return DeferredList(checks, consumeErrors=True).addCallback(lambda _: None)

    def _reload_if_changed(self, context: ServerContext) -> None:
        # Runs in a thread: stat and file reads only; the swap goes back to the reactor.
        config = context.config
        if file_fingerprint(config.paths) == context.material.fingerprint:
            return
        try:
            material = load_server_material(config)
        except Exception as error:
            self._reactor.callFromThread(self._reload_failed, context, str(error))
            return
        self._reactor.callFromThread(self._replace, context, config, material)

    def _reload_failed(self, context: ServerContext, error: str) -> None:
        self._reload_results.labels(context.name, "invalid").inc()
        self.log.error("tls:{context}: files changed but cannot be used, keeping the old "
                       "certificate: {error}", context=context.name, error=error)

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        """Watch certificate files for changes."""
        Service.startService(self)
        intervals = [c.config.watch_interval for c in self.servers.values()
                     if c.config.watch_interval > 0]
        if intervals:
            self._watch = LoopingCall(self.check_files)
            self._watch.clock = self._reactor
            self._watch.start(min(intervals), now=False)

    def stopService(self) -> None:
        """Stop watching."""
        Service.stopService(self)
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None

    def status(self) -> dict[str, Any]:
        """Per context: expiry and reloads, for /status."""
        return {name: {"not_after": context.material.not_after.isoformat(),
                       "reloads": context.reloads,
                       "client_auth": context.config.client_auth,
                       "min_version": context.config.min_version}
                for name, context in self.servers.items()}

    def _expiry_metrics(self) -> list[Metric]:
        family = GaugeMetricFamily(
            "appliance_tls_certificate_expiry_seconds",
            "Seconds until the certificate in use expires.", labels=["context"])
        now = datetime.now(UTC)
        for name, context in self.servers.items():
            family.add_metric([name], (context.material.not_after - now).total_seconds())
        return [family]
