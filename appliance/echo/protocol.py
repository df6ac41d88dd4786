"""The echo protocol: each line comes back, after the configured delay."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from appliance.echo.config import EchoConfig


class EchoProtocol(LineReceiver, TimeoutMixin):
    """
    Echo lines ending in LF. A line longer than the limit gets
    C{ERR line too long} and a close; while draining, lines already received
    are still answered, then the connection closes.
    """

    delimiter = b"\n"
    factory: EchoFactory

    def __init__(self) -> None:
        self._pending: set[IDelayedCall] = set()
        self._draining = False

    def callLater(self, period: float, func: Any) -> IDelayedCall:  # TimeoutMixin's clock
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        factory = self.factory
        self.MAX_LENGTH = factory.config.max_line_length
        if len(factory.tracker) >= factory.config.max_connections:
            factory.metrics.rejected.labels("busy").inc()
            self.transport.write(b"ERR busy\n")
            self.transport.loseConnection()
            return
        factory.tracker.add(self)
        self.setTimeout(factory.config.idle_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()
        self.factory.tracker.discard(self)

    def lineReceived(self, line: bytes) -> None:
        if self._draining:
            return
        self.resetTimeout()
        self.factory.metrics.lines.inc()
        delay = self.factory.config.delay
        if delay <= 0:
            self.sendLine(line)
            return
        self._pending.add(self.factory.clock.callLater(delay, self._answer, line))

    def _answer(self, line: bytes) -> None:
        # The call running now is no longer active.
        self._pending = {call for call in self._pending if call.active()}
        self.sendLine(line)
        if self._draining and not self._pending:
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.factory.metrics.rejected.labels("line_too_long").inc()
        self.transport.write(b"ERR line too long\n")
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.factory.metrics.rejected.labels("idle").inc()
        self.transport.loseConnection()

    def begin_drain(self) -> None:
        """Answer the lines already received, then close."""
        self._draining = True
        self.pauseProducing()
        if not self._pending:
            self.transport.loseConnection()


class EchoFactory(Factory):
    """Builds L{EchoProtocol}s sharing config, clock, tracker and metrics."""

    protocol = EchoProtocol
    noisy = False

    def __init__(self, config: EchoConfig, clock: Any, tracker: Any, metrics: Any) -> None:
        self.config = config
        self.clock = clock
        self.tracker = tracker
        self.metrics = metrics
