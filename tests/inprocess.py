"""
Helpers for tests that run the appliance inside the test's reactor on
real loopback sockets (C{tcp:0} ports).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from appliance.host.build import build_appliance
from appliance.host.config import load_config
from appliance.host.plugin import discover_plugins
from appliance.host.service import ApplianceService


def start_appliance(reactor: Any, tmp_path: Path, ini: str, plugins: Any = None,
                    environ: dict[str, str] | None = None) -> ApplianceService:
    """Write C{ini}, load it, build the appliance and start it."""
    path = tmp_path / "appliance.ini"
    path.write_text(ini)
    plugins = plugins if plugins is not None else discover_plugins()
    config = load_config(str(path), plugins, environ)
    root = build_appliance(config, reactor, plugins=plugins)
    root.startService()
    return root


def port_of(root: ApplianceService, service: str) -> int:
    """The bound TCP port of a service's first listener (admin included)."""
    for child in root.support + root.hosted:
        if child.name == service:
            port = child.listeners[0].bound_port  # type: ignore[attr-defined]
            assert port is not None
            return int(port)
    raise KeyError(service)


class LineClient(protocol.Protocol):
    """Collects what the server sends; fires C{closed} on disconnect."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._waiters: list[tuple[bytes, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for waiter in list(self._waiters):
            if waiter[0] in self.received:
                self._waiters.remove(waiter)
                waiter[1].callback(self.received)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)

    def wait_for(self, marker: bytes) -> defer.Deferred[bytes]:
        """Fire once C{marker} has been received."""
        if marker in self.received:
            return defer.succeed(self.received)
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((marker, d))
        return d


async def connect_line_client(reactor: Any, port: int) -> LineClient:
    """Open a real TCP connection to 127.0.0.1:port."""
    client = LineClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    return client


async def stop(root: ApplianceService) -> None:
    """Stop the appliance if it is still running."""
    if root.running or root.draining:
        await root.stopService()
