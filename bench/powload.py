"""
The load generator of the pow benchmark, run as its own process by
L{bench.pow}:

    python -m bench.powload --mode pow --port P --connections 64 --duration 10

C{--connections} virtual clients on one Twisted reactor (epoll, raw
Protocols) each loop sessions until the duration has passed:

  - C{pow}: connect, CHALLENGE_REQUEST, read the CHALLENGE, solve it with
    the fast solver (L{appliance.pow.solver.solve}), SOLUTION, read the
    QUOTE, read until the server closes;
  - C{trivial}: connect, read until the server closes (and check that
    C{--expect} bytes came).

A session counts when it ends (the server closed) within the duration;
sessions still open at the deadline are dropped, not counted. Prints one
JSON object on stdout: sessions, sessions/s, p50/p99 session latency, errors
by kind, and this process's CPU time over the measured window (to tell a
load generator that is the bottleneck).
"""

from __future__ import annotations

import _socket
import argparse
import errno
import json
import resource
import struct
import sys
import time
from collections import Counter
from typing import Any

from twisted.internet.protocol import Protocol

from appliance.pow.challenge import Challenge
from appliance.pow.frames import MessageType, encode
from appliance.pow.solver import solve

WATCHDOG = 0.5
"""Seconds between checks for sessions older than C{--timeout}."""

RETRY_DELAY = 0.01
"""Seconds a virtual client waits after a failed session before the next."""

GRACE = 2.0
"""Seconds open sessions get to end after the deadline before they are aborted."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.powload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("pow", "trivial"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds a session may take before it is aborted (an error)")
    parser.add_argument("--expect", type=int, default=0,
                        help="trivial mode: bytes the server sends before closing")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0:
        parser.error("--connections must be >= 1 and --duration > 0")

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    run = Run(reactor, args)
    reactor.callWhenRunning(run.start)
    reactor.run()
    json.dump(run.report(), sys.stdout)
    sys.stdout.write("\n")
    return 0


class Run:
    """The virtual clients, the clock of the measured window, and the counts."""

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.running = False
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.hashes = 0
        self.clients = [VirtualClient(self, args.mode) for _ in range(args.connections)]
        self.started = self.stopped = 0.0
        self.cpu_started = self.cpu_used = (0.0, 0.0)

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        self.running = True
        self.cpu_started = _cpu_seconds()
        self.started = time.perf_counter()
        for client in self.clients:
            client.next_session()
        self.watchdog = LoopingCall(self.check_timeouts)
        self.watchdog.start(WATCHDOG, now=False)
        self.reactor.callLater(self.args.duration, self.deadline)

    def record(self, began: float, error: str | None) -> None:
        if not self.running:
            return
        if error is None:
            self.latencies.append(time.perf_counter() - began)
        else:
            self.errors[error] += 1

    def check_timeouts(self) -> None:
        limit = time.perf_counter() - self.args.timeout
        for client in self.clients:
            connection = client.connection
            if connection is not None and client.began < limit:
                connection.protocol.fail("timeout")
                connection.abortConnection()

    def deadline(self) -> None:
        self.stopped = time.perf_counter()
        user, system = _cpu_seconds()
        self.cpu_used = (user - self.cpu_started[0], system - self.cpu_started[1])
        self.running = False
        self.watchdog.stop()
        self.reactor.callLater(0, self.finish, time.perf_counter() + GRACE)

    def finish(self, until: float) -> None:
        """Stop once every open session ended, aborting stragglers after the grace."""
        busy = [client for client in self.clients if client.busy]
        if busy and time.perf_counter() < until:
            self.reactor.callLater(0.01, self.finish, until)
            return
        for client in busy:
            if client.connection is not None:
                client.connection.abortConnection()
        self.reactor.callLater(0.05, self.reactor.stop)

    def report(self) -> dict[str, Any]:
        elapsed = self.stopped - self.started
        latencies = sorted(self.latencies)
        sessions = len(latencies)
        return {
            "mode": self.args.mode,
            "connections": self.args.connections,
            "duration": elapsed,
            "sessions": sessions,
            "sessions_per_sec": sessions / elapsed if elapsed > 0 else 0.0,
            "p50_ms": _percentile(latencies, 0.50) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
            "errors": dict(self.errors),
            "cpu_user_seconds": self.cpu_used[0],
            "cpu_system_seconds": self.cpu_used[1],
            "cpu_cores": sum(self.cpu_used) / elapsed if elapsed > 0 else 0.0,
            "hashes": self.hashes,
        }


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


# -- the virtual clients -------------------------------------------------------


class Connection:
    """
    A client TCP connection as a bare reactor descriptor: a non-blocking
    connect, then C{recv} until the server closes, driving an ordinary
    L{Protocol}.

    Twisted's own TCP client (C{connectTCP}: a Connector, a Deferred, a
    delayed call and two connect attempts per connection) costs more CPU per
    connection than the trivial server it would measure, so it would be the
    bottleneck. This one makes the fewest calls: on loopback the handshake
    completes inside C{connect()}, so the request is sent at once (or kept
    until the socket is writable if it is not connected yet), and one read
    event takes both the answer and the server's close when they came
    together.
    """

    def __init__(self, reactor: Any, address: tuple[str, int], protocol: Session) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.closed = False
        self.pending = b""
        self.sock = sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        sock.setblocking(False)
        self.fd = sock.fileno()
        status = sock.connect_ex(address)
        if status not in (0, errno.EINPROGRESS):
            protocol.fail(f"connect_{errno.errorcode.get(status, status)}")
            reactor.callLater(0, self.close)
            return
        reactor.addReader(self)
        protocol.makeConnection(self)

    # IReadWriteDescriptor, for the reactor

    def fileno(self) -> int:
        return -1 if self.closed else self.fd

    def logPrefix(self) -> str:  # noqa: N802 (Twisted naming)
        return "powload"

    def doRead(self) -> None:  # noqa: N802
        recv = self.sock.recv
        while not self.closed:
            try:
                data = recv(65536)
            except BlockingIOError:
                return
            except OSError as error:
                self.protocol.fail(type(error).__name__)
                self.close()
                return
            if not data:
                self.close()  # the server closed: the session is over
                return
            self.protocol.dataReceived(data)

    def doWrite(self) -> None:  # noqa: N802
        data, self.pending = self.pending, b""
        if not self._send(data):
            self.reactor.removeWriter(self)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        """The reactor saw a hang-up or an error (e.g. a refused connect)."""
        self.protocol.fail("hangup")
        self.close()

    # ITransport, the little of it the sessions use

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.pending:
            self.pending += data
        elif self._send(data):
            self.reactor.addWriter(self)

    def loseConnection(self) -> None:  # noqa: N802
        self.close()

    abortConnection = loseConnection  # noqa: N815

    def _send(self, data: bytes) -> bool:
        """Send; keep what did not fit and return whether something is left
        (also while the connect is still under way)."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.protocol.fail(type(error).__name__)
            self.reactor.callLater(0, self.close)
            return False
        if sent < len(data):
            self.pending = data[sent:]
            return True
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.reactor.removeReader(self)
        if self.pending:
            self.reactor.removeWriter(self)
        self.closed = True
        self.sock.close()
        self.protocol.connectionLost(None)


