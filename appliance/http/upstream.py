"""
Persistent upstream connections: a pool of idle connections per (address,
port, TLS name), and the protocol that carries one exchange at a time and
parses the response as it streams.

TLS connections count as ready only after the handshake (and with it the
certificate and hostname check) succeeded, so a request (and any secret in
it) is never written to an unverified peer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.http.body import (
    NO_BODY,
    BodyDecoder,
    ChunkedDecoder,
    LengthDecoder,
    UntilCloseDecoder,
)
from appliance.http.errors import HTTPError
from appliance.http.fastwrite import write_now
from appliance.http.head import ResponseHead, find_head_end, parse_response_head

MAX_RESPONSE_HEAD = 64 * 1024


@frozen(cache_hash=True)  # the pool's key, hashed on every checkout and checkin
class UpstreamTarget:
    """Where to connect: a vetted address, a port, and the TLS name (None: plain)."""

    address: str
    port: int
    server_name: str | None

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return self.server_name is not None


class UpstreamConnectError(Exception):
    """Dialling, or the TLS handshake and verification, failed; nothing was sent."""

    def __init__(self, message: str, tls_failed: bool = False) -> None:
        super().__init__(message)
        self.tls_failed = tls_failed
        """The TCP connection was made and the TLS handshake or verification failed."""


class ResponseSink:
    """What an L{UpstreamProtocol} reports to (the exchange)."""

    def upstream_head(self, head: ResponseHead) -> None: ...

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_done(self) -> None: ...

    def upstream_flush(self) -> None: ...

    def upstream_lost(self, reason: Failure) -> None: ...


@implementer(IHandshakeListener)
class UpstreamProtocol(Protocol):
    """One upstream connection; one exchange at a time."""

    def __init__(self, pool: UpstreamPool, target: UpstreamTarget) -> None:
        self.pool = pool
        self.target = target
        self.ready: Deferred[UpstreamProtocol] = Deferred()
        self.sink: ResponseSink | None = None
        self._buffer = b""
        self._head: ResponseHead | None = None
        self._body: BodyDecoder | None = None
        self._method_head = False
        self.reusable = True
        self.connected_ok = False
        self._tcp_up = False
        self.idle_since = 0.0
        self.served = 0

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self._tcp_up = True
        try:
            self.transport.setTcpNoDelay(True)  # requests must not wait for ACKs
        except (AttributeError, OSError, NotImplementedError):
            pass
        if not self.target.tls:
            self._become_ready()

    def handshakeCompleted(self) -> None:
        """TLS verified: the connection may carry requests."""
        self._become_ready()

    def _become_ready(self) -> None:
        self.connected_ok = True
        if not self.ready.called:
            self.ready.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reusable = False
        self.pool.forget(self)
        if not self.ready.called:
            self.ready.errback(UpstreamConnectError(_describe(reason),
                                                    tls_failed=self._tcp_up and self.target.tls))
            return
        sink, self.sink = self.sink, None
        if sink is None:
            return
        body = self._body
        if body is not None and isinstance(body, UntilCloseDecoder):
            sink.upstream_done()
            return
        sink.upstream_lost(reason)

    # -- one exchange ----------------------------------------------------------

    def send(self, sink: ResponseSink, data: bytes, head_request: bool) -> None:
        """Start an exchange: write the request head (and any body so far)."""
        self.sink = sink
        self._head = None
        self._body = None
        self._buffer = b""
        self._method_head = head_request
        self.served += 1
        write_now(self.transport, data)

    def write(self, data: bytes) -> None:
        """More request body."""
        write_now(self.transport, data)

    def dataReceived(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes with no exchange: the upstream broke the protocol.
            self.reusable = False
            self.transport.abortConnection()
            return
        try:
            self._receive(sink, data)
        except HTTPError as error:
            self.reusable = False
            self.sink = None
            self.transport.abortConnection()
            sink.upstream_lost(Failure(error))
            return
        sink.upstream_flush()

    def _receive(self, sink: ResponseSink, data: bytes) -> None:
        while data:
            if self._head is None:
                buffer = self._buffer + data if self._buffer else data
                end = find_head_end(buffer)
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD:
                        raise HTTPError(502, "upstream response head too large")
                    self._buffer = buffer
                    return
                self._buffer = b""
                head = parse_response_head(buffer[:end])
                data = buffer[end:]
                if 100 <= head.status < 200:
                    if head.status == 101:
                        raise HTTPError(502, "upstream switched protocols")
                    continue  # informational: skip
                self._head = head
                self._body = self._decoder_for(head)
                if head.version == b"HTTP/1.0" and b"keep-alive" not in head.tokens(
                        b"connection") or b"close" in head.tokens(b"connection"):
                    self.reusable = False
                sink.upstream_head(head)
                if self.sink is None:
                    return  # the exchange gave up (client gone)
            body = self._body
            assert body is not None
            chunk, data = body.feed(data)
            if chunk:
                sink.upstream_data(chunk)
            if body.done:
                if data:
                    self.reusable = False  # bytes after the response: do not trust
                self.sink = None
                sink.upstream_done()
                return

    def _decoder_for(self, head: ResponseHead) -> BodyDecoder:
        if self._method_head or head.status in (204, 304):
            return NO_BODY
        if head.chunked:
            return ChunkedDecoder(error_status=502)
        if head.content_length is not None:
            return LengthDecoder(head.content_length)
        self.reusable = False
        return UntilCloseDecoder()

    def abort(self) -> None:
        """Drop the connection (the client went away or a deadline passed)."""
        self.sink = None
        self.reusable = False
        if self.transport is not None:
            self.transport.abortConnection()


class UpstreamPool:
    """
    Idle upstream connections per target, reused LIFO; each idle connection
    is closed after C{idle_timeout} (kept below typical upstream keep-alive
    timeouts, so a request is rarely written to a connection the upstream is
    closing).
    """

    log = Logger()

    def __init__(self, reactor: Any, client_tls: Callable[[str], Any],
                 max_idle_per_target: int = 32, idle_timeout: float = 30.0,
                 dial_timeout: float = 5.0) -> None:
        self._reactor = reactor
        self._client_tls = client_tls
        self.max_idle = max_idle_per_target
        self.idle_timeout = idle_timeout
        self.dial_timeout = dial_timeout
        self._idle: dict[UpstreamTarget, list[UpstreamProtocol]] = {}
        self._all: set[UpstreamProtocol] = set()
        self._sweep: LoopingCall | None = None

    def configure(self, max_idle_per_target: int, idle_timeout: float) -> None:
        """New limits (a reload): idle connections beyond them go at the next sweep."""
        self.max_idle = max_idle_per_target
        self.idle_timeout = idle_timeout
        sweep = self._sweep
        if sweep is not None and sweep.running:
            sweep.stop()
            sweep.start(min(1.0, idle_timeout / 2), now=False)

    def checkout(self, target: UpstreamTarget) -> UpstreamProtocol | None:
        """An idle connection to C{target}, if any (synchronous)."""
        idle = self._idle.get(target)
        while idle:
            protocol = idle.pop()
            if protocol.reusable and protocol.transport is not None:
                return protocol
        return None

    def dial(self, target: UpstreamTarget) -> Deferred[UpstreamProtocol]:
        """A new connection, ready once TCP (and TLS verification) succeeded."""
        protocol = UpstreamProtocol(self, target)
        self._all.add(protocol)
        endpoint_class = TCP6ClientEndpoint if ":" in target.address else TCP4ClientEndpoint
        endpoint: Any = endpoint_class(self._reactor, target.address, target.port,
                                       timeout=self.dial_timeout)
        if target.server_name is not None:
            endpoint = wrapClientTLS(self._client_tls(target.server_name), endpoint)
        connecting = endpoint.connect(_Once(protocol))
        timer = self._reactor.callLater(self.dial_timeout, self._dial_timed_out, protocol,
                                        connecting)

        def failed(failure: Failure) -> None:
            self._all.discard(protocol)
            if not protocol.ready.called:
                protocol.ready.errback(UpstreamConnectError(_describe(failure)))

        connecting.addErrback(failed)

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        protocol.ready.addBoth(settle)
        return protocol.ready

    def _dial_timed_out(self, protocol: UpstreamProtocol, connecting: Deferred[Any]) -> None:
        if protocol.ready.called:
            return
        connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()
        if not protocol.ready.called:
            protocol.ready.errback(UpstreamConnectError("connect timed out"))

    def checkin(self, protocol: UpstreamProtocol) -> None:
        """Return a connection after a complete exchange (or close it)."""
        target = protocol.target
        idle = self._idle.setdefault(target, [])
        if not protocol.reusable or protocol.transport is None or len(idle) >= self.max_idle:
            self.close(protocol)
            return
        protocol.transport.resumeProducing()  # the last client may have paused it
        protocol.idle_since = self._reactor.seconds()
        idle.append(protocol)
        if self._sweep is None:
            self._sweep = LoopingCall(self._close_stale)
            self._sweep.clock = self._reactor
            self._sweep.start(min(1.0, self.idle_timeout / 2), now=False)

    def _close_stale(self) -> None:
        # One sweep instead of a timer per returned connection.
        horizon = self._reactor.seconds() - self.idle_timeout
        for idle in list(self._idle.values()):
            stale = [p for p in idle if p.idle_since <= horizon]
            stale += [p for p in idle[:-self.max_idle or None] if p not in stale]
            for protocol in stale:
                self.close(protocol)

    def close(self, protocol: UpstreamProtocol) -> None:
        """Close a connection and forget it."""
        protocol.reusable = False
        self.forget(protocol)
        if protocol.transport is not None:
            protocol.transport.loseConnection()

    def forget(self, protocol: UpstreamProtocol) -> None:
        """Drop a connection from the pool's books."""
        self._all.discard(protocol)
        idle = self._idle.get(protocol.target)
        if idle and protocol in idle:
            idle.remove(protocol)

    def close_all(self) -> None:
        """Close every connection (shutdown)."""
        for protocol in list(self._all):
            self.close(protocol)
        self._idle.clear()
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None

    @property
    def open_connections(self) -> int:
        """Connections open (idle or busy)."""
        return len(self._all)

    @property
    def idle_connections(self) -> int:
        """Idle connections."""
        return sum(len(idle) for idle in self._idle.values())


class _Once:
    """A factory handing out one prepared protocol (what endpoints want)."""

    def __init__(self, protocol: UpstreamProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> UpstreamProtocol:
        return self._protocol

    def doStart(self) -> None:
        """Nothing to start."""

    def doStop(self) -> None:
        """Nothing to stop."""


def _describe(reason: Any) -> str:
    if reason is None:
        return "connection lost"
    try:
        return str(reason.getErrorMessage())
    except AttributeError:
        return str(reason)
