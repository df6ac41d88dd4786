"""
The Redis limiter's protocol and its on_redis_error modes, with a real
RedisLink around a fake client and a fake clock (no Redis, no reactor).
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from appliance.host.config import RedisConfig
from appliance.host.redis import RedisLink
from appliance.resilience import Decision, Quota, Rate, RedisLimiter
from appliance.resilience.ratelimit_lua import GCRA, TOKEN_BUCKET

TIMEOUT = 0.5


class FakeClient:
    """Stands in for txredisapi: replies, fails, or never answers, as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.mode = "ok"
        self.reply: Any = [1, 4, 0, 2_000_000]
        self.known_scripts: set[str] = set()

    def _answer(self, method: str, *args: Any) -> Deferred[Any]:
        self.calls.append((method, args))
        if self.mode == "error":
            return fail(ConnectionError("Lost connection"))
        if self.mode == "hang":
            return Deferred()
        return succeed(self.reply)

    def evalsha(self, sha: str, keys: list[str], args: list[int]) -> Deferred[Any]:
        """EVALSHA: fails like txredisapi when the script is unknown."""
        if self.mode == "ok" and sha not in self.known_scripts:
            self.calls.append(("evalsha", (sha, keys, args)))
            return fail(Exception(f"No script matching hash: {sha} found"))
        return self._answer("evalsha", sha, keys, args)

    def eval(self, source: str, keys: list[str], args: list[int]) -> Deferred[Any]:
        """EVAL: loads the script."""
        if self.mode == "ok":
            self.known_scripts.add(TOKEN_BUCKET.sha if source == TOKEN_BUCKET.source
                                   else GCRA.sha)
        return self._answer("eval", source, keys, args)


def make(mode: str = "local", algorithm: str = "token_bucket"
         ) -> tuple[RedisLimiter, FakeClient, RedisLink, Clock, CollectorRegistry]:
    """A limiter on a RedisLink whose client is fake (burst 5, 1 per second)."""
    clock = Clock()
    link = RedisLink(RedisConfig("127.0.0.1", 1, 0, None, TIMEOUT, True), clock)
    client = FakeClient()
    link._client = client
    link.state = "up"
    registry = CollectorRegistry()
    quota = Quota(algorithm, Rate(1, 1.0), burst=5)  # type: ignore[arg-type]
    limiter = RedisLimiter("api", link, clock, quota, on_redis_error=mode,  # type: ignore[arg-type]
                           retry_interval=2.0, registry=registry)
    return limiter, client, link, clock, registry


def decide(limiter: RedisLimiter, key: str = "client", cost: int = 1) -> Decision:
    """The decision of an acquire that must already have fired."""
    seen: list[Decision] = []
    limiter.acquire(key, cost).addCallback(seen.append)
    assert len(seen) == 1, "acquire did not fire"
    return seen[0]


def sample(registry: CollectorRegistry, name: str) -> float | None:
    """A limiter metric for the limiter "api"."""
    return registry.get_sample_value(name, {"limiter": "api"})


def test_redis_answer_becomes_decision_evalsha_then_eval() -> None:
    """An unknown script is sent with EVAL once, then EVALSHA is used; args are integers."""
    limiter, client, _, _, registry = make()
    decision = decide(limiter)
    assert decision == Decision(allowed=True, remaining=4, retry_after=0.0, reset=2.0,
                                limit=5, window=5.0)
    assert [method for method, _ in client.calls] == ["evalsha", "eval"]
    decide(limiter, cost=2)
    method, (sha, keys, args) = client.calls[-1]
    assert (method, sha) == ("evalsha", TOKEN_BUCKET.sha)
    assert keys == ["appliance:ratelimit:api:tb:client"] and args == [5, 1, 1_000_000, 2]
    assert sample(registry, "appliance_ratelimit_degraded") == 0
    assert not limiter.degraded


def test_gcra_uses_its_own_script_and_keys() -> None:
    """The GCRA limiter runs the GCRA script on its own key space."""
    limiter, client, _, _, _ = make(algorithm="gcra")
    decide(limiter)
    _, (source, keys, _) = client.calls[-1]
    assert source == GCRA.source and keys == ["appliance:ratelimit:api:gcra:client"]


@pytest.mark.parametrize(("mode", "allowed"), [("allow", [True] * 7), ("deny", [False] * 7),
                                               ("local", [True] * 5 + [False] * 2)])
