"""
Tests for the shared HTTP forwarding engine against a real recording
upstream, with raw bytes from a real TCP client: framing, smuggling
defences, hop-by-hop handling, limits, deadlines, streaming, keep-alive,
gzip and client disconnects.
"""

from __future__ import annotations

import gzip
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from appliance.host.drain import ConnectionTracker
from appliance.http.exchange import UpstreamPlan
from appliance.http.head import find_head_end, parse_response_head
from appliance.http.headers import ENGINE_OWNED_REQUEST, forwardable
from appliance.http.server import ProxyServerFactory, ServerLimits
from appliance.http.upstream import UpstreamPool, UpstreamTarget
from tests.http_upstream import start_upstream


class ForwardAll:
    """A handler forwarding every request to one upstream, injecting a header."""

    def __init__(self, target: UpstreamTarget, response_timeout: float = 5.0) -> None:
        self.target = target
        self.response_timeout = response_timeout
        self.completed_exchanges: list[Any] = []

    def handle(self, exchange: Any) -> None:
        head = exchange.head
        lines = [head.method + b" " + head.target + b" HTTP/1.1", b"Host: upstream.test",
                 b"Authorization: Bearer injected"]
        lines += [name + b": " + value for name, value in
                  forwardable(head, ENGINE_OWNED_REQUEST | {b"authorization"})]
        exchange.forward(UpstreamPlan(self.target, lines, self.response_timeout, 10.0,
                                      retries=1))

    def completed(self, exchange: Any) -> None:
        self.completed_exchanges.append(exchange)


class Proxy:
    """A proxy (engine + ForwardAll) in front of a recording upstream."""

    def __init__(self, reactor: Any, limits: ServerLimits | None = None,
                 response_timeout: float = 5.0) -> None:
        self.upstream_port, self.behaviour, self.recorder = start_upstream(reactor)
        target = UpstreamTarget("127.0.0.1", self.upstream_port.getHost().port, None)
        self.handler = ForwardAll(target, response_timeout)
        self.pool = UpstreamPool(reactor, lambda name: None, idle_timeout=5.0)
        self.tracker = ConnectionTracker(reactor, "proxy")
        self.rejections: list[tuple[int, str]] = []
        factory = ProxyServerFactory(self.handler, self.pool, reactor,
                                     limits or ServerLimits(max_body=100_000,
                                                            header_timeout=1.0,
                                                            body_timeout=1.0),
                                     self.tracker,
                                     on_rejected=lambda s, r: self.rejections.append((s, r)))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.number = self.port.getHost().port

    async def close(self) -> None:
        self.pool.close_all()
        self.tracker.abort_all("test over")
        await self.port.stopListening()
        await self.upstream_port.stopListening()


class RawClient(Protocol):
    """Sends raw bytes and collects everything until the server closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)


async def raw(reactor: Any, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send C{data} on a new connection; return all bytes until the server closes."""
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(data)
    client.closed.addTimeout(timeout, reactor)
    return await client.closed


def responses(data: bytes) -> list[tuple[Any, bytes]]:
    """Split raw bytes into (head, body) pairs (Content-Length or chunked bodies)."""
    out = []
    while data:
        end = find_head_end(data)
        head = parse_response_head(data[:end])
        data = data[end:]
        if head.chunked:
            body = b""
            while True:
                line, _, data = data.partition(b"\r\n")
                size = int(line, 16)
                body += data[:size]
                data = data[size + 2:]
                if size == 0:
                    break
        else:
            length = head.content_length or 0
            body, data = data[:length], data[length:]
        out.append((head, body))
    return out


@pytest_twisted.async_yield_fixture
async def running(reactor: Any) -> Any:
    """A proxy and its upstream, torn down after the test."""
    proxy = Proxy(reactor)
    yield proxy
    await proxy.close()


@pytest_twisted.ensureDeferred
async def test_forwards_with_injection_and_strips_hop_by_hop(reactor: Any, running: Proxy
                                                             ) -> None:
    """The upstream gets the injected header, not the client's credentials or
    hop-by-hop fields (including those named in Connection)."""
    request = (b"GET /echo?x=1 HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer client-own\r\n"
               b"Proxy-Authorization: Basic Zm9v\r\nConnection: close, X-Secret-Hop\r\n"
               b"X-Secret-Hop: leaked?\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
               b"X-Keep: yes\r\n\r\n")
    [(head, body)] = responses(await raw(reactor, running.number, request))
    assert head.status == 200 and head.get(b"via") == b"1.1 appliance"
    received = running.recorder.raw
    assert b"Authorization: Bearer injected" in received
    for leaked in (b"client-own", b"Zm9v", b"X-Secret-Hop", b"Keep-Alive", b"TE: trailers"):
        assert leaked not in received, leaked
    assert b"x-keep: yes" in received.lower()


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
     b"\r\n0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
     400),
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: +5\r\n\r\nhello", 400),
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 0x5\r\n\r\nhello", 400),
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     400),
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n"
     b"0\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n"
     b"0\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Bad : a\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\nHost: p\r\nHost: q\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\nHost: p\n\n", 400),
    (b"GET /echo HTTP/2.0\r\nHost: p\r\n\r\n", 505),
    (b"GET /echo HTTP/1.1\r\nHost: p\r\nExpect: something\r\n\r\n", 417),
    (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
])
@pytest_twisted.ensureDeferred
async def test_smuggling_and_malformed_requests_are_refused(
        reactor: Any, running: Proxy, request_bytes: bytes, status: int) -> None:
    """Ambiguous framing and malformed heads: refused before reaching the upstream."""
    data = await raw(reactor, running.number, request_bytes)
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert running.behaviour.requests == []


