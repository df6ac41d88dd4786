"""
TokenReview answers shared through a real Redis by two appliances (two
links, two KubernetesAuth instances), and the fallback to memory alone when
Redis is down.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent

from appliance.auth import INVALID, KubernetesAuth
from appliance.host.config import RedisConfig
from tests.harness.ports import free_port
from tests.harness.redis import RedisServer
from tests.tokenreview_server import (
    TokenReviewServer,
    bearer,
    kubernetes_auth,
    tokenreview,  # noqa: F401 - fixture
)

REDIS_TIMEOUT = 0.3


async def wait_until(reactor: Any, predicate: Callable[[], bool], seconds: float) -> None:
    """Poll C{predicate} on the reactor until true; fail after C{seconds}."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        assert reactor.seconds() < deadline, f"condition not met within {seconds}s"
        await deferLater(reactor, 0.02, lambda: None)


def link_to(reactor: Any, port: int) -> Any:
    """A started RedisLink (one appliance's shared connection)."""
    from appliance.host.redis import RedisLink

    link = RedisLink(RedisConfig("127.0.0.1", port, 0, None, REDIS_TIMEOUT, True), reactor)
    link.startService()
    return link


async def close(*things: Any) -> None:
    """Stop links and close authenticators."""
    for thing in things:
        d = thing.close() if isinstance(thing, KubernetesAuth) else thing.stopService()
        if d is not None:
            await d


@pytest_twisted.ensureDeferred
async def test_two_appliances_share_answers(reactor: Any, redis_server: RedisServer,
                                            tokenreview: TokenReviewServer,  # noqa: F811
                                            tmp_path: Path) -> None:
    """A token reviewed by one appliance is known to the other without a second review."""
    links = [link_to(reactor, redis_server.port) for _ in range(2)]
    first, second = (kubernetes_auth(tokenreview, tmp_path / name, redis=link)
                     for name, link in zip(("a", "b"), links, strict=True))
    try:
        await wait_until(reactor, lambda: all(link.up for link in links), 5.0)
        token = tokenreview.add_token("payments", "checkout")
        mine = await first.authenticate(bearer(token))
        theirs = await second.authenticate(bearer(token))
        assert mine.ok and theirs.ok and tokenreview.reviews == 1
        assert theirs.identity == mine.identity
        assert dict(theirs.identity.attributes) == dict(mine.identity.attributes)  # type: ignore[union-attr]
        assert second.authenticate_now(bearer(token)) is theirs  # now in its memory too

        bad = "eyJhbGciOi.unknown.to-both"
        assert (await first.authenticate(bearer(bad))).failure == INVALID
        shared_refusal = await second.authenticate(bearer(bad))
        assert shared_refusal.failure == INVALID and tokenreview.reviews == 2

        keys = await links[0].call("keys", "appliance:auth:k8s:*")
        mine_keys = [key for key in keys if key.startswith(second._redis_prefix)]
        assert len(mine_keys) == 2
        for key in mine_keys:
            value = await links[0].call("get", key)
            assert token not in key + value and bad not in key + value
            document = json.loads(value)
            assert set(document) <= {"identity", "failure", "reason"}
            ttl = await links[0].call("execute_command", "PTTL", key)
            limit = 60_000 if "identity" in document else 5_000
            assert 0 < ttl <= limit
    finally:
        await close(first, second, *links)


@pytest_twisted.ensureDeferred
async def test_redis_down_falls_back_to_memory(reactor: Any,
                                               tokenreview: TokenReviewServer,  # noqa: F811
                                               tmp_path: Path) -> None:
    """With Redis unreachable, TokenReview and the memory cache still answer; a warning says so."""
    link = link_to(reactor, free_port())  # nothing listens there
    method = kubernetes_auth(tokenreview, tmp_path, redis=link, redis_retry=30.0)
    try:
        with capturedLogs() as events:
            token = tokenreview.add_token()
            started = reactor.seconds()
            assert (await method.authenticate(bearer(token))).ok
            assert reactor.seconds() - started < REDIS_TIMEOUT + 1.0
            assert method.authenticate_now(bearer(token)) is not None  # memory
            other = tokenreview.add_token()
            started = reactor.seconds()
            assert (await method.authenticate(bearer(other))).ok
            assert reactor.seconds() - started < REDIS_TIMEOUT  # Redis skipped now
        assert tokenreview.reviews == 2
        texts = [formatEvent(event) for event in events]
        assert any("using memory only" in text for text in texts)
        assert method.status()["redis"] == "degraded"
    finally:
        await close(method, link)
