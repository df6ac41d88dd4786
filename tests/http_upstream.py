"""
A real HTTP(S) upstream for proxy tests: twisted.web on 127.0.0.1, with the
raw bytes of every connection recorded (what the upstream actually
received), and behaviours chosen by path:

- C{/echo...}: 200 JSON with method, path, headers and body length;
- C{/status/NNN}: that status (C{/status/302} redirects to the metadata address);
- C{/slow/SECONDS}: answer after a delay;
- C{/big/BYTES}: a streamed body of that size;
- C{/gzip}: a body already gzip-encoded by the upstream;
- C{/drop}: close the connection without answering;
- C{/half}: send part of the body, then close;
- C{/hold}: never answer (for client-disconnect tests);
- C{.../own-id}: 200 with the upstream's own C{X-Request-Id: upstream-own-id};
- C{.../echo-back}: a 302 to the request's own URL (query included), echoing
  the Authorization it received in C{X-Echo-Authorization} (as careless APIs do).
"""

from __future__ import annotations

import gzip as gzip_module
import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import resource, server


class _Tee(ProtocolWrapper):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self.factory.closed += 1
        super().connectionLost(reason)


class RecordingFactory(WrappingFactory):
    """Wraps the Site and keeps every connection's raw input."""

    protocol = _Tee

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.connections: list[_Tee] = []
        self.closed = 0

    @property
    def raw(self) -> bytes:
        """Everything received on every connection, in order."""
        return b"".join(c.received for c in self.connections)


class Behaviour(resource.Resource):
    """The upstream's resources."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.requests: list[dict[str, Any]] = []
        self.cancelled = 0

    def render(self, request: server.Request) -> Any:
        body = request.content.read()
        path = request.uri.decode()
        record = {"method": request.method.decode(), "path": path, "body": body,
                  "headers": [(k.decode().lower(), v.decode())
                              for k, values in request.requestHeaders.getAllRawHeaders()
                              for v in values]}
        self.requests.append(record)
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
            request.setResponseCode(status)
            if status in (301, 302, 307, 308):
                request.setHeader(b"location", b"http://169.254.169.254/latest/meta-data/")
            return b"" if status in (204, 304) else b"status %d\n" % status
        if path.startswith("/slow/"):
            delay = float(path.split("/")[2])
            return self._later(request, delay, b"slow\n")
        if path.startswith("/big/"):
            size = int(path.split("/")[2])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % size)
            return self._stream(request, size)
        if path == "/gzip":
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-type", b"text/plain")
            return gzip_module.compress(b"already compressed " * 50)
        if path == "/drop":
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if path == "/half":
            request.setHeader(b"content-length", b"1000")
            request.write(b"x" * 100)
            self.reactor.callLater(0.05, request.channel.transport.abortConnection)
            return server.NOT_DONE_YET
        if path.split("?")[0].endswith("/echo-back"):
            request.setResponseCode(302)
            request.setHeader(b"location", b"https://api.upstream.test" + request.uri)
            request.setHeader(b"x-echo-authorization",
                              request.getHeader(b"authorization") or b"-")
            return b"moved\n"
        if path.endswith("/own-id"):
            request.setHeader(b"x-request-id", b"upstream-own-id")
            return b"ok\n"
        if path == "/hold":
            request.notifyFinish().addErrback(self._count_cancel)
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        document = {"method": record["method"], "path": path, "length": len(body),
                    "headers": record["headers"], "pad": "p" * 300}
        return json.dumps(document).encode()

    def _count_cancel(self, failure: Any) -> None:
        self.cancelled += 1

    def _later(self, request: server.Request, delay: float, body: bytes) -> Any:
        d = deferLater(self.reactor, delay, lambda: None)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def answer(_: Any) -> None:
            request.write(body)
            request.finish()

        d.addCallbacks(answer, lambda _: None)
        return server.NOT_DONE_YET

    def _stream(self, request: server.Request, size: int) -> Any:
        piece = b"z" * 65536
        sent = 0

        @defer.inlineCallbacks
        def pump() -> Any:
            nonlocal sent
            while sent < size:
                chunk = piece[: min(len(piece), size - sent)]
                request.write(chunk)
                sent += len(chunk)
                yield deferLater(self.reactor, 0, lambda: None)
            request.finish()

        pump()
        return server.NOT_DONE_YET


def start_upstream(reactor: Any, context_factory: Any = None) -> tuple[Any, Behaviour,
                                                                       RecordingFactory]:
    """Listen on 127.0.0.1:0 (TLS with C{context_factory}); return port, resource, recorder."""
    behaviour = Behaviour(reactor)
    site = server.Site(behaviour)
    site.log = lambda request: None  # type: ignore[method-assign]
    recorder = RecordingFactory(site)
    if context_factory is None:
        port = reactor.listenTCP(0, recorder, interface="127.0.0.1")
    else:
        port = reactor.listenSSL(0, recorder, context_factory, interface="127.0.0.1")
    return port, behaviour, recorder
