"""
Write-through and close-through for plain TCP transports on the hot path.

Twisted's C{transport.write} always buffers, asks epoll to watch the socket
for writability, sends on the next reactor turn, then asks epoll to stop
watching: two C{epoll_ctl} calls and an extra loop turn per message. A proxy
writes two messages per request, and profiling showed those calls at about
a quarter of its time. When nothing is buffered, sending at once is
equivalent (the kernel takes the bytes in order), so L{write_now} does that
and hands only a remainder (a full socket buffer) to Twisted.

It relies on C{twisted.internet.tcp.Connection}'s buffer fields and applies
to exactly that class: a TLS transport wraps one and forwards attribute
lookups to it, so duck typing would find the raw socket and bypass TLS.
Anything else (TLS, memory transports in tests) takes the normal path.

L{read_now} is the same idea for a fresh connection's first bytes: a client
that sends its request as soon as it connects has usually done so by the
time the server accepts, and reading at once saves the reactor turn (an
epoll event and its dispatch) that would otherwise deliver them.

L{close_now} is the same idea for closing: C{loseConnection} asks epoll to
watch for writability, waits a reactor turn, sends nothing, and only then
closes; with nothing buffered, closing at once is the same orderly FIN.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.tcp import Connection
from twisted.python.failure import Failure


def write_now(transport: Any, data: bytes) -> None:
    """Send C{data} now if the transport's buffer is empty, else buffer it."""
    if (isinstance(transport, Connection) and transport.connected
            and not transport.disconnecting and not transport._tempDataLen
            and not transport.dataBuffer):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write path will meet and report the error
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def read_now(transport: Any) -> bytes:
    """
    Bytes already waiting on a plain TCP connection, read at once; C{b""}
    when there are none yet or the transport is another kind. An end of
    stream or an error is left to the reactor, which meets it on its own
    next read (both persist on the socket).
    """
    if isinstance(transport, Connection) and transport.connected and not transport.disconnecting:
        try:
            return transport.socket.recv(transport.bufferSize)
        except OSError:
            return b""
    return b""


# One Failure for every orderly close: building one walks the exception's
# class hierarchy, which cost more than the close itself. It carries no
# traceback and protocols only inspect it.
_CLOSED = Failure(ConnectionDone())


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands in for doRead/doWrite once a connection is closed."""


def close_now(transport: Any) -> None:
    """
    Close C{transport} in an orderly way at once if nothing is buffered (the
    protocol's C{connectionLost} runs before this returns), else
    C{loseConnection}.
    """
    if (isinstance(transport, Connection) and transport.connected
            and not transport.disconnecting and not transport._tempDataLen
            and not transport.dataBuffer and transport.producer is None):
        transport.disconnecting = True
        # Like abortConnection: an event for this socket may still be queued
        # in the reactor's current epoll batch.
        transport.doRead = transport.doWrite = _ignore
        # close() alone sends the FIN: the descriptor is close-on-exec and the
        # appliance never forks, so no other process holds the socket and the
        # shutdown() Twisted adds "to be safe" is one system call too many.
        transport._shouldShutdown = False
        transport.connectionLost(_CLOSED)
        return
    transport.loseConnection()
