"""
The pow server's decisions, apart from any socket: admission, issuing a
challenge, and redeeming a solution for a quote.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from appliance.host.metrics import CallbackCollector, FastHistogram
from appliance.pow.challenge import Challenge, ChallengeSigner, offer_json, work_is_done
from appliance.pow.config import PowConfig
from appliance.pow.difficulty import DifficultyController
from appliance.pow.frames import ErrorCode, ProtocolError
from appliance.pow.quotes import Quote, QuoteSource
from appliance.pow.replay import MemoryReplaySet, ReplaySetFull

_SOLUTION_FIELDS = frozenset({"challenge", "signature", "nonces"})
VERIFY_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                  0.0025, 0.01)


class PowMetrics:
    """The pow service's counters and histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Per-session counts are plain ints read at scrape time (a Counter locks).
        self.issued = 0
        self.accepted = 0
        registry.register(CallbackCollector(self._collect))
        self.rejected = Counter("appliance_pow_rejections", "Requests refused, by reason.",
                                ["reason"], registry=registry)
        self.verify_seconds = FastHistogram("appliance_pow_verification_seconds",
                                            "Time to verify one solution.", (),
                                            buckets=VERIFY_BUCKETS, registry=registry)
        for code in ErrorCode.ALL:
            self.rejected.labels(code)

    def _collect(self) -> list[Metric]:
        return [CounterMetricFamily("appliance_pow_challenges_issued", "Challenges issued.",
                                    value=self.issued),
                CounterMetricFamily("appliance_pow_solutions_accepted",
                                    "Solutions accepted (a quote was served).",
                                    value=self.accepted)]


class PowEngine:
    """
    Holds the signer, the difficulty controller, the limiter, the replay
    set and the quotes; every method either answers or raises
    L{ProtocolError} with the code to send.
    """

    log = Logger()

    def __init__(self, config: PowConfig, clock: Any, controller: DifficultyController,
                 limiter: Any, replay: Any, quotes: QuoteSource, metrics: PowMetrics) -> None:
        self.config = config
        self.signer = ChallengeSigner(config.key_bytes(), config.current_key)
        self._clock = clock
        self.controller = controller
        self.limiter = limiter
        self.replay = replay
        self.quotes = quotes
        self.metrics = metrics
        self._per_group: dict[str, int] = {}
        self.connections = 0

    # -- connections -------------------------------------------------------

    def admit(self, address: str) -> str | None:
        """Count a new connection, or return the group to refuse it (busy)."""
        group = self.controller.group(address)
        if (self.connections >= self.config.max_connections
                or self._per_group.get(group, 0) >= self.config.max_connections_per_client):
            self.metrics.rejected.labels(ErrorCode.BUSY).inc()
            return None
        self.connections += 1
        self.controller.active_connections = self.connections
        self._per_group[group] = self._per_group.get(group, 0) + 1
        return group

    def release(self, group: str) -> None:
        """Forget a closed connection."""
        self.connections -= 1
        self.controller.active_connections = self.connections
        remaining = self._per_group.get(group, 1) - 1
        if remaining:
            self._per_group[group] = remaining
        else:
            self._per_group.pop(group, None)

    # -- challenges --------------------------------------------------------

    def challenge(self, address: str) -> str | Deferred[str]:
        """A signed challenge for C{address} (the CHALLENGE payload as JSON
        text), unless it is rate limited."""
        group = self.controller.group(address)
        admit = getattr(self.limiter, "admit", None)
        if admit is not None:  # in memory: answer without a Deferred or a Decision
            refused = admit(group)
            return self.issue(address) if refused is None else self._admitted(refused, address)
        return self.limiter.acquire(group).addCallback(self._admitted, address)

    def _admitted(self, decision: Any, address: str) -> str:
        if not decision.allowed:
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"too many challenges; retry in {decision.retry_after:.1f}s")
        return self.issue(address)

    def issue(self, address: str) -> str:
        """Sign a challenge at the difficulty this client warrants now: the
        CHALLENGE payload as JSON text."""
        config = self.config
        difficulty = self.controller.issue(address)
        per_puzzle = max(0, difficulty - config.puzzle_difficulty_offset)
        challenge, signature = self.signer.issue(
            address, per_puzzle, now_ms=int(self._clock.seconds() * 1000),
            lifetime_ms=int(config.challenge_lifetime * 1000), puzzles=config.puzzles)
        self.metrics.issued += 1
        return offer_json(challenge, signature)

    # -- solutions ---------------------------------------------------------

    def redeem(self, address: str, payload: dict[str, Any]) -> Quote | Deferred[Quote]:
        """Check a solution and, if it is good and new, return a quote."""
        started = time.perf_counter()
        try:
            challenge = self.verify(address, payload)
        finally:
            self.metrics.verify_seconds.observe((), time.perf_counter() - started)
        claim = getattr(self.replay, "claim", None)
        if claim is not None:  # in memory: atomic and synchronous
            try:
                return self._claimed(claim(payload["signature"], challenge.expires_at / 1000))
            except ReplaySetFull:
                return self._claimed(None)
        d = self.replay.claim_async(payload["signature"], challenge.expires_at / 1000)
        d.addCallbacks(self._claimed, self._replay_unavailable)
        return d

    def verify(self, address: str, payload: dict[str, Any]) -> Challenge:
        """Signature, binding, expiry and work, in that order (cheapest first after the MAC)."""
        if payload.keys() != _SOLUTION_FIELDS:
            raise ProtocolError(ErrorCode.BAD_FRAME,
                                "a solution has exactly challenge, signature and nonces")
        challenge = Challenge.from_json(payload["challenge"])
        canonical = challenge.canonical()
        if not self.signer.authentic(challenge, payload["signature"], canonical):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, "the challenge was not issued here")
        if challenge.address != address:
            raise ProtocolError(ErrorCode.WRONG_ADDRESS,
                                "the challenge was issued to another address")
        if self._clock.seconds() * 1000 > challenge.expires_at:
            raise ProtocolError(ErrorCode.EXPIRED, "the challenge has expired")
        if not work_is_done(challenge, payload["nonces"], canonical):
            raise ProtocolError(ErrorCode.INSUFFICIENT_WORK,
                                "the nonces do not meet the difficulty")
        return challenge

    def _claimed(self, fresh: bool | None) -> Quote:
        if fresh is None:
            raise ProtocolError(ErrorCode.BUSY, "the replay set is full; try later")
        if not fresh:
            raise ProtocolError(ErrorCode.REPLAYED, "this solution was already redeemed")
        self.metrics.accepted += 1
        return self.quotes.pick()

    def _replay_unavailable(self, failure: Any) -> Quote:
        failure.trap(ReplaySetFull)
        raise ProtocolError(ErrorCode.BUSY, "cannot record spent challenges now; try later")


def memory_replay(config: PowConfig, clock: Any) -> MemoryReplaySet:
    """The in-memory replay set sized by the config."""
    return MemoryReplaySet(config.replay_capacity, clock)
