"""
Wiring: from a validated config to the root service and everything it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from appliance.host.admin import AdminService
from appliance.host.audit import AuditLog
from appliance.host.config import ApplianceConfig, load_config
from appliance.host.metrics import CallbackCollector, ReactorMonitor, info_metric, new_registry
from appliance.host.plugin import IHostedService, IServicePlugin
from appliance.host.redis import RedisLink
from appliance.host.runtime import Runtime
from appliance.host.sdnotify import Notifier
from appliance.host.service import ApplianceService
from appliance.host.tls_registry import TLSRegistry


def build_appliance(
    config: ApplianceConfig,
    reactor: Any,
    *,
    plugins: Sequence[IServicePlugin] | None = None,
    registry: CollectorRegistry | None = None,
    notifier: Notifier | None = None,
    exit_on_start_failure: bool = False,
    clock: Any = None,
) -> ApplianceService:
    """
    Build the root service for C{config}; nothing is started yet.

    With C{plugins} given, SIGHUP re-reads C{config.path} with them.
    """
    registry = registry if registry is not None else new_registry()
    clock = clock if clock is not None else reactor
    redis = (RedisLink(config.host.redis, clock)
             if config.host.redis is not None else None)
    tls = TLSRegistry(config.tls_servers, config.tls_clients, reactor, registry)
    audit = (AuditLog(config.audit, reactor, registry, clock=clock)
             if config.audit is not None else None)
    runtime = Runtime(
        reactor=reactor, clock=clock, metrics=registry, redis=redis,
        log=Logger(namespace="appliance"),
        shutdown_timeout=config.host.shutdown_timeout,
        tls=tls,
        audit=audit,
    )
    services: list[IHostedService] = [
        entry.plugin.build(entry.config, runtime) for entry in config.services
    ]
    reload_config: Callable[[], Deferred[ApplianceConfig]] | None = None
    if plugins is not None:
        reload_config = _threaded_loader(reactor, config.path, plugins)
    support: list[IService] = [tls]
    if audit is not None:
        support.append(audit)
    if redis is not None:
        support.append(redis)
    support.append(ReactorMonitor(reactor, registry))
    root = ApplianceService(
        runtime, config, services, support=support,
        redis=redis, notifier=notifier, reload_config=reload_config,
        exit_on_start_failure=exit_on_start_failure,
    )
    root.add_support(AdminService(config.admin, runtime, root))
    _register_host_metrics(registry, root)
    return root


def _threaded_loader(reactor: Any, path: str, plugins: Sequence[IServicePlugin]
                     ) -> Callable[[], Deferred[ApplianceConfig]]:
    from twisted.internet.threads import deferToThreadPool

    def load() -> Deferred[ApplianceConfig]:
        # Reading files (secrets included) is blocking I/O: keep it off the reactor.
        return deferToThreadPool(reactor, reactor.getThreadPool(), load_config, path, plugins)

    return load


def _register_host_metrics(registry: CollectorRegistry, root: ApplianceService) -> None:
    def produce() -> list[Metric]:
        reloads = CounterMetricFamily("appliance_config_reloads",
                                      "SIGHUP reloads by result.", labels=["result"])
        for result, count in root.reload_results.items():
            reloads.add_metric([result], count)
        ready = GaugeMetricFamily("appliance_service_ready",
                                  "1 when the service can take traffic.", labels=["service"])
        connections = GaugeMetricFamily("appliance_service_connections",
                                        "Open client connections.", labels=["service"])
        for service in root.hosted:
            ready.add_metric([service.name], 1 if service.readiness().ready else 0)
            connections.add_metric([service.name], service.status().get("connections", 0))
        families: list[Metric] = [info_metric(), reloads, ready, connections,
                    GaugeMetricFamily("appliance_draining", "1 while shutting down.",
                                      value=1 if root.draining else 0),
                    GaugeMetricFamily("appliance_ready", "1 when /readyz answers 200.",
                                      value=1 if root.readiness().ready else 0)]
        if root.redis is not None:
            families.append(GaugeMetricFamily("appliance_redis_up",
                                              "1 when the shared Redis answers PING.",
                                              value=1 if root.redis.up else 0))
        return families

    registry.register(CallbackCollector(produce))
