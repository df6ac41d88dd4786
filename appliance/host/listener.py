"""
A listening port bound from a Twisted endpoint string.

Twisted's endpoint service only logs a bind failure and carries on without
its port; the appliance must refuse to start instead, so L{Listener.start}
raises L{ListenError} at once when the port cannot be bound.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.python.failure import Failure


class ListenError(Exception):
    """
    A listener could not be bound; the message says which and why.
    """


class Listener:
    """
    One listening port: an endpoint description and the factory it serves.
    """

    def __init__(self, reactor: Any, description: str, factory: IProtocolFactory,
                 name: str = "") -> None:
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.name = name or description
        self.port: IListeningPort | None = None
        self.tls: str | None = None

    def start(self) -> None:
        """
        Bind now; raise L{ListenError} if the port cannot be bound.
        """
        try:
            endpoint = serverFromString(self._reactor, self.description)
            outcome: list[Any] = []
            endpoint.listen(self.factory).addBoth(outcome.append)
        except Exception as error:
            raise ListenError(f"cannot listen on {self.description}: {error}") from None
        if not outcome:
            raise ListenError(f"cannot listen on {self.description}: binding did not finish")
        result = outcome[0]
        if isinstance(result, Failure):
            reason = result.getErrorMessage()
            raise ListenError(f"cannot listen on {self.description}: {reason}")
        self.port = result

    def stop(self) -> Deferred[None]:
        """
        Stop accepting connections (live ones are untouched).
        """
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return _maybe(port.stopListening())

    def address(self) -> str | None:
        """
        The bound address as C{host:port} (or the unix path), if listening.
        """
        if self.port is None:
            return None
        host = self.port.getHost()
        if hasattr(host, "port"):
            return f"{host.host}:{host.port}"
        return str(getattr(host, "name", host))

    @property
    def bound_port(self) -> int | None:
        """The bound TCP port number, if any (handy for tcp:0 in tests)."""
        if self.port is None:
            return None
        return getattr(self.port.getHost(), "port", None)


def _maybe(result: Deferred[None] | None) -> Deferred[None]:
    return result if isinstance(result, Deferred) else succeed(None)
