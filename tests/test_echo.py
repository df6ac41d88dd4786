"""Tests for the echo protocol with in-memory transports and a fake clock."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from appliance.echo.config import EchoConfig
from appliance.echo.plugin import EchoMetrics
from appliance.echo.protocol import EchoFactory, EchoProtocol
from appliance.host.drain import ConnectionTracker


def make_factory(**overrides: object) -> tuple[EchoFactory, Clock, CollectorRegistry]:
    """An echo factory with a fake clock and its own registry."""
    settings = dict(listen="tcp:0", tls=None, max_line_length=16, delay=0.0, idle_timeout=60.0,
                    max_connections=2)
    settings.update(overrides)
    clock = Clock()
    registry = CollectorRegistry()
    metrics = EchoMetrics(Counter("appliance_echo_lines", "", registry=registry),
                          Counter("appliance_echo_rejected", "", ["reason"], registry=registry))
    factory = EchoFactory(EchoConfig(**settings), clock, ConnectionTracker(clock, "echo"),
                          metrics)
    return factory, clock, registry


def connect(factory: EchoFactory) -> tuple[EchoProtocol, StringTransport]:
    """Build a protocol on a StringTransport."""
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_lines_come_back() -> None:
    """Each line is echoed, split or joined across reads."""
    factory, _, registry = make_factory()
    protocol, transport = connect(factory)
    protocol.dataReceived(b"hel")
    protocol.dataReceived(b"lo\nworld\n")
    assert transport.value() == b"hello\nworld\n"
    assert registry.get_sample_value("appliance_echo_lines_total") == 2


def test_delay_holds_each_line() -> None:
    """With a delay, the echo arrives only when the clock has moved on."""
    factory, clock, _ = make_factory(delay=2.0)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"a\n")
    clock.advance(1.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert transport.value() == b"a\n"


def test_long_line_is_refused() -> None:
    """A line over the limit gets an error and a close."""
    factory, _, registry = make_factory()
    protocol, transport = connect(factory)
    protocol.dataReceived(b"x" * 40)
    assert transport.value() == b"ERR line too long\n"
    assert transport.disconnecting
    assert registry.get_sample_value("appliance_echo_rejected_total",
                                     {"reason": "line_too_long"}) == 1


def test_connection_limit() -> None:
    """Connections beyond max_connections are told busy and closed."""
    factory, _, _ = make_factory()
    connect(factory)
    connect(factory)
    _, third = connect(factory)
    assert third.value() == b"ERR busy\n" and third.disconnecting
    assert len(factory.tracker) == 2


def test_idle_connections_time_out() -> None:
    """A silent connection is closed after idle_timeout; activity resets it."""
    factory, clock, _ = make_factory(idle_timeout=10.0)
    protocol, transport = connect(factory)
    clock.advance(9)
    protocol.dataReceived(b"x\n")
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting


def test_drain_finishes_pending_lines_then_closes() -> None:
    """Draining answers lines already received, ignores new ones, then closes."""
    factory, clock, _ = make_factory(delay=1.0)
    protocol, transport = connect(factory)
    idle, idle_transport = connect(factory)
    protocol.dataReceived(b"in-flight\n")
    done = factory.tracker.drain(timeout=5.0)
    assert idle_transport.disconnecting  # nothing pending: closed at once
    idle.connectionLost(None)
    protocol.dataReceived(b"too-late\n")
    clock.advance(1.0)
    assert transport.value() == b"in-flight\n"
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert done.called


def test_drain_deadline_aborts_stragglers() -> None:
    """Connections still busy at the deadline are aborted."""
    factory, clock, _ = make_factory(delay=100.0)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"slow\n")
    done = factory.tracker.drain(timeout=5.0)
    clock.advance(5.0)
    assert transport.disconnecting and done.called
    assert len(factory.tracker) == 0


def test_cancelled_drain_aborts_at_once() -> None:
    """Cancelling a drain (second SIGTERM) closes everything now."""
    factory, clock, _ = make_factory(delay=100.0)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"slow\n")
    done = factory.tracker.drain(timeout=50.0)
    done.cancel()
    assert transport.disconnecting and done.called
    assert len(factory.tracker) == 0
    assert all(call.getTime() != 50.0 for call in clock.getDelayedCalls())  # timer gone
