"""
Tests for the root service in-process on real loopback sockets: ordered
start and stop, start failures, drain, reload and readiness.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import frozen
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from appliance.host.hosted import HostedService
from appliance.host.ini import ConfigError, Section
from appliance.host.plugin import discover_plugins
from appliance.host.service import StartError
from appliance.host.values import parse_endpoint
from tests.inprocess import connect_line_client, port_of, start_appliance, stop


@frozen
class RecordingConfig:
    """Config of a test service: where it listens."""

    listen: str


class RecordingService(HostedService):
    """A service that records its lifecycle in a shared journal."""

    def __init__(self, name: str, config: RecordingConfig, runtime: Any,
                 journal: list[str]) -> None:
        super().__init__(name, runtime)
        self.journal = journal
        self.listen(config.listen, Factory.forProtocol(Protocol))

    def startService(self) -> None:
        super().startService()
        self.journal.append(f"start {self.name}")

    def stop_listening(self) -> defer.Deferred[None]:
        self.journal.append(f"stop-listening {self.name}")
        return super().stop_listening()

    def drain(self, timeout: float) -> defer.Deferred[None]:
        self.journal.append(f"drain {self.name}")
        return super().drain(timeout)


@frozen
class RecordingPlugin:
    """A plugin object for RecordingService (the contract, without a drop-in file)."""

    name: str
    order: int
    journal: list[str]
    description: str = "test service"

    def parse(self, section: Section) -> RecordingConfig:
        return RecordingConfig(section.get("listen", parse_endpoint))

    def build(self, config: RecordingConfig, runtime: Any) -> RecordingService:
        return RecordingService(self.name, config, runtime, self.journal)


ADMIN = "[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
LOOPBACK = "listen = tcp:0:interface=127.0.0.1\n"
ECHO = "[echo]\n" + LOOPBACK


def refused(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:port is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_ordered_start_and_reverse_drained_stop(reactor: Any, tmp_path: Path) -> None:
    """Services start in plugin order and stop listening, then drain, in reverse."""
    journal: list[str] = []
    plugins = [RecordingPlugin("first", 1, journal), RecordingPlugin("second", 2, journal)]
    root = start_appliance(reactor, tmp_path, ADMIN + "[second]\n" + LOOPBACK +
                           "[first]\n" + LOOPBACK, plugins)
    assert journal == ["start first", "start second"]
    assert root.readiness().ready
    await root.stopService()
    assert journal[2:] == ["stop-listening second", "stop-listening first",
                           "drain second", "drain first"]
    assert not root.running


@pytest_twisted.ensureDeferred
async def test_start_failure_stops_what_started(reactor: Any, tmp_path: Path) -> None:
    """A taken port fails the start clearly, and earlier services are stopped."""
    journal: list[str] = []
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    plugins = [RecordingPlugin("first", 1, journal), RecordingPlugin("second", 2, journal)]
    path = tmp_path
    with pytest.raises(StartError, match=f"cannot start second: cannot listen on "
                                         f"tcp:{taken}:interface=127.0.0.1") as caught:
        start_appliance(reactor, path, ADMIN + "[first]\n" + LOOPBACK +
                        f"[second]\nlisten = tcp:{taken}:interface=127.0.0.1\n", plugins)
    blocker.close()
    await caught.value.stopped
    assert journal[:1] == ["start first"]
    assert "stop-listening first" in journal and "drain first" in journal


@pytest_twisted.ensureDeferred
async def test_drain_finishes_in_flight_work(reactor: Any, tmp_path: Path) -> None:
    """While draining: in-flight echo completes, /readyz is 503, new connections refused."""
    root = start_appliance(reactor, tmp_path, ADMIN + ECHO + "delay = 500ms\n")
    echo_port = port_of(root, "echo")
    client = await connect_line_client(reactor, echo_port)
    client.transport.write(b"in-flight\n")
    await deferLater(reactor, 0.1, lambda: None)  # the line reaches the server
    stopping = root.stopService()
    assert root.readiness().reason == "draining"
    await deferLater(reactor, 0.05, lambda: None)
    assert refused(echo_port)
    received = await client.closed
    assert received == b"in-flight\n"
    await stopping


@pytest_twisted.ensureDeferred
async def test_shutdown_timeout_closes_stragglers(reactor: Any, tmp_path: Path) -> None:
    """Work that outlives shutdown_timeout is cut off and the stop still completes."""
    root = start_appliance(reactor, tmp_path, ADMIN + "[appliance]\nshutdown_timeout = 200ms\n" +
                           ECHO + "delay = 1h\n")
    client = await connect_line_client(reactor, port_of(root, "echo"))
    client.transport.write(b"never answered\n")
    await deferLater(reactor, 0.05, lambda: None)
    await root.stopService()
    assert await client.closed == b""


@pytest_twisted.ensureDeferred
async def test_reload_applies_valid_and_keeps_on_invalid(reactor: Any, tmp_path: Path) -> None:
    """SIGHUP reload applies a valid change and keeps the running config on a bad one."""
    root = start_appliance(reactor, tmp_path, ADMIN + ECHO)
    path = tmp_path / "appliance.ini"
    echo = root.hosted[0]
    try:
        path.write_text(ADMIN + ECHO + "delay = 10ms\n")
        await root.reload()
        assert echo.config.delay == 0.01
        assert root.reload_results["applied"] == 1
        path.write_text(ADMIN + ECHO + "delay = nope\nbogus = 1\n")
        await root.reload()
        assert echo.config.delay == 0.01
        assert root.reload_results["invalid"] == 1
        client = await connect_line_client(reactor, port_of(root, "echo"))
        client.transport.write(b"still serving\n")
        await client.wait_for(b"still serving\n")
        client.transport.loseConnection()
    finally:
        await stop(root)


@pytest_twisted.ensureDeferred
async def test_redis_down_is_reported_not_fatal(reactor: Any, tmp_path: Path) -> None:
    """With Redis configured but unreachable the appliance runs and says so."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    root = start_appliance(reactor, tmp_path, ADMIN +
                           f"[appliance]\nredis = redis://127.0.0.1:{port}/0\n"
                           "redis_timeout = 300ms\n[echo]\nlisten = tcp:0:interface=127.0.0.1\n")
    try:
        await deferLater(reactor, 0.8, lambda: None)
        assert root.status()["dependencies"]["redis"]["state"] == "down"
        assert root.readiness().reason == "redis is down"
        assert root.hosted[0].readiness().ready
    finally:
        await stop(root)


@pytest_twisted.ensureDeferred
async def test_redis_up_with_real_server(reactor: Any, tmp_path: Path, redis_server: Any) -> None:
    """A real Redis is reported up and readiness follows it."""
    root = start_appliance(reactor, tmp_path, ADMIN +
                           f"[appliance]\nredis = redis://127.0.0.1:{redis_server.port}/0\n")
    try:
        for _ in range(50):
            if root.redis is not None and root.redis.up:
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert root.status()["dependencies"]["redis"]["state"] == "up"
        assert root.readiness().ready
        assert await root.redis.call("set", "appliance-test", "1") == "OK"
    finally:
        await stop(root)


def test_unknown_service_section_fails_load(tmp_path: Path) -> None:
    """A section nobody owns stops the load."""
    path = tmp_path / "x.ini"
    path.write_text("[nosuchservice]\nlisten = tcp:0:interface=127.0.0.1\n")
    from appliance.host.config import load_config

    with pytest.raises(ConfigError, match="unknown section"):
        load_config(str(path), discover_plugins(), {})

