"""
Connection tracking for drained shutdown.

Stopping a listening port does not close its connections: a service keeps a
L{ConnectionTracker}, asks each live connection to finish and close, and
aborts whatever is left when the deadline passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure


class Drainable(TypingProtocol):
    """
    A connection that can be asked to close once its current work is done.
    """

    transport: Any

    def begin_drain(self) -> None:
        """Finish in-flight work, then close; take no new work."""


class ConnectionTracker:
    """
    The live connections of one service.

    Protocols call L{add} from C{connectionMade} and L{discard} from
    C{connectionLost}.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, name: str) -> None:
        self._clock = clock
        self.name = name
        self._live: set[Drainable] = set()
        self._emptied: list[Deferred[None]] = []
        self.draining = False

    def __len__(self) -> int:
        return len(self._live)

    def connections(self) -> Iterator[Drainable]:
        """The live connections (iterate over a copy if you may close some)."""
        return iter(self._live)

    def add(self, connection: Drainable) -> None:
        """Track a new connection; one arriving while draining is asked to drain."""
        self._live.add(connection)
        if self.draining:
            connection.begin_drain()

    def discard(self, connection: Drainable) -> None:
        """Forget a closed connection."""
        self._live.discard(connection)
        if not self._live and self._emptied:
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Ask every connection to finish; abort those still open after
        C{timeout} seconds. Fires when none is left. Cancelling the
        returned Deferred aborts the remaining connections at once.
        """
        self.draining = True
        for connection in list(self._live):
            connection.begin_drain()
        if not self._live:
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            self.abort_all("drain cancelled")

        done: Deferred[None] = Deferred(cancel)
        self._emptied.append(done)
        timer = self._clock.callLater(timeout, self.abort_all, "shutdown timeout reached")

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure) and result.check(CancelledError):
                return None
            return result

        done.addBoth(stop_timer)
        return done

    def abort_all(self, why: str) -> None:
        """Abort every live connection now."""
        if self._live:
            self.log.warn(
                "{service}: closing {count} connection(s) still open: {why}",
                service=self.name, count=len(self._live), why=why,
            )
        for connection in list(self._live):
            connection.transport.abortConnection()
            # A memory transport never calls connectionLost; forget it anyway.
            self.discard(connection)
