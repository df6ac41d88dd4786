"""
A base class that gives a service listeners, connection tracking and a
drained stop, so each service only writes its protocol and its wiring.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from zope.interface import implementer

from appliance.host.drain import ConnectionTracker
from appliance.host.listener import Listener, ListenError
from appliance.host.plugin import READY, IHostedService, Readiness, ReloadNotSupported
from appliance.host.runtime import Runtime


@implementer(IHostedService)
class HostedService(Service):
    """
    Listeners bound in order at start, a tracker for live connections, and
    L{drain} that lets them finish before L{close} releases the rest.

    Subclasses add listeners in their constructor with L{listen} and
    override L{close}, L{readiness}, L{status} and L{reload} as needed.
    """

    log = Logger()

    def __init__(self, name: str, runtime: Runtime) -> None:
        self.setName(name)
        self.runtime = runtime
        self.listeners: list[Listener] = []
        self.tracker = ConnectionTracker(runtime.clock, name)

    def listen(self, description: str, factory: IProtocolFactory,
               label: str = "", tls: str | None = None) -> Listener:
        """
        Declare a listener, bound when the service starts; with C{tls}, the
        host wraps it in the named shared TLS context (this works for
        socket-activated ports too).
        """
        if tls is not None:
            factory = self.runtime.tls.wrap(tls, factory)
        listener = Listener(self.runtime.reactor, description, factory, label)
        listener.tls = tls
        self.listeners.append(listener)
        return listener

    def startService(self) -> None:
        """
        Bind every listener; on a failure unbind those bound and raise.
        """
        bound: list[Listener] = []
        try:
            for listener in self.listeners:
                listener.start()
                bound.append(listener)
                self.log.info("{service} listening on {address}",
                              service=self.name, address=listener.address())
        except ListenError:
            for listener in bound:
                listener.stop()
            raise
        Service.startService(self)

    def stop_listening(self) -> Deferred[None]:
        """
        Stop every listener; live connections carry on.
        """
        stops = [listener.stop() for listener in self.listeners]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Wait up to C{timeout} seconds for live connections, then L{close}.
        """
        d = self.tracker.drain(timeout)
        d.addCallback(lambda _: self.close())
        return d

    def close(self) -> Deferred[None] | None:
        """
        Release what the service holds (pools, timers) after draining.
        """
        return None

    def stopService(self) -> Deferred[None]:
        """
        Stop listening and drain with the runtime's shutdown timeout.
        """
        Service.stopService(self)
        d = self.stop_listening()
        d.addCallback(lambda _: self.drain(self.runtime.shutdown_timeout))
        return d

    def readiness(self) -> Readiness:
        """
        Ready while running with every listener bound and not draining.
        """
        if not self.running:
            return Readiness(False, "not running")
        if self.tracker.draining:
            return Readiness(False, "draining")
        if any(listener.port is None for listener in self.listeners):
            return Readiness(False, "not listening")
        return READY

    def status(self) -> dict[str, Any]:
        """
        Listeners, live connection count and readiness.
        """
        readiness = self.readiness()
        return {
            "ready": readiness.ready,
            "reason": readiness.reason,
            "listeners": [
                {"name": listener.name, "endpoint": listener.description,
                 "address": listener.address(), "tls": listener.tls}
                for listener in self.listeners
            ],
            "connections": len(self.tracker),
        }

    def reload(self, config: Any) -> Deferred[None] | None:
        """
        By default a service cannot change its config while running.
        """
        raise ReloadNotSupported(f"{self.name} cannot reload; restart to apply")

