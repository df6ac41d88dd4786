"""
One request's life in the proxy: the client side hands over the head, the
handler decides (answer locally, or forward with a plan), and the exchange
streams the request body up and the response down with backpressure, under
the response and total deadlines.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.host.redact import MASK
from appliance.http.body import LAST_CHUNK, BodyDecoder, chunk
from appliance.http.errors import HTTPError, error_response, phrase
from appliance.http.head import RequestHead, ResponseHead
from appliance.http.headers import ENGINE_OWNED_RESPONSE, VIA, dropped_fields
from appliance.http.upstream import UpstreamConnectError, UpstreamProtocol, UpstreamTarget

if TYPE_CHECKING:
    from appliance.http.server import ProxyServerProtocol

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
MASKED = MASK.encode("ascii")
UPSTREAM_FAILURES = ("unreachable", "tls", "closed", "bad_response", "timeout")
"""L{Exchange.failure} values: dial failed, TLS handshake or verification failed, the connection
closed early, an invalid response, a response or total deadline passed."""
COMPRESSIBLE = (b"text/", b"application/json", b"application/javascript",
                b"application/xml", b"application/x-www-form-urlencoded", b"+json", b"+xml",
                b"image/svg+xml")
MIN_GZIP = 256
_DONE = object()  # marks the end of a held response
_VIA_LINE = b"Via: " + VIA


@define(slots=True)
class UpstreamPlan:
    """
    How to forward: the target, the request head to send (request line and
    end-to-end fields, without framing fields: the engine adds those), and
    the limits that apply.
    """

    target: UpstreamTarget
    head: list[bytes]
    response_timeout: float
    total_timeout: float
    retries: int = 0
    gzip: bool = True
    on_response_head: Any = None  # callable(exchange, head) -> UpstreamPlan | None (a retry)
    masks: tuple[bytes, ...] = ()  # values masked wherever the response head echoes them


def _masked(head: bytes, masks: tuple[bytes, ...]) -> bytes:
    """C{head} with every occurrence of each mask replaced (the common case: none)."""
    for mask in masks:
        if mask in head:
            head = head.replace(mask, MASKED)
    return head


@define(slots=True, eq=False)
class Exchange:
    """One request; see the module docstring."""

    server: ProxyServerProtocol
    head: RequestHead
    body: BodyDecoder
    started: float
    attributes: dict[str, Any] = field(factory=dict)
    plan: UpstreamPlan | None = None
    upstream: UpstreamProtocol | None = None
    status: int = 0
    response_started: bool = False
    finished: bool = False
    request_sent: bool = False
    body_bytes: int = 0
    response_bytes: int = 0
    pending: bytes = b""
    error_reason: str = ""
    failure: str = ""  # what went wrong upstream, one of UPSTREAM_FAILURES ("": nothing)
    # Fields the handler adds to the answer, local or upstream (an upstream's own
    # field of the same name wins): e.g. the request ID.
    response_headers: tuple[tuple[bytes, bytes], ...] = ()
    upstream_started: float = 0.0
    upstream_seconds: float = 0.0
    _out: list[bytes] = field(factory=list)
    _chunked_out: bool = False
    _streaming: bool = False  # the upstream is registered as the client's producer
    _gzip: Any = None
    _keep_client: bool = True
    deadline: float = 0.0  # the earliest of the deadlines below (0: none)
    total_deadline: float = 0.0
    response_deadline: float = 0.0
    _attempt: int = 0
    _held: list[Any] | None = None

    log = Logger()

    # -- handler API -----------------------------------------------------------

    def respond_error(self, status: int, reason: str = "",
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer locally (before anything of a response was sent)."""
        if self.finished:
            return
        self.error_reason = reason or self.error_reason
        if self.response_started:
            self._abort_client()
            return
        self.status = status
        close = not (self.body.done and not self.pending and self.server.keep_alive_allowed(self))
        if self.response_headers:
            headers = [*(headers or ()), *self.response_headers]
        self.server.write(error_response(status, headers, close=close,
                                         head_only=self.head.method == b"HEAD"))
        self.response_started = True
        self._finish(client_reusable=not close)

    def forward(self, plan: UpstreamPlan) -> None:
        """Send the request upstream according to C{plan}."""
        if self.finished:
            return
        self.plan = plan
        self.total_deadline = self.server.clock.seconds() + plan.total_timeout
        self._update_deadline()
        self._connect()

    # -- connecting ------------------------------------------------------------

    def _connect(self) -> None:
        plan = self.plan
        assert plan is not None
        pool = self.server.pool
        protocol = pool.checkout(plan.target)
        self.upstream_started = self.server.clock.seconds()
        if protocol is not None:
            self._send(protocol)
            return
        d = pool.dial(plan.target)
        d.addCallbacks(self._send, self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        if self.finished:
            return
        plan = self.plan
        assert plan is not None
        if self._attempt < plan.retries and self.head.method in IDEMPOTENT:
            self._attempt += 1
            self._connect()
            return
        reason, self.failure = "upstream unreachable", "unreachable"
        if failure.check(UpstreamConnectError) and failure.value.tls_failed:
            reason, self.failure = "upstream TLS handshake or verification failed", "tls"
        self.respond_error(502, f"{reason}: {failure.getErrorMessage()}")

    def _send(self, protocol: UpstreamProtocol) -> None:
        if self.finished:
            self.server.pool.checkin(protocol)
            return
        plan = self.plan
        assert plan is not None
        self.upstream = protocol
        head = self.head
        data = b"\r\n".join(plan.head)
        if head.content_length is not None:
            data += b"\r\nContent-Length: %d" % head.content_length
        elif head.chunked:
            data += b"\r\nTransfer-Encoding: chunked"
        data += b"\r\n\r\n"
        if self.pending or not self.body.done:
            data += self._upstream_body(self._take_pending())
        protocol.send(self, data, head.method == b"HEAD")
        self.request_sent = True
        self.response_deadline = self.upstream_started + plan.response_timeout
        self._update_deadline()
        if not self.body.done:
            protocol.transport.registerProducer(self.server.transport, True)
            self.server.continue_body(self)
        elif self.pending:
            self.server.take_back(self._take_pending())

    def _take_pending(self) -> bytes:
        pending, self.pending = self.pending, b""
        return pending

    # -- request body ----------------------------------------------------------

    def client_data(self, raw: bytes) -> bytes:
        """Body bytes from the client; returns bytes beyond this request's body."""
        if self.upstream is None or self.finished:
            self.pending += raw
            return b""
        data = self._upstream_body(raw)
        if data:
            self.upstream.write(data)
        if self.body.done:
            leftover, self.pending = self.pending, b""
            self.upstream.transport.unregisterProducer()
            return leftover
        return b""

    def _stream_response_from(self, upstream: UpstreamProtocol) -> None:
        # The client's socket buffer paces the upstream's reads.
        self._streaming = True
        transport = self.server.transport
        if getattr(transport, "producer", None) is None:
            transport.registerProducer(upstream.transport, True)

    def _stop_streaming(self) -> None:
        if not self._streaming:
            return
        self._streaming = False
        transport = self.server.transport
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()

    def _upstream_body(self, raw: bytes) -> bytes:
        """Decode client body bytes, count them, re-frame them for the upstream."""
        body = self.body
        if body.done:
            self.pending += raw
            return b""
        try:
            data, leftover = body.feed(raw)
        except HTTPError as error:
            self.respond_error(error.status, error.reason)
            return b""
        self.pending += leftover
        self.body_bytes += len(data)
        if self.body_bytes > self.server.max_body:
            self.respond_error(413, "request body too large")
            return b""
        if self.head.chunked:
            return chunk(data) + (LAST_CHUNK if body.done else b"")
        return data

    def client_body_failed(self, error: HTTPError) -> None:
        """The client's body could not be read (limit, framing, timeout)."""
        self.respond_error(error.status, error.reason)

    # -- response --------------------------------------------------------------

    def upstream_head(self, head: ResponseHead) -> None:
        """The upstream answered: pass the head on (or retry, if the handler asks)."""
        plan = self.plan
        assert plan is not None
        self.response_deadline = 0.0
        self._update_deadline()
        self.upstream_seconds = self.server.clock.seconds() - self.upstream_started
        if plan.on_response_head is not None and not self.response_started:
            retry = plan.on_response_head(self, head)
            if retry is not None:
                if isinstance(retry, Deferred):
                    self._hold_response(head, retry)
                else:
                    self._retry(retry)
                return
        self._start_response(head)

    def _start_response(self, head: ResponseHead) -> None:
        self.status = head.status
        self.response_started = True
        self._out.append(self._client_head(head))

    def _hold_response(self, head: ResponseHead, decision: Deferred[Any]) -> None:
        """Keep the response aside until the handler decides whether to retry."""
        self._held = [head]
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pauseProducing()

        def decided(retry: Any) -> None:
            held, self._held = self._held, None
            if self.finished or held is None:
                return
            if retry is not None:
                self._retry(retry)
                return
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.resumeProducing()
            self._start_response(held[0])
            for piece in held[1:]:
                if piece is _DONE:
                    self.upstream_done()
                    return
                self.upstream_data(piece)
            self.upstream_flush()

        decision.addBoth(decided)

    def _retry(self, plan: UpstreamPlan) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        self.plan = plan
        self._connect()

    def _client_head(self, head: ResponseHead) -> bytes:
        request = self.head
        status = head.status
        drop = dropped_fields(head, ENGINE_OWNED_RESPONSE)
        lines = [b"HTTP/1.1 %d %s" % (status, head.reason or phrase(status))]
        lines += [name + b": " + value for name, value in head.headers if name not in drop]
        for name, value in self.response_headers:
            if name.lower() not in head.fields:
                lines.append(name + b": " + value)
        lines.append(_VIA_LINE)
        no_body = request.method == b"HEAD" or status in (204, 304)
        keep = self.server.keep_alive_allowed(self)
        plan = self.plan
        if (not no_body and plan is not None and plan.gzip and status == 200
                and self._accepts_gzip() and self._compressible(head)):
            self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31)
            lines.append(b"Content-Encoding: gzip")
            lines.append(b"Vary: Accept-Encoding")
            length = None
        else:
            length = head.content_length
            if no_body and request.method == b"HEAD" and length is not None:
                lines.append(b"Content-Length: %d" % length)
        if not no_body:
            if length is not None:
                lines.append(b"Content-Length: %d" % length)
            elif request.version == b"HTTP/1.1":
                lines.append(b"Transfer-Encoding: chunked")
                self._chunked_out = True
            else:
                keep = False  # HTTP/1.0 without a length: the close ends the body
        if not keep:
            lines.append(b"Connection: close")
        self._keep_client = keep
        lines.append(b"\r\n")
        out = b"\r\n".join(lines)
        if plan is not None and plan.masks:
            out = _masked(out, plan.masks)
        return out

    def _accepts_gzip(self) -> bool:
        accept = self.head.fields.get(b"accept-encoding")
        if not accept or b"gzip" not in accept.lower():
            return False
        for item in accept.lower().split(b","):
            name, _, params = item.strip().partition(b";")
            if name.strip() == b"gzip":
                return params.replace(b" ", b"") not in (b"q=0", b"q=0.0", b"q=0.00")
        return False

    @staticmethod
    def _compressible(head: ResponseHead) -> bool:
        if b"content-encoding" in head.fields:
            return False
        if head.content_length is not None and head.content_length < MIN_GZIP:
            return False
        kind = head.get(b"content-type", b"").lower()  # type: ignore[union-attr]
        return any(marker in kind for marker in COMPRESSIBLE)

    def upstream_data(self, data: bytes) -> None:
        """A piece of the response body."""
        if self._held is not None:
            self._held.append(data)
            return
        self.response_bytes += len(data)
        if self._gzip is not None:
            data = self._gzip.compress(data)
            if not data:
                return
        self._out.append(chunk(data) if self._chunked_out else data)

    def upstream_done(self) -> None:
        """The response is complete."""
        if self._held is not None:
            self._held.append(_DONE)
            return
        if self._gzip is not None:
            tail = self._gzip.flush()
            self._out.append(chunk(tail) if self._chunked_out else tail)
        if self._chunked_out:
            self._out.append(LAST_CHUNK)
        self._write_out()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self.body.done:
                self.server.pool.checkin(upstream)
            else:
                upstream.abort()
        self._finish(client_reusable=self._keep_client and self.body.done)

    def upstream_flush(self) -> None:
        """
        Write what the last upstream read produced, in one write. A response
        that goes on past this read streams with backpressure from here on;
        one complete in a single read (most) skips registering a producer.
        """
        if self._out and not self._streaming and self.upstream is not None \
                and not self.finished:
            self._stream_response_from(self.upstream)
        self._write_out()

    def _write_out(self) -> None:
        out = self._out
        if out:
            self.server.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_lost(self, reason: Failure) -> None:
        """The upstream connection failed mid-exchange."""
        self.upstream = None
        if self.finished:
            return
        self.failure = "bad_response" if reason.check(HTTPError) else "closed"
        if not self.response_started:
            if reason.check(HTTPError):
                self.respond_error(502, reason.value.reason)
            else:
                self.respond_error(502, f"upstream closed: {reason.getErrorMessage()}")
            return
        self.error_reason = "upstream closed mid-response"
        self.upstream_flush()
        self._abort_client()

    # -- endings ---------------------------------------------------------------

    def client_lost(self) -> None:
        """The client went away: cancel the upstream request."""
        if self.finished:
            return
        self.error_reason = self.error_reason or "client went away"
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        self._finish(client_reusable=False, client_gone=True)

    def _timed_out(self, which: str) -> None:
        if self.finished:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        self.failure = "timeout"
        if not self.response_started:
            self.respond_error(504, f"upstream {which} timeout")
        else:
            self.error_reason = f"upstream {which} timeout"
            self.upstream_flush()
            self._abort_client()

    def _abort_client(self) -> None:
        self._finish(client_reusable=False)
        self.server.abort()

    def _update_deadline(self) -> None:
        total, response = self.total_deadline, self.response_deadline
        self.deadline = min(total, response) if total and response else total or response

    def deadline_passed(self, now: float) -> None:
        """The server's sweep found a deadline passed."""
        if self.response_deadline and now >= self.response_deadline:
            self._timed_out("response")
        elif self.total_deadline and now >= self.total_deadline:
            self._timed_out("total")

    def _finish(self, client_reusable: bool, client_gone: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop_streaming()
        self.deadline = 0.0
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        self.server.exchange_finished(self, client_reusable, client_gone)
