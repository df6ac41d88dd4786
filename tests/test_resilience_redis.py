"""
The Redis rate limiters against a real redis-server: exact shared limits
across two "appliances" (two connections), script cache loss, key expiry,
and Redis going away and coming back under each on_redis_error mode.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from appliance.host.config import RedisConfig
from appliance.resilience import Decision, Quota, Rate, RedisLimiter
from tests.harness.redis import RedisServer

TIMEOUT = 0.5
ALGORITHMS = ("token_bucket", "gcra")


async def wait_until(reactor: Any, predicate: Callable[[], bool], seconds: float,
                     step: float = 0.05) -> None:
    """Poll ``predicate`` on the reactor until true; fail after ``seconds``."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {seconds}s")
        await deferLater(reactor, step, lambda: None)


async def start_link(reactor: Any, port: int) -> Any:
    """A started RedisLink (one "appliance") that has seen Redis up."""
    from appliance.host.redis import RedisLink

    link = RedisLink(RedisConfig("127.0.0.1", port, 0, None, TIMEOUT, True), reactor)
    link.startService()
    await wait_until(reactor, lambda: link.up, 5.0)
    return link


async def stop_links(*links: Any) -> None:
    """Stop the links, waiting for their connections to close."""
    for link in links:
        d = link.stopService()
        if d is not None:
            await d


def unique(prefix: str) -> str:
    """A limiter name no other test (or earlier run) has used."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest_twisted.ensureDeferred
async def test_two_appliances_admit_exactly_the_burst(reactor: Any, redis_server: RedisServer,
                                                      algorithm: str) -> None:
    """200 concurrent acquires from two connections against a bucket of 50: exactly 50 pass."""
    links = [await start_link(reactor, redis_server.port) for _ in range(2)]
    try:
        name = unique("exact")
        quota = Quota(algorithm, Rate(1, 3600.0), burst=50)  # type: ignore[arg-type]
        limiters = [RedisLimiter(name, link, reactor, quota, on_redis_error="allow")
                    for link in links]
        pending = [limiters[n % 2].acquire("shared-key") for n in range(200)]
        decisions: list[Decision] = await gatherResults(pending)
        allowed = [d for d in decisions if d.allowed]
        assert len(allowed) == 50
        # every admitted request saw a distinct bucket level: the steps were atomic
        assert sorted(d.remaining for d in allowed) == list(range(50))
        assert all(d.retry_after > 3500 for d in decisions if not d.allowed)
        assert not any(limiter.degraded for limiter in limiters)
    finally:
        await stop_links(*links)


@pytest_twisted.ensureDeferred
async def test_idle_buckets_expire_and_script_cache_loss(reactor: Any,
                                                         redis_server: RedisServer) -> None:
    """Keys carry a TTL until full again; a flushed script cache is refilled via EVAL."""
    link = await start_link(reactor, redis_server.port)
    try:
        name = unique("ttl")
        for algorithm in ALGORITHMS:
            limiter = RedisLimiter(name + algorithm, link, reactor,
                                   Quota(algorithm, Rate(10, 1.0), burst=2))  # type: ignore[arg-type]
            assert (await limiter.acquire("idle")).allowed
            kind = "tb" if algorithm == "token_bucket" else "gcra"
            key = f"appliance:ratelimit:{name}{algorithm}:{kind}:idle"
            ttl = await link.call("execute_command", "PTTL", key)
            assert 0 < ttl <= 100
            await link.call("execute_command", "SCRIPT", "FLUSH")
            decision = await limiter.acquire("idle")
            assert decision.allowed and decision.remaining == 0 and not limiter.degraded
            await deferLater(reactor, 0.25, lambda: None)
            assert await link.call("execute_command", "EXISTS", key) == 0
    finally:
        await stop_links(link)


@pytest_twisted.ensureDeferred
async def test_redis_down_then_back(reactor: Any) -> None:
    """Killed Redis: allow/deny/local decide within the timeout; back: shared buckets again."""
    server = RedisServer()
    links: list[Any] = []
    try:
        links = [await start_link(reactor, server.port) for _ in range(2)]
        registry = CollectorRegistry()
        quota = Quota("token_bucket", Rate(1, 3600.0), burst=3)
        name = unique("outage")
        limiters = {mode: RedisLimiter(f"{name}-{mode}", links[0], reactor, quota,
                                       on_redis_error=mode, retry_interval=0.5,
                                       registry=registry)
                    for mode in ("allow", "deny", "local")}

        def degraded(mode: str) -> float | None:
            return registry.get_sample_value("appliance_ratelimit_degraded",
                                             {"limiter": f"{name}-{mode}"})

        for limiter in limiters.values():
            decision = await limiter.acquire("k")
            assert decision.allowed and decision.remaining == 2

        server.kill()
        expected = {"allow": [True] * 4, "deny": [False] * 4,
                    "local": [True, True, True, False]}
        for mode, limiter in limiters.items():
            seen = []
            for _ in range(4):
                started = reactor.seconds()
                seen.append((await limiter.acquire("k")).allowed)
                assert reactor.seconds() - started < TIMEOUT + 0.3
            assert seen == expected[mode], mode
            assert limiter.degraded and degraded(mode) == 1
        errors = [registry.get_sample_value("appliance_ratelimit_redis_errors_total",
                                            {"limiter": f"{name}-{mode}"}) for mode in limiters]
        assert sum(e or 0 for e in errors) >= 1  # later ones may skip a link already "down"

        server.start()

        async def recovered() -> bool:
            for limiter in limiters.values():
                if limiter.degraded:
                    await limiter.acquire("probe")
            return not any(limiter.degraded for limiter in limiters.values())

        deadline = reactor.seconds() + 15.0
        while not await recovered():
            assert reactor.seconds() < deadline, "limiters did not return to Redis"
            await deferLater(reactor, 0.2, lambda: None)
        assert all(degraded(mode) == 0 for mode in limiters)

        # Redis restarted empty: nothing queued during the outage ran late, and
        # both appliances share the bucket again.
        first = await limiters["deny"].acquire("k")
        assert first.allowed and first.remaining == 2
        other = RedisLimiter(f"{name}-deny", links[1], reactor, quota, on_redis_error="deny")
        await wait_until(reactor, lambda: links[1].up, 15.0)
        second = await other.acquire("k")
        assert second.allowed and second.remaining == 1 and not other.degraded
    finally:
        try:
            await stop_links(*links)
        finally:
            server.close()
