"""
The pow TCP protocol: moves bytes between the socket, the frame decoder
and the L{PowEngine}, and enforces the per-phase deadlines.

Phases: waiting for the first byte (or the next request), inside a frame,
and solving (from the challenge to the complete solution frame). Each has
its own deadline on the reactor's clock; missing one earns a C{timeout}
error and a close. Deadlines are plain numbers on the connection, checked
by one sweep of the factory a few times a second (as the HTTP engine's):
a reactor timer per connection, created, moved and cancelled, was a
measurable share of a session's cost. A deadline therefore fires up to
L{PowFactory.sweep_interval} late.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.host.deadlines import DeadlineSweep
from appliance.host.peers import peer_host
from appliance.http.fastwrite import close_now, read_now, write_now
from appliance.pow.engine import PowEngine
from appliance.pow.frames import (
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    ProtocolError,
    encode,
    encode_text,
    error_frame,
)
from appliance.pow.quotes import Quote

_QUOTE_FRAMES_MAX = 4096
_CHALLENGE_REQUEST = MessageType.CHALLENGE_REQUEST
_SOLUTION = MessageType.SOLUTION


class PowProtocol(Protocol):
    """One client connection."""

    log = Logger()
    factory: PowFactory
    engine: PowEngine  # the factory's, set when connected

    def __init__(self) -> None:
        self._queue: deque[Frame] = deque()
        self._busy = False
        self._closing = False
        self._draining = False
        self._awaiting_solution = False
        self._rounds = 0
        self._group: str | None = None
        self._phase_deadline = 0.0  # 0: no phase deadline runs
        self._phase_why = ""
        self._frame_deadline = 0.0  # 0: no partial frame

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        self.engine = self.factory.engine
        self.clock = self.factory.clock
        self.address = peer_host(self.transport)
        self._group = self.engine.admit(self.address)
        if self._group is None:
            self._closing = True
            write_now(self.transport, error_frame(ErrorCode.BUSY, "too many connections"))
            close_now(self.transport)
            return
        self.decoder = FrameDecoder(self.engine.config.max_frame)
        self.factory.tracker.add(self)
        self._start_phase(self.engine.config.first_byte_timeout, "no request in time")
        early = read_now(self.transport)
        if early:
            self.dataReceived(early)

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_timers()
        if self._group is not None:
            self.engine.release(self._group)
            self._group = None
            self.factory.tracker.discard(self)

    def begin_drain(self) -> None:
        """Finish the exchange in progress (a client still solving may submit), then close."""
        self._draining = True
        if not self._busy and not self._awaiting_solution:
            self._close()

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._awaiting_solution:
            self._stop_phase()
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as error:
            self._fail(error.code, error.message)
            return
        self._watch_frame()
        if len(frames) == 1 and not self._queue and not self._busy:
            self._handle(frames[0])  # one whole frame per read: no queue
        elif frames:
            self._queue.extend(frames)
            self._pump()

    def _pump(self) -> None:
        while self._queue and not self._busy and not self._closing:
            self._handle(self._queue.popleft())

    def _handle(self, frame: Frame) -> None:
        kind = frame.type
        if kind is _CHALLENGE_REQUEST:
            self._start(self.engine.challenge, self._send_challenge, None)
        elif kind is _SOLUTION:
            self._start(self.engine.redeem, self._send_quote, frame.payload)
        else:
            self._fail(ErrorCode.BAD_FRAME, f"a client does not send {frame.type.name} messages")

    def _start(self, work: Any, answer: Any, payload: dict[str, Any] | None) -> None:
        self._busy = True
        try:
            result = work(self.address) if payload is None else work(self.address, payload)
        except ProtocolError as error:
            self._busy = False
            self._fail(error.code, error.message)
            return
        except Exception:
            self._bug(Failure())
            return
        # Deferred's metaclass is ABCMeta, whose isinstance() is slow: test
        # the two synchronous answers (a challenge's JSON, a quote) first.
        kind = type(result)
        if kind is str or kind is Quote or not isinstance(result, Deferred):
            answer(result)
        else:
            result.addCallbacks(answer, self._refused)
            result.addErrback(self._bug)

    # -- answers -----------------------------------------------------------

    def _send_challenge(self, payload_json: str) -> None:
        self._busy = False
        if self._closing:
            return
        write_now(self.transport, encode_text(MessageType.CHALLENGE, payload_json))
        self._awaiting_solution = True
        self._start_phase(self.engine.config.solution_timeout, "no solution in time")
        self._pump()

    def _send_quote(self, quote: Quote) -> None:
        self._busy = False
        self._awaiting_solution = False
        self._stop_phase()
        if self._closing:
            return
        write_now(self.transport, self.factory.quote_frame(quote))
        self._rounds += 1
        if self._draining or self._rounds >= self.engine.config.rounds_per_connection:
            self._close()
            return
        self._start_phase(self.engine.config.first_byte_timeout, "no request in time")
        self._pump()

    def _refused(self, failure: Failure) -> None:
        failure.trap(ProtocolError)
        error = failure.value
        self._busy = False
        self._fail(error.code, error.message)

    def _bug(self, failure: Failure) -> None:
        self.log.failure("pow: unexpected error serving a client", failure)
        self._fail(ErrorCode.BUSY, "internal error")

    def _fail(self, code: str, message: str) -> None:
        if self._closing:
            return
        self.engine.metrics.rejected.labels(code).inc()
        write_now(self.transport, error_frame(code, message))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timers()
        self._queue.clear()
        close_now(self.transport)

    # -- deadlines ---------------------------------------------------------

    def _start_phase(self, seconds: float, why: str) -> None:
        self._phase_why = why
        self._phase_deadline = self.clock.seconds() + seconds

    def _stop_phase(self) -> None:
        """Between phases (a frame is being handled): no phase deadline runs."""
        self._phase_deadline = 0.0

    def _watch_frame(self) -> None:
        if self.decoder.partial:
            if not self._frame_deadline:  # dribbled bytes do not move it
                self._frame_deadline = self.clock.seconds() + self.engine.config.frame_timeout
        else:
            self._frame_deadline = 0.0

    def _cancel_timers(self) -> None:
        self._phase_deadline = self._frame_deadline = 0.0

    def check_deadlines(self, now: float) -> None:
        """Called by the factory's sweep: time out a phase or frame that is late."""
        if self._closing:
            return
        frame, phase = self._frame_deadline, self._phase_deadline
        if frame and now >= frame and (not phase or frame <= phase):
            self._timed_out("frame not finished in time")
        elif phase and now >= phase:
            self._timed_out(self._phase_why)

    def _timed_out(self, why: str) -> None:
        self._cancel_timers()
        self._fail(ErrorCode.TIMEOUT, why)


class PowFactory(Factory):
    """Builds L{PowProtocol}s sharing the engine, clock and tracker."""

    protocol = PowProtocol
    noisy = False
    sweep_interval = 0.1
    """Seconds between deadline checks: how late a deadline may fire."""

    def __init__(self, engine: PowEngine, clock: Any, tracker: Any) -> None:
        self.engine = engine
        self.clock = clock
        self.tracker = tracker
        self._quote_frames: dict[Quote, bytes] = {}
        self.deadlines = DeadlineSweep(clock, tracker, self.sweep_interval)

    def startFactory(self) -> None:
        """Start sweeping deadlines."""
        self.deadlines.start()

    def stopFactory(self) -> None:
        """Keep sweeping until the connections that remain are gone."""
        self.deadlines.stop()

    def quote_frame(self, quote: Quote) -> bytes:
        """The QUOTE frame for C{quote}, encoded once (quotes repeat)."""
        frame = self._quote_frames.get(quote)
        if frame is None:
            if len(self._quote_frames) >= _QUOTE_FRAMES_MAX:
                self._quote_frames.clear()  # API quotes come and go
            frame = self._quote_frames[quote] = encode(MessageType.QUOTE, quote.to_json())
        return frame
