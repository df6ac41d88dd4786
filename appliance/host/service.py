"""
The root service: ordered start, reverse-order drained stop, SIGHUP reload.

Stock C{MultiService} stops its children all at once and swallows their
errors. Here support services (Redis, metrics, the admin port) start first
and stop last; hosted services start in plugin order and stop in reverse,
each one first stops listening, then drains against one shared deadline.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

import appliance
from appliance.host.config import ApplianceConfig
from appliance.host.ini import ConfigError
from appliance.host.logs import set_log_level
from appliance.host.plugin import READY, IHostedService, Readiness, ReloadNotSupported
from appliance.host.redis import RedisLink
from appliance.host.runtime import Runtime
from appliance.host.sdnotify import Notifier

EX_START_FAILED = 1
"""Exit status when a service cannot start (a port is taken, say)."""


class StartError(Exception):
    """
    A service failed to start; services started before it are stopping.

    @ivar stopped: fires once they have stopped.
    """

    def __init__(self, message: str, stopped: Deferred[Any]) -> None:
        super().__init__(message)
        self.stopped = stopped


class ApplianceService(MultiService):
    """
    Hosts the support services and the enabled services of one config.
    """

    log = Logger()

    def __init__(
        self,
        runtime: Runtime,
        config: ApplianceConfig,
        services: list[IHostedService],
        support: list[IService],
        redis: RedisLink | None = None,
        notifier: Notifier | None = None,
        reload_config: Callable[[], Deferred[ApplianceConfig]] | None = None,
        exit_on_start_failure: bool = False,
    ) -> None:
        super().__init__()
        self.setName("appliance")
        self.runtime = runtime
        self.config = config
        self.hosted = list(services)
        self.support = list(support)
        self.redis = redis
        self.notifier = notifier or Notifier({})
        self._reload_config = reload_config
        self._exit_on_start_failure = exit_on_start_failure
        self._started: list[IService] = []
        self.draining = False
        self.started_at: float | None = None
        self._stopping: Deferred[None] | None = None
        self._drain_in_progress: Deferred[None] | None = None
        self._forced = False
        self._reloading: Deferred[None] | None = None
        self.reload_results: dict[str, int] = {"applied": 0, "invalid": 0, "failed": 0}
        for child in self.support + self.hosted:
            child.setServiceParent(self)

    def add_support(self, child: IService) -> None:
        """Add a support service, started after those already added."""
        self.support.append(child)
        child.setServiceParent(self)

    # -- start ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Nothing binds early: listeners bind in order in L{startService}."""

    def startService(self) -> None:
        """
        Start support services, then each hosted service, in order. On a
        failure stop what started (in reverse) and raise L{StartError}
        (or exit with status 1 under twistd).
        """
        Service.startService(self)
        set_log_level(self.config.host.log_level)
        for child in self.support + self.hosted:
            try:
                child.startService()
            except Exception as error:
                self._start_failed(child, error)
            self._started.append(child)
        self.started_at = self.runtime.clock.seconds()
        self.log.info(
            "appliance {version} started: {services}",
            version=appliance.__version__,
            services=", ".join(s.name for s in self.hosted) or "no services",
        )
        self.notifier.ready()
        self.notifier.start_watchdog(self.runtime.clock)
        self._audit("appliance.started", version=appliance.__version__,
                    services=[s.name for s in self.hosted])

    def _audit(self, event: str, **fields: Any) -> None:
        """Record a lifecycle event in the audit log, if there is one."""
        audit = self.runtime.audit
        if audit is None or not audit.running:
            return
        d = audit.write({"event": event, **fields})
        d.addErrback(lambda f: self.log.error("audit write failed: {error}",
                                              error=f.getErrorMessage()))

    def _start_failed(self, child: IService, error: Exception) -> None:
        message = f"cannot start {child.name}: {error}"
        self.log.critical("{message}; stopping what started", message=message)
        stops = []
        for started in reversed(self._started):
            d = maybeDeferred(_stop_now, started)
            d.addErrback(lambda f, name=started.name: self.log.failure(
                "while stopping {name} after a failed start", f, name=name))
            stops.append(d)
        self._started = []
        self.running = 0
        self.notifier.close()
        if self._exit_on_start_failure:
            raise SystemExit(EX_START_FAILED)
        raise StartError(message, DeferredList(stops)) from error

    # -- stop ----------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """
        Drain and stop everything; fires when done. Safe to call twice.
        """
        if self._stopping is None:
            Service.stopService(self)
            self._stopping = ensureDeferred(self._shutdown())
        return self._stopping

    async def _shutdown(self) -> None:
        self.draining = True
        self.notifier.stopping()
        self._audit("appliance.stopping")
        timeout = self.runtime.shutdown_timeout
        self.log.info("draining: {count} service(s), up to {timeout}s",
                      count=len(self.hosted), timeout=timeout)
        clock = self.runtime.clock
        delay = self.config.host.shutdown_delay
        if delay > 0 and not self._forced:
            self._drain_in_progress = deferLater(clock, delay, lambda: None)
            await _quietly(self._drain_in_progress)
        hosted = [s for s in reversed(self._started) if s in self.hosted]
        for service in hosted:
            await self._step(service, "stop listening", lambda s=service: _stop_listening(s))
        deadline = clock.seconds() + timeout
        for service in hosted:
            remaining = 0.0 if self._forced else max(0.0, deadline - clock.seconds())
            await self._step(service, "drain", lambda s=service, r=remaining: s.drain(r))
        self._audit("appliance.stopped")
        for child in [s for s in reversed(self._started) if s not in self.hosted]:
            await self._step(child, "stop", lambda c=child: _stop_now(c))
        self._started = []
        self.notifier.close()
        self.log.info("appliance stopped")

    async def _step(self, service: IService, what: str,
                    action: Callable[[], Any]) -> None:
        """Run one stop step; log its failure and carry on with the rest."""
        self._drain_in_progress = maybeDeferred(action)
        try:
            await self._drain_in_progress
        except Exception:
            self.log.failure("{service}: {what} failed", service=service.name, what=what)
        finally:
            self._drain_in_progress = None

    def force_stop(self) -> None:
        """
        Skip the rest of the drain: close every remaining connection now.
        """
        self._forced = True
        if self._drain_in_progress is not None:
            self._drain_in_progress.cancel()

    # -- probes --------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Ready unless draining, a service is not ready, or required Redis is down."""
        if self.draining:
            return Readiness(False, "draining")
        if not self.running:
            return Readiness(False, "not started")
        if self.redis is not None and self.redis.config.required and not self.redis.up:
            return Readiness(False, f"redis is {self.redis.state}")
        for service in self.hosted:
            readiness = service.readiness()
            if not readiness.ready:
                return Readiness(False, f"{service.name}: {readiness.reason}")
        return READY

    def status(self) -> dict[str, Any]:
        """Everything C{/status} shows."""
        readiness = self.readiness()
        clock = self.runtime.clock
        return {
            "version": appliance.__version__,
            "ready": readiness.ready,
            "reason": readiness.reason,
            "draining": self.draining,
            "uptime_seconds": (round(clock.seconds() - self.started_at, 3)
                               if self.started_at is not None else 0),
            "config": {"files": list(self.config.files), "reloads": dict(self.reload_results)},
            "services": {service.name: service.status() for service in self.hosted},
            "dependencies": {
                "redis": self.redis.status() if self.redis is not None else {"state": "disabled"},
            },
            "tls": self.runtime.tls.status(),
            "audit": (self.runtime.audit.status() if self.runtime.audit is not None
                      else {"state": "disabled"}),
        }

    # -- reload --------------------------------------------------------------

    def reload(self) -> Deferred[None]:
        """
        Re-read and validate the config and apply it to services that can
        reload; on any problem the running config stays.
        """
        if self._reloading is not None:
            self.log.info("reload already in progress")
            return self._reloading
        self._reloading = ensureDeferred(self._reload())
        self._reloading.addBoth(self._reload_done)
        return self._reloading

    def _reload_done(self, result: Any) -> Any:
        self._reloading = None
        self.notifier.ready("serving")
        if isinstance(result, Failure):
            self.reload_results["failed"] += 1
            self.log.failure("reload failed", result)
        return None

    async def _reload(self) -> None:
        if self._reload_config is None:
            self.log.warn("reload requested but this appliance has no config file")
            return
        self.notifier.reloading()
        try:
            new = await self._reload_config()
        except ConfigError as error:
            self.reload_results["invalid"] += 1
            for problem in error.problems:
                self.log.error("reload refused: {problem}", problem=str(problem))
            self.log.error("the new config has {count} problem(s); keeping the running one",
                           count=len(error.problems))
            self._audit("config.reload", result="invalid", problems=len(error.problems))
            return
        self._warn_restart_needed(new)
        set_log_level(new.host.log_level)
        self.runtime.tls.apply(new.tls_servers, new.tls_clients)
        by_name = {service.name: service for service in self.hosted}
        for entry in new.services:
            service = by_name.get(entry.name)
            old = self.config.service(entry.name)
            if service is None or old is None or old.config == entry.config:
                continue
            try:
                await maybeDeferred(service.reload, entry.config)
                self.log.info("{service}: new config applied", service=entry.name)
            except ReloadNotSupported as error:
                self.log.warn("{service}: {error}", service=entry.name, error=str(error))
        self.config = new
        self.reload_results["applied"] += 1
        self._audit("config.reload", result="applied", files=list(new.files))
        self.log.info("reload done")

    def _warn_restart_needed(self, new: ApplianceConfig) -> None:
        old_names = {s.name for s in self.config.services}
        new_names = {s.name for s in new.services}
        for name in sorted(new_names - old_names):
            self.log.warn("service {service} was added: restart to start it", service=name)
        for name in sorted(old_names - new_names):
            self.log.warn("service {service} was removed: restart to stop it", service=name)
        if new.admin != self.config.admin:
            self.log.warn("[admin] changed: restart to apply")
        if (new.host.redis != self.config.host.redis
                or new.host.shutdown_timeout != self.config.host.shutdown_timeout):
            self.log.warn("[appliance] redis/shutdown_timeout changed: restart to apply")
        if new.audit != self.config.audit:
            self.log.warn("[audit] changed: restart to apply")

    # -- signals -------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """
        SIGTERM/SIGINT drain and exit 0 (a second one forces it); SIGHUP
        reloads. Called once the reactor runs, replacing twistd's handlers,
        which would re-raise the signal on exit instead of exiting 0.
        """
        reactor = self.runtime.reactor

        def on_stop(signum: int, frame: Any) -> None:
            reactor.callFromThread(self._stop_signal, signum)

        def on_hup(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.reload)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping is None:
            self.log.info("{signal} received: draining, then exiting", signal=name)
            self.runtime.reactor.stop()
        else:
            self.log.warn("{signal} received again: closing remaining connections",
                          signal=name)
            self.force_stop()


def _stop_listening(service: IHostedService) -> Deferred[None]:
    """Mark a hosted service stopped and close its listeners."""
    Service.stopService(service)  # type: ignore[arg-type]
    return service.stop_listening()


def _stop_now(service: IService) -> Any:
    """Stop a service without waiting for in-flight work."""
    if IHostedService.providedBy(service) and service.running:
        d = _stop_listening(service)
        d.addCallback(lambda _: service.drain(0))
        return d
    if service.running:
        return service.stopService()
    return None


async def _quietly(d: Deferred[Any]) -> None:
    try:
        await d
    except Exception:
        pass