@pytest_twisted.ensureDeferred
async def test_bodies_stream_both_framings(reactor: Any, running: Proxy) -> None:
    """Content-Length and chunked bodies arrive whole; chunked is re-framed strictly."""
    body = b"a" * 5000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:3000], body[3000:]))
    request = (b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5000\r\n\r\n" + body +
               b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n" + chunked + b"0\r\n\r\n")
    got = responses(await raw(reactor, running.number, request))
    assert [h.status for h, _ in got] == [200, 200]
    assert [r["body"] for r in running.behaviour.requests] == [body, body]


@pytest_twisted.ensureDeferred
async def test_body_limit_counts_chunked_bytes_as_they_arrive(reactor: Any,
                                                              running: Proxy) -> None:
    """A declared or chunked body over the limit gets 413 and never completes upstream."""
    declared = await raw(reactor, running.number,
                         b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 200000\r\n\r\n")
    assert declared.startswith(b"HTTP/1.1 413 ")
    piece = b"%x\r\n%s\r\n" % (60000, b"b" * 60000)
    chunked = await raw(reactor, running.number,
                        b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + piece * 2 + b"0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert all(len(r["body"]) < 100_000 for r in running.behaviour.requests)


@pytest_twisted.ensureDeferred
async def test_oversized_head_and_slow_head(reactor: Any, running: Proxy) -> None:
    """A head over the limit gets 431; a head that never ends gets 408 at the deadline."""
    big = await raw(reactor, running.number, b"GET / HTTP/1.1\r\nHost: p\r\nX-A: "
                    + b"a" * 20000 + b"\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 431 ")
    slow = await raw(reactor, running.number, b"GET / HTTP/1.1\r\nHost: p\r\n")
    assert slow.startswith(b"HTTP/1.1 408 ")


@pytest_twisted.ensureDeferred
async def test_keep_alive_reuses_upstream_connections(reactor: Any, running: Proxy) -> None:
    """Pipelined requests on one client connection are answered in order over one
    upstream connection."""
    request = b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: p\r\n\r\n" % i for i in range(4))
    request += b"GET /echo/last HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    got = responses(await raw(reactor, running.number, request))
    assert [h.status for h, _ in got] == [200] * 5
    assert [r["path"] for r in running.behaviour.requests] == [
        "/echo/0", "/echo/1", "/echo/2", "/echo/3", "/echo/last"]
    assert len(running.recorder.connections) == 1


@pytest_twisted.ensureDeferred
async def test_gzip_when_accepted_and_not_already_encoded(reactor: Any,
                                                          running: Proxy) -> None:
    """Responses are gzipped for clients that accept it, once, and only then."""
    got = responses(await raw(reactor, running.number,
                              b"GET /echo HTTP/1.1\r\nHost: p\r\nAccept-Encoding: br, gzip\r\n"
                              b"\r\nGET /gzip HTTP/1.1\r\nHost: p\r\nAccept-Encoding: gzip\r\n"
                              b"\r\nGET /echo HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"))
    (first, body1), (second, body2), (third, body3) = got
    assert first.get(b"content-encoding") == b"gzip" and b'"method": "GET"' in gzip.decompress(
        body1)
    assert gzip.decompress(body2).startswith(b"already compressed")
    assert third.get(b"content-encoding") is None and body3.startswith(b"{")


@pytest_twisted.ensureDeferred
async def test_status_codes_head_and_redirects(reactor: Any, running: Proxy) -> None:
    """204/304/HEAD have no body; a redirect is passed back, never followed."""
    got = responses(await raw(reactor, running.number,
                              b"GET /status/204 HTTP/1.1\r\nHost: p\r\n\r\n"
                              b"GET /status/302 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"))
    assert [head.status for head, _ in got] == [204, 302]
    assert got[1][0].get(b"location").startswith(b"http://169.254.169.254")
    head_only = await raw(reactor, running.number,
                          b"HEAD /echo HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert head_only.startswith(b"HTTP/1.1 200 ") and head_only.endswith(b"\r\n\r\n")
    assert b"Content-Length: " in head_only
    assert [r["path"] for r in running.behaviour.requests] == ["/status/204", "/status/302",
                                                               "/echo"]


@pytest_twisted.ensureDeferred
async def test_upstream_failures_are_502_or_504(reactor: Any) -> None:
    """Upstream drop: 502; slow: 504 at the response deadline; cut mid-body: client cut."""
    proxy = Proxy(reactor, response_timeout=0.3)
    try:
        dropped = await raw(reactor, proxy.number,
                            b"GET /drop HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        assert dropped.startswith(b"HTTP/1.1 502 ")
        slow = await raw(reactor, proxy.number,
                         b"GET /slow/2 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        assert slow.startswith(b"HTTP/1.1 504 ")
        half = await raw(reactor, proxy.number,
                         b"GET /half HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        assert half.startswith(b"HTTP/1.1 200 ") and len(half.split(b"\r\n\r\n", 1)[1]) < 1000
    finally:
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream(reactor: Any, running: Proxy) -> None:
    """A client that goes away mid-exchange makes the proxy drop the upstream request."""
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.number), client)
    client.transport.write(b"GET /hold HTTP/1.1\r\nHost: p\r\n\r\n")
    for _ in range(50):
        if running.behaviour.requests:
            break
        await deferLater(reactor, 0.02, lambda: None)
    client.transport.abortConnection()
    for _ in range(100):
        if running.behaviour.cancelled:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert running.behaviour.cancelled == 1
    assert running.handler.completed_exchanges[-1].error_reason == "client went away"


@pytest_twisted.ensureDeferred
async def test_large_response_streams(reactor: Any, running: Proxy) -> None:
    """A 20 MB response streams through with its length intact."""
    data = await raw(reactor, running.number,
                     b"GET /big/20000000 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
                     timeout=60)
    [(head, body)] = responses(data)
    assert head.content_length == 20_000_000 and len(body) == 20_000_000


@pytest_twisted.ensureDeferred
async def test_drain_finishes_in_flight_exchange(reactor: Any, running: Proxy) -> None:
    """Draining lets a slow exchange finish (with Connection: close) and closes idle ones."""
    idle = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.number), idle)
    busy = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.number), busy)
    busy.transport.write(b"GET /slow/0.3 HTTP/1.1\r\nHost: p\r\n\r\n")
    await deferLater(reactor, 0.1, lambda: None)
    drained = running.tracker.drain(5.0)
    assert await idle.closed == b""
    data = await busy.closed
    assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data
    await drained


async def _idle_clients(reactor: Any, port: int, count: int) -> list[RawClient]:
    clients = []
    for _ in range(count):
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        clients.append(client)
    await deferLater(reactor, 0.05, lambda: None)  # let the server accept them all
    return clients


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_limit_get_503_and_close(reactor: Any) -> None:
    """max_connections: one more is answered 503 and closed; a freed slot serves again."""
    proxy = Proxy(reactor, ServerLimits(max_connections=3))
    try:
        held = await _idle_clients(reactor, proxy.number, 3)
        refused = await raw(reactor, proxy.number, b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert proxy.rejections == [(503, "too many connections")]
        assert proxy.recorder.raw == b""  # nothing reached the upstream
        held[0].transport.loseConnection()
        await held[0].closed
        await deferLater(reactor, 0.05, lambda: None)
        served = await raw(reactor, proxy.number,
                           b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        assert served.startswith(b"HTTP/1.1 200 ")
        for client in held[1:]:
            client.transport.loseConnection()
    finally:
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_connections_per_client_are_limited(reactor: Any) -> None:
    """max_connections_per_client counts by address and frees slots on close."""
    proxy = Proxy(reactor, ServerLimits(max_connections_per_client=2))
    try:
        held = await _idle_clients(reactor, proxy.number, 2)
        refused = await raw(reactor, proxy.number, b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert proxy.rejections == [(503, "too many connections from one client")]
        for client in held:
            client.transport.loseConnection()
            await client.closed
        await deferLater(reactor, 0.05, lambda: None)
        factory = proxy.port.factory
        assert factory._per_client == {}  # nothing left counted once all are gone
        served = await raw(reactor, proxy.number,
                           b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        assert served.startswith(b"HTTP/1.1 200 ")
    finally:
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_pool_limits_can_be_changed_at_run_time(reactor: Any, running: Proxy) -> None:
    """configure() (a reload): idle connections beyond the new limit close at the next sweep."""
    request = b"GET /slow/0.2 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    answers = await defer.gatherResults([defer.ensureDeferred(raw(reactor, running.number,
                                                                  request))
                                         for _ in range(3)])
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)
    assert running.pool.idle_connections == 3
    running.pool.configure(1, 5.0)
    await deferLater(reactor, 1.2, lambda: None)  # one sweep
    assert running.pool.idle_connections == 1
