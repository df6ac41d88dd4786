"""The echo service: wiring of config, protocol, metrics and listener."""

from __future__ import annotations

from typing import Any

from attrs import frozen
from prometheus_client import Counter
from twisted.internet.defer import Deferred

from appliance.echo.config import EchoConfig, parse
from appliance.echo.protocol import EchoFactory
from appliance.host.hosted import HostedService
from appliance.host.plugin import ReloadNotSupported
from appliance.host.runtime import Runtime

__all__ = ["parse", "build", "EchoService"]


@frozen
class EchoMetrics:
    """Counters for the echo service."""

    lines: Counter
    rejected: Counter


class EchoService(HostedService):
    """Line echo over TCP; reloads everything but its listen address."""

    def __init__(self, config: EchoConfig, runtime: Runtime) -> None:
        super().__init__("echo", runtime)
        metrics = EchoMetrics(
            lines=Counter("appliance_echo_lines", "Lines echoed.", registry=runtime.metrics),
            rejected=Counter("appliance_echo_rejected", "Connections closed early, by reason.",
                             ["reason"], registry=runtime.metrics),
        )
        self.factory = EchoFactory(config, runtime.clock, self.tracker, metrics)
        self.listen(config.listen, self.factory, "tls" if config.tls else "tcp", tls=config.tls)

    @property
    def config(self) -> EchoConfig:
        """The config in force."""
        return self.factory.config

    def reload(self, config: EchoConfig) -> Deferred[None] | None:
        """Apply limits and delay to new lines; the listen address needs a restart."""
        if (config.listen, config.tls) != (self.config.listen, self.config.tls):
            raise ReloadNotSupported("echo listen or tls changed: restart to apply")
        self.factory.config = config
        return None


def build(config: Any, runtime: Runtime) -> EchoService:
    """Build the echo service."""
    return EchoService(config, runtime)