def test_modes_when_redis_fails(mode: str, allowed: list[bool]) -> None:
    """allow admits all, deny none, local enforces the same quota in memory."""
    limiter, client, _, _, registry = make(mode)
    client.mode = "error"
    with capturedLogs() as events:
        decisions = [decide(limiter) for _ in range(7)]
    assert [d.allowed for d in decisions] == allowed
    assert limiter.degraded and sample(registry, "appliance_ratelimit_degraded") == 1
    assert sample(registry, "appliance_ratelimit_redis_errors_total") == 1
    assert len(client.calls) == 1  # degraded: no more waiting for Redis
    warnings = [e for e in events if "unavailable" in e.get("log_format", "")]
    assert len(warnings) == 1
    status = limiter.status()
    assert status["degraded"] is True and status["on_redis_error"] == mode
    assert "Lost connection" in status["last_error"]


def test_hanging_redis_is_bounded_by_the_link_timeout() -> None:
    """A call Redis never answers falls back after the RedisLink timeout."""
    limiter, client, _, clock, _ = make("deny")
    client.mode = "hang"
    seen: list[Decision] = []
    limiter.acquire("client").addCallback(seen.append)
    clock.advance(TIMEOUT - 0.01)
    assert seen == []
    clock.advance(0.01)
    assert seen[0].allowed is False and seen[0].retry_after == 2.0
    assert "timed out" in limiter.last_error


def test_recovery_probes_one_at_a_time_after_retry_interval() -> None:
    """Degraded: fallback at once; after retry_interval one probe; its answer ends it."""
    limiter, client, _, clock, registry = make("local")
    client.mode = "error"
    decide(limiter)
    client.mode = "hang"
    clock.advance(1.9)
    decide(limiter)
    assert len(client.calls) == 1
    clock.advance(0.1)
    seen: list[Decision] = []
    limiter.acquire("client").addCallback(seen.append)  # the probe, pending
    assert len(client.calls) == 2
    decide(limiter)  # meanwhile: fallback, no second probe
    assert len(client.calls) == 2
    clock.advance(TIMEOUT)  # the probe times out: still degraded, retry later
    assert seen and limiter.degraded
    assert sample(registry, "appliance_ratelimit_redis_errors_total") == 2
    client.mode = "ok"
    client.known_scripts.add(TOKEN_BUCKET.sha)
    clock.advance(2.0)
    with capturedLogs() as events:
        decision = decide(limiter)
    assert decision.remaining == 4 and not limiter.degraded
    assert sample(registry, "appliance_ratelimit_degraded") == 0
    assert any("answers again" in e.get("log_format", "") for e in events)


def test_link_down_skips_redis_without_waiting() -> None:
    """When the link's health check says down, Redis is not even tried."""
    limiter, client, link, clock, registry = make("deny")
    link.state = "down"
    assert decide(limiter).allowed is False
    assert client.calls == [] and limiter.degraded
    assert sample(registry, "appliance_ratelimit_redis_errors_total") == 0
    clock.advance(5.0)
    decide(limiter)
    assert client.calls == []  # still down: no probe
    link.state = "up"
    client.known_scripts.add(TOKEN_BUCKET.sha)
    assert decide(limiter).allowed is True and not limiter.degraded


def test_malformed_reply_falls_back() -> None:
    """A reply of the wrong shape is treated as a Redis error, never an exception."""
    limiter, client, _, _, _ = make("allow")
    client.known_scripts.add(TOKEN_BUCKET.sha)
    client.reply = "OK"
    assert decide(limiter).allowed is True and limiter.degraded


def test_cancelled_acquire_is_not_a_redis_error() -> None:
    """A caller cancelling its acquire does not count against Redis."""
    limiter, client, _, clock, registry = make("deny")
    client.mode = "hang"
    d = limiter.acquire("client")
    d.cancel()
    d.addErrback(lambda _: None)
    assert not limiter.degraded
    clock.advance(TIMEOUT)  # the Redis call itself still times out and is counted
    assert sample(registry, "appliance_ratelimit_redis_errors_total") == 1


def test_validation() -> None:
    """Unknown modes and costs beyond the burst are refused."""
    limiter, _, link, clock, _ = make()
    with pytest.raises(ValueError):
        RedisLimiter("x", link, clock, limiter.quota, on_redis_error="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        limiter.acquire("k", cost=6)
