"""
Write-through, read-ahead and close-through on real loopback TCP, and the fallback to
Twisted's own buffered path for everything else.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from appliance.http.fastwrite import close_now, read_now, write_now


class WriteAndClose(protocol.Protocol):
    """Answers the first read with C{payload}, then closes at once."""

    def __init__(self, payload: bytes, lost: defer.Deferred[Any]) -> None:
        self.payload = payload
        self.lost = lost
        self.closed_before_return = False

    def dataReceived(self, data: bytes) -> None:
        write_now(self.transport, self.payload)
        close_now(self.transport)
        self.closed_before_return = self.lost.called

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback([reason])  # a Failure result would be an errback


def _talk(port: int, request: bytes) -> bytes:
    """A blocking client: send, then read to EOF (a reset raises)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data


async def _serve_once(reactor: Any, payload: bytes) -> tuple[bytes, Any, WriteAndClose]:
    lost: defer.Deferred[Any] = defer.Deferred()
    server = WriteAndClose(payload, lost)
    factory = protocol.Factory.forProtocol(lambda: server)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        received = await deferToThread(_talk, port.getHost().port, b"hello")
        [reason] = await lost
    finally:
        await port.stopListening()
    return received, reason, server


@pytest_twisted.ensureDeferred
async def test_close_now_is_an_orderly_close_after_the_data(reactor: Any) -> None:
    """The client reads every byte and then a clean EOF; connectionLost ran at once."""
    received, reason, server = await _serve_once(reactor, b"quote" * 10)
    assert received == b"quote" * 10
    assert reason.check(ConnectionDone)
    assert server.closed_before_return


@pytest_twisted.ensureDeferred
async def test_a_large_write_falls_back_to_the_buffered_close(reactor: Any) -> None:
    """More than the socket takes at once: the rest is buffered and still delivered."""
    payload = b"x" * (8 * 1024 * 1024)
    received, reason, server = await _serve_once(reactor, payload)
    assert received == payload
    assert reason.check(ConnectionDone)
    assert not server.closed_before_return  # the close waited for the buffer


def test_other_transports_take_the_normal_path() -> None:
    """A memory (or TLS) transport is written and closed the ordinary way."""
    transport = StringTransport()
    write_now(transport, b"data")
    close_now(transport)
    assert transport.value() == b"data" and transport.disconnecting


class ReadAhead(protocol.Protocol):
    """Records what L{read_now} returned when the connection was made."""

    def __init__(self, made: defer.Deferred[bytes]) -> None:
        self.made = made

    def connectionMade(self) -> None:  # noqa: N802 (Twisted naming)
        self.made.callback(read_now(self.transport))
        self.transport.loseConnection()


async def _read_ahead(reactor: Any, before_accept: bytes, close_first: bool = False) -> bytes:
    """Connect and send with a blocking socket before the reactor can accept."""
    made: defer.Deferred[bytes] = defer.Deferred()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: ReadAhead(made)),
                             interface="127.0.0.1")
    # The kernel completes the handshake from the listen queue: connect and
    # send return before the reactor runs, so the bytes wait at accept time.
    sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        if before_accept:
            sock.sendall(before_accept)
        if close_first:
            sock.close()
        return await made
    finally:
        sock.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_read_now_takes_bytes_sent_before_the_accept(reactor: Any) -> None:
    """A request sent right after connecting is there when the server accepts."""
    assert await _read_ahead(reactor, b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_read_now_without_bytes_returns_nothing(reactor: Any) -> None:
    """Nothing sent yet: nothing read, and no error."""
    assert await _read_ahead(reactor, b"") == b""


@pytest_twisted.ensureDeferred
async def test_read_now_leaves_an_end_of_stream_to_the_reactor(reactor: Any) -> None:
    """A client gone before the accept reads as nothing; the reactor sees the close."""
    assert await _read_ahead(reactor, b"", close_first=True) == b""


def test_read_now_on_other_transports_reads_nothing() -> None:
    """A memory (or TLS) transport is read by the reactor as usual."""
    assert read_now(StringTransport()) == b""
