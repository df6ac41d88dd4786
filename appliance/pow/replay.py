"""
Replay protection: a solved challenge is served once.

Claiming is atomic: the memory set checks and inserts in one synchronous
call (nothing else runs on the reactor in between); Redis does it with one
C{SET key 1 NX PX ttl}, so several appliances behind a load balancer share it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger


class ReplaySetFull(Exception):
    """The memory set is full of unexpired entries; refuse rather than forget one."""


class MemoryReplaySet:
    """
    Spent challenges until they expire, at most C{capacity} of them.

    Entries are never evicted before they expire (that would re-open a
    replay); when the set is full of live entries, L{claim} raises
    L{ReplaySetFull} and the server answers C{busy}.
    """

    def __init__(self, capacity: int, clock: Any) -> None:
        self.capacity = capacity
        self._clock = clock
        self._spent: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._spent)

    def claim(self, key: str, expires_at: float) -> bool:
        """True the first time C{key} is claimed before it expires."""
        now = self._clock.seconds()
        self._expire(now)
        if key in self._spent:
            return False
        if len(self._spent) >= self.capacity:
            raise ReplaySetFull(f"replay set holds {self.capacity} live entries")
        # Insertion order is expiry order only roughly (lifetimes may differ
        # after a reload); _expire stops at the first live entry, which can
        # only keep an entry longer, never drop one early.
        self._spent[key] = max(expires_at, now)
        return True

    def claim_async(self, key: str, expires_at: float) -> Deferred[bool]:
        """L{claim} as a Deferred (the interface the Redis set shares)."""
        try:
            return succeed(self.claim(key, expires_at))
        except ReplaySetFull as error:
            d: Deferred[bool] = Deferred()
            d.errback(error)
            return d

    def _expire(self, now: float) -> None:
        spent = self._spent
        while spent:
            key, expires = next(iter(spent.items()))
            if expires > now:
                break
            del spent[key]


class RedisReplaySet:
    """
    Spent challenges in Redis (C{SET NX PX}); on a Redis failure either
    fall back to a local set (C{local}) or refuse (C{deny}).
    """

    log = Logger()

    def __init__(self, redis: Any, clock: Any, fallback: MemoryReplaySet,
                 on_redis_error: str = "local", prefix: str = "appliance:pow:spent:") -> None:
        self._redis = redis
        self._clock = clock
        self._fallback = fallback
        self.on_redis_error = on_redis_error
        self._prefix = prefix
        self.degraded = False

    def claim_async(self, key: str, expires_at: float) -> Deferred[bool]:
        """True the first time C{key} is claimed, across every appliance sharing Redis."""
        ttl_ms = max(1, int((expires_at - self._clock.seconds()) * 1000))
        d = self._redis.call("set", self._prefix + key, "1", pexpire=ttl_ms,
                             only_if_not_exists=True)

        def answered(reply: Any) -> bool:
            if self.degraded:
                self.degraded = False
                self.log.info("pow replay set: redis answers again")
            return reply == "OK"

        def failed(failure: Any) -> Any:
            if not self.degraded:
                self.degraded = True
                self.log.warn("pow replay set: redis failed ({error}); falling back to {mode}",
                              error=failure.getErrorMessage(), mode=self.on_redis_error)
            if self.on_redis_error == "deny":
                raise ReplaySetFull("redis unavailable and on_redis_error = deny")
            return self._fallback.claim(key, expires_at)

        d.addCallbacks(answered, failed)
        return d
