"""
A blocking pow client: connect (optionally over TLS), ask for a challenge,
solve it on every CPU core (processes, not threads), submit, read the quote.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from attrs import frozen

from appliance.pow.challenge import Challenge, puzzle_prefix
from appliance.pow.frames import FrameDecoder, MessageType, ProtocolError, encode
from appliance.pow.solver import search

EXPLANATIONS = {
    "bad_frame": "the server could not parse our message (protocol mismatch?)",
    "too_large": "our message was larger than the server accepts",
    "unknown_type": "the server does not know our message type (protocol mismatch?)",
    "bad_signature": "the server did not recognise the challenge (altered, or its keys "
                     "changed)",
    "expired": "the challenge expired before we submitted; try again or use more --workers",
    "wrong_address": "the challenge was issued to another address (did a NAT or proxy change "
                     "our address between connections?)",
    "insufficient_work": "the server rejected our nonces as too little work",
    "replayed": "this solution was already redeemed",
    "rate_limited": "too many challenges from this address; slow down",
    "busy": "the server is at capacity; try again later",
    "timeout": "we were too slow for one of the server's deadlines",
}


class ServerError(Exception):
    """The server answered with an ERROR frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {EXPLANATIONS.get(code, message)}")
        self.code = code
        self.server_message = message


@frozen
class Result:
    """One quote and what it cost."""

    quote: str
    author: str
    difficulty: int
    puzzles: int
    hashes: int
    solve_seconds: float


class Connection:
    """One TCP (or TLS) connection speaking the pow framing."""

    def __init__(self, host: str, port: int, timeout: float,
                 tls: ssl.SSLContext | None = None, server_name: str | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_name or host)
        self._sock = sock
        self._decoder = FrameDecoder(max_frame=1024 * 1024)
        self._frames: list[Any] = []

    def send(self, message_type: MessageType, payload: dict[str, Any]) -> None:
        """Write one frame."""
        self._sock.sendall(encode(message_type, payload))

    def receive(self) -> Any:
        """Read one frame; raise ServerError for an ERROR frame, EOFError on close."""
        while not self._frames:
            data = self._sock.recv(65536)
            if not data:
                raise EOFError("the server closed the connection")
            try:
                self._frames.extend(self._decoder.feed(data))
            except ProtocolError as error:
                raise ServerError("bad_frame", f"unreadable answer: {error.message}") from None
        frame = self._frames.pop(0)
        if frame.type == MessageType.ERROR:
            payload = frame.payload
            raise ServerError(str(payload.get("code", "?")), str(payload.get("message", "")))
        return frame

    def close(self) -> None:
        """Close the socket."""
        try:
            self._sock.close()
        except OSError:
            pass


# -- parallel solving --------------------------------------------------------

_stop: Any = None
_progress: Any = None


def _init_worker(stop: Any, progress: Any) -> None:
    global _stop, _progress
    _stop, _progress = stop, progress


def _work(task: tuple[bytes, int, int, int]) -> tuple[int | None, int]:
    prefix, difficulty, start, stride = task

    def should_stop() -> bool:
        with _progress.get_lock():
            _progress.value += 65536
        return bool(_stop.is_set())

    nonce, tried = search(prefix, difficulty, range(start, 1 << 48, stride), should_stop)
    if nonce is not None:
        _stop.set()
    return nonce, tried


class Solver:
    """A pool of worker processes, one per core by default."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._progress = context.Value("Q", 0)
        self._pool = context.Pool(self.workers, initializer=_init_worker,
                                  initargs=(self._stop, self._progress))

    def solve(self, challenge: Challenge,
              on_progress: Callable[[int, float], None] | None = None) -> tuple[list[int], int]:
        """Nonces for every sub-puzzle and the total hashes tried."""
        nonces, total = [], 0
        started = time.monotonic()
        for index in range(challenge.puzzles):
            self._stop.clear()
            with self._progress.get_lock():
                self._progress.value = 0
            prefix = puzzle_prefix(challenge, index)
            tasks = [(prefix, challenge.difficulty, k, self.workers) for k in range(self.workers)]
            pending = self._pool.map_async(_work, tasks)
            while not pending.ready():
                pending.wait(0.5)
                if on_progress is not None:
                    on_progress(total + self._progress.value, time.monotonic() - started)
            results = pending.get()
            found = [nonce for nonce, _ in results if nonce is not None]
            total += sum(tried for _, tried in results)
            nonces.append(min(found))
        return nonces, total

    def close(self) -> None:
        """Stop the workers."""
        self._pool.terminate()
        self._pool.join()


def fetch_quote(connection: Connection, solver: Solver,
                on_progress: Callable[[int, float], None] | None = None) -> Result:
    """One full round on an open connection."""
    connection.send(MessageType.CHALLENGE_REQUEST, {})
    frame = connection.receive()
    if frame.type != MessageType.CHALLENGE:
        raise ServerError("bad_frame", f"expected a challenge, got {frame.type.name}")
    challenge = Challenge.from_json(frame.payload.get("challenge"))
    started = time.monotonic()
    nonces, hashes = solver.solve(challenge, on_progress)
    elapsed = time.monotonic() - started
    connection.send(MessageType.SOLUTION, {"challenge": frame.payload["challenge"],
                                           "signature": frame.payload.get("signature"),
                                           "nonces": nonces})
    answer = connection.receive()
    if answer.type != MessageType.QUOTE:
        raise ServerError("bad_frame", f"expected a quote, got {answer.type.name}")
    return Result(quote=str(answer.payload.get("quote", "")),
                  author=str(answer.payload.get("author", "")),
                  difficulty=challenge.difficulty, puzzles=challenge.puzzles,
                  hashes=hashes, solve_seconds=elapsed)
