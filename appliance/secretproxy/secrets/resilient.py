"""
L{ResilientSecrets}: what the proxy talks to, in front of any store.

 - B{hot path}: L{ResilientSecrets.get_now} is a synchronous in-memory
   lookup (a L{TTLCache} hit); only misses go further.
 - B{misses} (L{ResilientSecrets.get}): single flight per secret through
   the cache, then the fetch rate limit (L{MemoryLimiter} keyed by store),
   the L{CircuitBreaker} and a deadline around C{store.fetch}.
 - B{fallback}: when the store is failing (L{StoreUnavailable}, breaker
   open, rate limited, timeout; never for L{SecretNotFound}) and a
   L{FallbackCache} is configured, the last value fetched (in memory, else
   on disk) is served if it was fetched at most C{max_stale} seconds ago,
   and kept in memory for C{fallback_ttl} seconds before the store is tried
   again. Each such load counts in C{appliance_secretproxy_secret_fallback_total}
   and logs a warning naming the secret (never the value).
 - B{rotation}: a fetch returning another version replaces the cached
   value and counts in C{appliance_secretproxy_secret_rotations_total};
   L{ResilientSecrets.refetch} re-fetches after an upstream said the key
   is wrong (concurrent refetches share one fetch).
 - every value fetched is registered with L{remember_secret}, so logs
   mask it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from attrs import evolve
from prometheus_client import CollectorRegistry
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.host.log_throttle import LogThrottle
from appliance.host.redact import remember_secret
from appliance.resilience import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    Deadline,
    DeadlineExceeded,
    MemoryLimiter,
    Quota,
    Rate,
    TTLCache,
)
from appliance.resilience._support import ReactorTime, registry_or_private
from appliance.secretproxy.secrets.base import (
    SecretNotFound,
    SecretStore,
    SecretValue,
    StoreUnavailable,
    check_name,
    hash_version,
)
from appliance.secretproxy.secrets.fallback import FallbackCache
from appliance.secretproxy.secrets.metrics import SecretMetrics


class _FromFallback(Exception):
    """A load answered from the fallback: not cached by the single-flight load."""

    def __init__(self, value: SecretValue) -> None:
        super().__init__("served from the fallback cache")
        self.value = value


class ResilientSecrets:
    """
    Cache, single flight, rate limit, breaker, deadline and fallback in
    front of one L{SecretStore}; see the module docstring.
    """

    log = Logger()

    def __init__(
        self,
        store: SecretStore,
        clock: ReactorTime,
        *,
        ttl: float = 300.0,
        max_entries: int = 1000,
        timeout: float = 2.0,
        fetch_rate: Rate | None = None,
        breaker_policy: BreakerPolicy | None = None,
        fallback: FallbackCache | None = None,
        max_stale: float = 86400.0,
        fallback_ttl: float = 5.0,
        refresh_ahead: float | None = None,
        refetch_interval: float = 1.0,
        health_interval: float = 30.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param store: where secrets come from.
        @param clock: the L{IReactorTime} for TTLs, deadlines and ages.
        @param ttl: seconds a fetched value is served from memory.
        @param max_entries: secrets kept in memory at most.
        @param timeout: seconds a fetch may take.
        @param fetch_rate: store fetches allowed (default 50/s).
        @param breaker_policy: when the breaker opens (default L{BreakerPolicy}).
        @param fallback: the disk fallback, or None for none.
        @param max_stale: oldest fallback value served (seconds since fetched).
        @param fallback_ttl: seconds a fallback value is served from memory
            before the store is tried again.
        @param refresh_ahead: fetch again in the background when a hit finds
            less than this many seconds left (None: off).
        @param refetch_interval: a L{refetch} within this many seconds of
            the last fetch reuses that fetch's value.
        @param health_interval: seconds between C{store.check()} calls once
            L{start}ed (0: none).
        @param registry: where the metrics go.
        """
        self.store = store
        self.ttl = ttl
        self.timeout = timeout
        self.fallback = fallback
        self.max_stale = max_stale
        self.fallback_ttl = fallback_ttl
        self.refetch_interval = refetch_interval
        self.health_interval = health_interval
        self._clock = clock
        self._warnings = LogThrottle(self.log, clock)  # once per secret, not per request
        self._refresh_age = None if refresh_ahead is None else max(0.0, ttl - refresh_ahead)
        registry = registry_or_private(registry)
        label = store.name
        self._cache: TTLCache[str, SecretValue] = TTLCache(
            f"secrets-{label}", clock, max_entries, ttl, registry=registry)
        self.breaker = CircuitBreaker(f"secretstore-{label}", clock, breaker_policy,
                                      registry=registry)
        rate = fetch_rate if fetch_rate is not None else Rate(50, 1.0)
        self.limiter = MemoryLimiter(f"secretstore-{label}", clock,
                                     Quota("token_bucket", rate), registry=registry)
        metrics = SecretMetrics(registry, label)
        self._hit, self._miss, self._stale = metrics.hit, metrics.miss, metrics.stale
        self._fallbacks, self._rotations = metrics.fallbacks, metrics.rotations
        self._fetch_seconds = metrics.fetch_seconds
        self._versions: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._max_versions = max_entries
        self._refetching: dict[str, list[Deferred[SecretValue]]] = {}
        self._refreshing: set[str] = set()
        self._last_answer: float | None = None
        self._last_failure: float | None = None
        self._last_error: str | None = None
        self._health: LoopingCall | None = None

    # -- the proxy's API ---------------------------------------------------

    def get_now(self, name: str) -> SecretValue | None:
        """The value from memory (hot path, synchronous), or None on a miss."""
        value = self._cache.get(name)
        if value is None:
            return None
        if value.from_fallback:
            self._stale.inc()
            return value
        self._hit.inc()
        if (self._refresh_age is not None
                and self._clock.seconds() - value.fetched_at >= self._refresh_age):
            self._refresh(name)
        return value

    def get(self, name: str) -> Deferred[SecretValue]:
        """
        The value: from memory, else fetched (one fetch for concurrent
        misses), else from the fallback while the store fails.

        Fails with L{SecretNotFound} or L{StoreUnavailable} (answer 503).
        """
        value = self.get_now(name)
        if value is not None:
            return succeed(value)
        try:
            check_name(name)
        except SecretNotFound:
            return fail()
        self._miss.inc()
        d = self._cache.get_or_load(name, lambda: ensureDeferred(self._load(name)))
        return d.addErrback(self._fallback_loaded, name)

    def invalidate(self, name: str) -> None:
        """Forget the cached value; the next L{get} fetches."""
        self._cache.invalidate(name)

    def refetch(self, name: str) -> Deferred[SecretValue]:
        """
        Fetch again (an upstream refused the key). Concurrent refetches of
        one secret share one fetch; within C{refetch_interval} of the last
        fetch the current value is reused.
        """
        waiter: Deferred[SecretValue] = Deferred()
        waiters = self._refetching.get(name)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._refetching[name] = [waiter]
        last = self._versions.get(name)
        if last is None or self._clock.seconds() - last[1] >= self.refetch_interval:
            self._cache.invalidate(name)
        self.get(name).addBoth(self._refetched, name)
        return waiter

    def readiness(self) -> tuple[bool, str]:
        """Ready when the store answered last (and recently), or the fallback is usable."""
        now = self._clock.seconds()
        name = self.store.name
        answered = self._last_answer
        recent = 3 * self.health_interval if self.health_interval > 0 else None
        if answered is not None and (self._last_failure is None
                                     or answered >= self._last_failure):
            if recent is None or now - answered <= max(recent, self.ttl):
                return True, f"secret store {name} answered {now - answered:.0f}s ago"
        if self.fallback is not None:
            newest = self.fallback.newest()
            if newest is not None and now - newest <= self.max_stale:
                return True, (f"secret store {name} is failing; the fallback cache is "
                              f"usable (newest entry {now - newest:.0f}s old)")
        if answered is None and self._last_failure is None:
            return False, f"secret store {name} not reached yet"
        return False, f"secret store {name} is failing: {self._last_error}"

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status} (counts and errors, never values)."""
        now = self._clock.seconds()
        ready, reason = self.readiness()
        fallback = None
        if self.fallback is not None:
            newest = self.fallback.newest()
            fallback = {"entries": len(self.fallback.index), "max_stale": self.max_stale,
                        "newest_age": None if newest is None else round(now - newest, 3)}
        return {
            "store": self.store.name, "ready": ready, "reason": reason,
            "last_answer_age": (None if self._last_answer is None
                                else round(now - self._last_answer, 3)),
            "last_error": self._last_error, "breaker": self.breaker.status(),
            "cache": self._cache.status(), "limiter": self.limiter.status(),
            "fallback": fallback,
        }

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Index the fallback folder and start the periodic health check."""
        if self.health_interval > 0 and self._health is None:
            self._health = LoopingCall(self.check)
            self._health.clock = self._clock
            self._health.start(self.health_interval, now=True)
        if self.fallback is None:
            return succeed(None)
        return self.fallback.scan().addCallback(self._scanned)

    def stop(self) -> Deferred[None]:
        """Stop checking, finish fallback writes, close the store's connections."""
        self._warnings.flush()
        if self._health is not None and self._health.running:
            self._health.stop()
        self._health = None
        waiting = self.fallback.wait() if self.fallback is not None else succeed(None)
        return waiting.addCallback(lambda _: self.store.close())

    def check(self) -> Deferred[None]:
        """Ask the store whether it works (never fails; the outcome feeds readiness)."""
        d = Deadline(self._clock, self.timeout).bound(maybeDeferred(self.store.check))

        def failed(failure: Failure) -> None:
            self._failed(_describe(failure, self.store.name, self.timeout))

        return d.addCallbacks(lambda _: self._answered(), failed)

    # -- fetching ----------------------------------------------------------

    async def _load(self, name: str) -> SecretValue:
        try:
            return await self._fetch(name)
        except StoreUnavailable as error:
            if self.fallback is None:
                raise
            raise _FromFallback(await self._from_fallback(name, error)) from None

    async def _fetch(self, name: str) -> SecretValue:
        ticket = self.breaker.ticket()
        if ticket is None:
            retry = self.breaker.retry_after()
            raise StoreUnavailable(f"secret store {self.store.name}: circuit open, retry "
                                   f"after {retry:.1f}s", retry_after=retry)
        decision = self.limiter.try_acquire(self.store.name)
        if not decision.allowed:
            ticket.release()
            raise StoreUnavailable(f"secret store {self.store.name}: fetch rate limit "
                                   f"({self.limiter.quota.rate}) reached",
                                   retry_after=decision.retry_after)
        started = self._clock.seconds()
        try:
            deadline = Deadline(self._clock, self.timeout)
            value = await deadline.bound(maybeDeferred(self.store.fetch, name))
        except SecretNotFound:
            ticket.success()
            self._answered()
            self._forget(name)
            raise
        except CancelledError:
            ticket.release()
            raise
        except Exception:
            ticket.failure()
            failure = Failure()
            error = _describe(failure, self.store.name, self.timeout)
            self._failed(error)
            raise StoreUnavailable(error, getattr(failure.value, "retry_after", None)
                                   ) from None
        finally:
            self._fetch_seconds.observe(self._clock.seconds() - started)
        ticket.success()
        self._answered()
        remember_secret(value.value)
        value = SecretValue(value=value.value,
                            version=value.version or hash_version(value.value),
                            fetched_at=self._clock.seconds())
        self._note_version(name, value)
        if self.fallback is not None:
            self.fallback.write(name, value)
        return value

    async def _from_fallback(self, name: str, error: StoreUnavailable) -> SecretValue:
        assert self.fallback is not None
        now = self._clock.seconds()
        source = "memory"
        value = self._cache.get_stale(name, self.max_stale)
        if value is None or now - value.fetched_at > self.max_stale:
            source = "disk"
            value = await self.fallback.read(name)
        if value is None:
            raise StoreUnavailable(f"{error}; no fallback value for secret {name!r}",
                                   error.retry_after)
        age = now - value.fetched_at
        if age > self.max_stale:
            raise StoreUnavailable(
                f"{error}; the fallback value for secret {name!r} is {age:.0f}s old, "
                f"beyond max_stale ({self.max_stale:.0f}s)", error.retry_after)
        remember_secret(value.value)
        self._fallbacks.inc()
        self._warnings.warn(("fallback", name),
                            "secret store {store} is failing ({error}); serving secret "
                            "{secret} from the fallback cache ({source}, fetched {age:.0f}s "
                            "ago)", store=self.store.name, error=str(error), secret=name,
                            source=source, age=age)
        return evolve(value, from_fallback=True)

    def _fallback_loaded(self, failure: Failure, name: str) -> Any:
        if not failure.check(_FromFallback):
            return failure
        value: SecretValue = failure.value.value  # type: ignore[union-attr]
        left = self.max_stale - (self._clock.seconds() - value.fetched_at)
        if left > 0:
            self._cache.put(name, value, ttl=min(self.fallback_ttl, left))
        self._stale.inc()
        return value

    def _refresh(self, name: str) -> None:
        if name in self._refreshing or self.breaker.state is not BreakerState.CLOSED:
            return
        self._refreshing.add(name)

        def stored(value: SecretValue) -> None:
            self._cache.put(name, value)

        def failed(failure: Failure) -> None:
            self.log.debug("refresh-ahead of secret {secret} failed: {error}",
                          secret=name, error=str(failure.value))

        d = ensureDeferred(self._fetch(name))
        d.addCallbacks(stored, failed)
        d.addBoth(lambda _: self._refreshing.discard(name))

    def _refetched(self, result: Any, name: str) -> None:
        for waiter in self._refetching.pop(name, []):
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    # -- bookkeeping -------------------------------------------------------

    def _note_version(self, name: str, value: SecretValue) -> None:
        old = self._versions.get(name)
        if old is not None and old[0] != value.version:
            self._rotations.inc()
            self.log.info("secret {secret} of store {store} rotated: version {old} -> {new}",
                          secret=name, store=self.store.name, old=old[0], new=value.version)
        self._versions[name] = (value.version, value.fetched_at)
        self._versions.move_to_end(name)
        while len(self._versions) > self._max_versions:
            self._versions.popitem(last=False)

    def _forget(self, name: str) -> None:
        self._cache.invalidate(name)
        self._versions.pop(name, None)
        if self.fallback is not None:
            self.fallback.remove(name)

    def _answered(self) -> None:
        self._last_answer = self._clock.seconds()

    def _failed(self, error: str) -> None:
        self._last_failure = self._clock.seconds()
        self._last_error = error

    def _scanned(self, count: int) -> None:
        if count:
            self.log.info("fallback cache for store {store}: {count} entries on disk",
                          store=self.store.name, count=count)


def _describe(failure: Failure, store: str, timeout: float) -> str:
    if failure.check(DeadlineExceeded):
        return f"secret store {store}: no answer within {timeout:g}s"
    if failure.check(StoreUnavailable):
        return str(failure.value)
    ResilientSecrets.log.failure("secret store {store}: unexpected error", failure=failure,
                                 store=store)
    return f"secret store {store}: unexpected {type(failure.value).__name__}"

