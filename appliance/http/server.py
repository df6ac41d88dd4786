"""
The client side of the proxy: reads request heads strictly, hands each
request to the service's handler as an L{Exchange}, keeps connections alive
between requests, and enforces the head, idle and body deadlines.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from attrs import frozen
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from appliance.host.deadlines import DeadlineSweep
from appliance.host.peers import peer_host
from appliance.http.body import NO_BODY, BodyDecoder, ChunkedDecoder, LengthDecoder
from appliance.http.errors import HTTPError, error_response
from appliance.http.exchange import Exchange
from appliance.http.fastwrite import write_now
from appliance.http.head import find_head_end, parse_request_head
from appliance.http.upstream import UpstreamPool

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
TOO_MANY_CONNECTIONS = "too many connections"
TOO_MANY_FROM_CLIENT = "too many connections from one client"
CONNECTION_REFUSALS = frozenset({TOO_MANY_CONNECTIONS, TOO_MANY_FROM_CLIENT})
"""The reasons L{ProxyServerFactory.admit} refuses a connection with (and reports)."""


class RequestHandler(TypingProtocol):
    """What a service plugs into the engine."""

    def handle(self, exchange: Exchange) -> None:
        """Decide: C{exchange.forward(plan)} or C{exchange.respond_error(...)}."""

    def completed(self, exchange: Exchange) -> None:
        """The exchange ended (metrics, audit, logs)."""


@frozen
class ServerLimits:
    """Limits and deadlines of the client side."""

    max_head: int = 16 * 1024
    max_body: int = 10 * 1024 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    max_connections: int = 10_000
    """Open client connections of the service; more are answered 503 and closed."""
    max_connections_per_client: int = 0
    """Open connections from one client address (0: no such limit)."""


class ProxyServerProtocol(Protocol):
    """One client connection; one exchange at a time (pipelined requests wait)."""

    log = Logger()
    factory: ProxyServerFactory
    clock: Any  # the clock deadlines run on (the factory's), set when connected

    def __init__(self) -> None:
        self._buffer = b""
        self._exchange: Exchange | None = None
        self.deadline = 0.0
        self._deadline_status = 0
        self._draining = False
        self._paused = False
        self._closed = False
        self._peer_host: bytes | None = None
        self.counted_as: str | None = None  # the address this connection counts under, per client
        self.requests = 0

    # -- shared with the exchange ----------------------------------------------

    @property
    def pool(self) -> UpstreamPool:
        """The upstream connection pool."""
        return self.factory.pool

    @property
    def max_body(self) -> int:
        """The request body limit in bytes."""
        return self.factory.limits.max_body

    @property
    def peer_host(self) -> bytes:
        """The client's address as X-Forwarded-For sends it (looked up once)."""
        host = self._peer_host
        if host is None:
            host = self._peer_host = peer_host(self.transport, "").encode("ascii")
        return host

    def write(self, data: bytes) -> None:
        """Write to the client."""
        write_now(self.transport, data)

    def abort(self) -> None:
        """Drop the client connection at once."""
        self._closed = True
        self.transport.abortConnection()

    def keep_alive_allowed(self, exchange: Exchange) -> bool:
        """Whether the connection may carry another request after this one."""
        return not self._draining and exchange.head.keep_alive

    # -- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self.clock = factory.clock
        refusal = factory.admit(self)
        if refusal:
            self._reject(503, refusal)
            return
        _no_delay(self.transport)
        factory.tracker.add(self)
        self._arm(factory.limits.header_timeout, 408)

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self._disarm()
        self.factory.tracker.discard(self)
        if self.counted_as is not None:
            self.factory.release(self.counted_as)
            self.counted_as = None
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.client_lost()

    def begin_drain(self) -> None:
        """Finish the exchange in progress, then close; idle connections close now."""
        self._draining = True
        if self._exchange is None:
            self._close()

    # -- input -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is not None:
            if exchange.upstream is not None and not exchange.body.done:
                self._arm(self.factory.limits.body_timeout, 408)
                leftover = exchange.client_data(data)
                if leftover:
                    self._hold(leftover)
                elif exchange.body.done and not exchange.finished:
                    self._disarm()
            else:
                self._hold(data)  # pipelined, or body before the upstream is ready
            return
        self._buffer += data
        self._next_request()

    def _hold(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is not None and not exchange.body.done and exchange.upstream is None:
            exchange.pending += data
            if len(exchange.pending) > self.factory.limits.max_head:
                self._pause()
            return
        self._buffer += data
        if len(self._buffer) > self.factory.limits.max_head:
            self._pause()

    def _next_request(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        limits = self.factory.limits
        end = find_head_end(buffer)
        if end < 0:
            if len(buffer) > limits.max_head:
                self._reject(431)
            elif buffer.count(b"\n") != buffer.count(b"\r\n"):
                self._reject(400, "bare LF in the request head")
            return
        if end > limits.max_head:
            self._reject(431)
            return
        self._buffer = b""
        try:
            head = parse_request_head(buffer[:end])
            body = _body_decoder(head)
            if head.content_length is not None and head.content_length > limits.max_body:
                raise HTTPError(413, "request body too large")
            expect = head.fields.get(b"expect")
            if expect is not None and expect.lower() != b"100-continue":
                raise HTTPError(417, "unsupported expectation")
        except HTTPError as error:
            self._reject(error.status, error.reason)
            return
        self.deadline = 0.0  # _disarm()
        self.requests += 1
        exchange = Exchange(self, head, body, self.clock.seconds())
        self._exchange = exchange
        if body.done:
            self._buffer = buffer[end:]  # pipelined requests wait their turn
        else:
            exchange.pending = buffer[end:]
            self._pause()  # the body waits until the upstream is ready
        try:
            self.factory.handler.handle(exchange)
        except Exception:
            self.log.failure("handler failed on a request")
            exchange.respond_error(500, "internal error")

    def take_back(self, data: bytes) -> None:
        """Bytes past a request's body (a pipelined request): keep them for later."""
        self._buffer += data

    def continue_body(self, exchange: Exchange) -> None:
        """The upstream is ready: let the client's body flow."""
        if exchange.head.get(b"expect") is not None:
            self.transport.write(CONTINUE)
        self._arm(self.factory.limits.body_timeout, 408)
        self._resume()

    # -- endings -------------------------------------------------------------------

    def exchange_finished(self, exchange: Exchange, reusable: bool, gone: bool) -> None:
        """Called by the exchange when it is over."""
        if self._exchange is exchange:
            self._exchange = None
        try:
            self.factory.handler.completed(exchange)
        except Exception:
            self.log.failure("handler failed while completing a request")
        if gone or self._closed:
            return
        if not reusable or self._draining:
            self._close()
            return
        self._resume()
        self._arm(self.factory.limits.idle_timeout, 0)
        if self._buffer:
            self._next_request()

    def _reject(self, status: int, reason: str = "") -> None:
        self.factory.rejected(status, reason)
        self.transport.write(error_response(status))
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._disarm()
        self.transport.loseConnection()

    # -- flow and deadlines ------------------------------------------------------

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        # Always resume: backpressure from an upstream may have paused us too.
        if not self._closed:
            self._paused = False
            self.transport.resumeProducing()

    # Deadlines are plain numbers checked by the factory's sweep (a few times a
    # second), not one reactor timer per request: timers were a measurable
    # share of the per-request cost.

    def _arm(self, seconds: float, status: int) -> None:
        self.deadline = self.clock.seconds() + seconds
        self._deadline_status = status

    def _disarm(self) -> None:
        self.deadline = 0.0

    def check_deadlines(self, now: float) -> None:
        """Called by the sweep: act on whatever deadline has passed."""
        exchange = self._exchange
        if exchange is not None and exchange.deadline and now >= exchange.deadline:
            exchange.deadline_passed(now)
        if self.deadline and now >= self.deadline and not self._closed:
            self.deadline = 0.0
            self._timed_out(self._deadline_status)

    def _timed_out(self, status: int) -> None:
        exchange = self._exchange
        if exchange is not None:
            exchange.client_body_failed(HTTPError(408, "client body timeout"))
            return
        if status and self._buffer:
            self._reject(status, "request head timeout")
        else:
            self._close()  # idle keep-alive connection, or silence before any byte


class ProxyServerFactory(Factory):
    """Shared state of the client side: handler, pool, clock, limits, tracker."""

    protocol = ProxyServerProtocol
    noisy = False
    sweep_interval = 0.1
    """Seconds between deadline checks: how late a deadline may fire."""

    def startFactory(self) -> None:
        """Start sweeping deadlines."""
        self.deadlines.start()

    def stopFactory(self) -> None:
        """Keep sweeping until the connections that remain are gone."""
        self.deadlines.stop()

    def __init__(self, handler: RequestHandler, pool: UpstreamPool, clock: Any,
                 limits: ServerLimits, tracker: Any, on_rejected: Any = None) -> None:
        self.handler = handler
        self.pool = pool
        self.clock = clock
        self.limits = limits
        self.tracker = tracker
        self._on_rejected = on_rejected
        self._per_client: dict[str, int] = {}
        self.deadlines = DeadlineSweep(clock, tracker, self.sweep_interval)

    def admit(self, protocol: ProxyServerProtocol) -> str:
        """Count a new connection against the limits; the reason when it is over one."""
        limits = self.limits
        if len(self.tracker) >= limits.max_connections:
            return TOO_MANY_CONNECTIONS
        per_client = limits.max_connections_per_client
        if per_client:
            host = peer_host(protocol.transport)
            count = self._per_client.get(host, 0)
            if count >= per_client:
                return TOO_MANY_FROM_CLIENT
            self._per_client[host] = count + 1
            protocol.counted_as = host
        return ""

    def release(self, host: str) -> None:
        """A connection counted per client has closed."""
        remaining = self._per_client.get(host, 1) - 1
        if remaining > 0:
            self._per_client[host] = remaining
        else:
            self._per_client.pop(host, None)

    def rejected(self, status: int, reason: str) -> None:
        """A request refused before it reached the handler (metrics)."""
        if self._on_rejected is not None:
            self._on_rejected(status, reason)


def _no_delay(transport: Any) -> None:
    """Turn Nagle off: a request/response ping-pong must not wait for ACKs."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError, NotImplementedError):
        pass


def _body_decoder(head: Any) -> BodyDecoder:
    if head.chunked:
        return ChunkedDecoder()
    if head.content_length:
        return LengthDecoder(head.content_length)
    return NO_BODY
