"""
The pow TCP protocol: moves bytes between the socket, the frame decoder
and the L{PowEngine}, and enforces the per-phase deadlines.

Phases: waiting for the first byte (or the next request), inside a frame,
and solving (from the challenge to the complete solution frame). Each has
its own deadline on the reactor's clock; missing one earns a C{timeout}
error and a close. One reactor timer per connection carries the phase
deadline and is moved (C{reset}) from phase to phase: creating and
cancelling a timer per phase was a measurable share of a session's cost.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.http.fastwrite import close_now, write_now
from appliance.pow.engine import PowEngine
from appliance.pow.frames import (
    ErrorCode,
    Frame,
    FrameDecoder,
    MessageType,
    ProtocolError,
    encode,
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
        self._phase: IDelayedCall | None = None
        self._phase_why = ""
        self._frame_timer: IDelayedCall | None = None

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        self.engine = self.factory.engine
        self.address = str(getattr(self.transport.getPeer(), "host", "?"))
        self._group = self.engine.admit(self.address)
        if self._group is None:
            self._closing = True
            write_now(self.transport, error_frame(ErrorCode.BUSY, "too many connections"))
            close_now(self.transport)
            return
        self.decoder = FrameDecoder(self.engine.config.max_frame)
        self.factory.tracker.add(self)
        self._start_phase(self.engine.config.first_byte_timeout, "no request in time")

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
        self._queue.extend(frames)
        self._watch_frame()
        self._pump()

    def _pump(self) -> None:
        while self._queue and not self._busy and not self._closing:
            frame = self._queue.popleft()
            kind = frame.type
            if kind is _CHALLENGE_REQUEST:
                self._start(self.engine.challenge, self._send_challenge, None)
            elif kind is _SOLUTION:
                self._start(self.engine.redeem, self._send_quote, frame.payload)
            else:
                self._fail(ErrorCode.BAD_FRAME,
                           f"a client does not send {frame.type.name} messages")

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
        # the two synchronous answers (a payload, a quote) first.
        kind = type(result)
        if kind is dict or kind is Quote or not isinstance(result, Deferred):
            answer(result)
        else:
            result.addCallbacks(answer, self._refused)
            result.addErrback(self._bug)

    # -- answers -----------------------------------------------------------

    def _send_challenge(self, payload: dict[str, Any]) -> None:
        self._busy = False
        if self._closing:
            return
        write_now(self.transport, encode(MessageType.CHALLENGE, payload))
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
        phase = self._phase
        if phase is None:
            self._phase = self.factory.clock.callLater(seconds, self._phase_passed)
        else:
            phase.reset(seconds)  # cheap when the deadline moves later

    def _stop_phase(self) -> None:
        """Between phases (a frame is being handled): no phase deadline runs."""
        self._phase_why = ""

    def _phase_passed(self) -> None:
        self._phase = None
        if self._phase_why:
            self._timed_out(self._phase_why)

    def _cancel_phase(self) -> None:
        self._phase_why = ""
        if self._phase is not None and self._phase.active():
            self._phase.cancel()
        self._phase = None

    def _watch_frame(self) -> None:
        if self.decoder.partial:
            if self._frame_timer is None:
                self._frame_timer = self.factory.clock.callLater(
                    self.engine.config.frame_timeout, self._timed_out, "frame not finished in time")
        elif self._frame_timer is not None:
            if self._frame_timer.active():
                self._frame_timer.cancel()
            self._frame_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_phase()
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        self._frame_timer = None

    def _timed_out(self, why: str) -> None:
        self._phase = None
        self._frame_timer = None
        self._fail(ErrorCode.TIMEOUT, why)


class PowFactory(Factory):
    """Builds L{PowProtocol}s sharing the engine, clock and tracker."""

    protocol = PowProtocol
    noisy = False

    def __init__(self, engine: PowEngine, clock: Any, tracker: Any) -> None:
        self.engine = engine
        self.clock = clock
        self.tracker = tracker
        self._quote_frames: dict[Quote, bytes] = {}

    def quote_frame(self, quote: Quote) -> bytes:
        """The QUOTE frame for C{quote}, encoded once (quotes repeat)."""
        frame = self._quote_frames.get(quote)
        if frame is None:
            if len(self._quote_frames) >= _QUOTE_FRAMES_MAX:
                self._quote_frames.clear()  # API quotes come and go
            frame = self._quote_frames[quote] = encode(MessageType.QUOTE, quote.to_json())
        return frame