class VirtualClient:
    """One virtual client: one session at a time, the next as soon as one ends."""

    def __init__(self, run: Run, mode: str) -> None:
        self.run = run
        self.session_class = PowSession if mode == "pow" else TrivialSession
        self.address = (run.args.host, run.args.port)
        self.connection: Connection | None = None
        self.began = 0.0
        self.busy = False

    def next_session(self) -> None:
        if not self.run.running:
            self.busy = False
            return
        self.busy = True
        self.began = time.perf_counter()
        self.connection = Connection(self.run.reactor, self.address, self.session_class(self))

    def session_ended(self, error: str | None) -> None:
        self.connection = None
        self.run.record(self.began, error)
        if error is None:
            self.next_session()
        else:
            self.busy = False
            self.run.reactor.callLater(RETRY_DELAY, self.next_session)


class Session(Protocol):
    """One connection of a virtual client; it ends when the connection closes."""

    def __init__(self, client: VirtualClient) -> None:
        self.client = client
        self.error: str | None = None
        self.done = False

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.error is None and not self.done:
            self.error = "closed_early"
        self.client.session_ended(self.error)


class TrivialSession(Session):
    """Read until the server closes; expect C{--expect} bytes."""

    def __init__(self, client: VirtualClient) -> None:
        super().__init__(client)
        self.received = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += len(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        expect = self.client.run.args.expect
        self.done = not expect or self.received == expect
        if not self.done and self.error is None:
            self.error = "short_answer"
        super().connectionLost(reason)


_HEADER = struct.Struct(">BBI")
_CHALLENGE, _QUOTE, _ERROR = (int(MessageType.CHALLENGE), int(MessageType.QUOTE),
                              int(MessageType.ERROR))
_REQUEST = encode(MessageType.CHALLENGE_REQUEST, {})


class PowSession(Session):
    """CHALLENGE_REQUEST, CHALLENGE, solve, SOLUTION, QUOTE, the server closes."""

    def __init__(self, client: VirtualClient) -> None:
        super().__init__(client)
        self.buffer = b""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(_REQUEST)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        buffer = self.buffer + data if self.buffer else data
        while len(buffer) >= 6:
            _, kind, length = _HEADER.unpack_from(buffer)
            end = 6 + length
            if len(buffer) < end:
                break
            body = buffer[6:end]
            buffer = buffer[end:]
            self.frame(kind, body)
        self.buffer = buffer

    def frame(self, kind: int, body: bytes) -> None:
        if self.error is not None or self.done:
            return
        if kind == _CHALLENGE:
            payload = json.loads(body)
            challenge = Challenge.from_json(payload["challenge"])
            nonces, hashes = solve(challenge)
            self.client.run.hashes += hashes
            self.transport.write(encode(MessageType.SOLUTION, {
                "challenge": payload["challenge"], "signature": payload["signature"],
                "nonces": nonces}))
        elif kind == _QUOTE:
            self.done = True  # the server closes after one round (the default)
        elif kind == _ERROR:
            try:
                code = json.loads(body).get("code", "?")
            except ValueError:
                code = "?"
            self.fail(f"error_{code}")
            self.transport.loseConnection()
        else:
            self.fail(f"unexpected_frame_{kind}")
            self.transport.loseConnection()


if __name__ == "__main__":
    sys.exit(main())
