"""
Kubernetes service-account tokens, checked with TokenReview and cached.

A request carries C{Authorization: Bearer <jwt>} (or the configured
header). The token is never kept, logged or sent anywhere but to the API
server: caches are keyed by its SHA-256.

Answers are cached in memory (a L{TTLCache}: bounded, LRU) so that a known
token is answered synchronously: successes for C{cache_ttl}, refusals for
C{negative_ttl}; "unavailable" is never cached. Concurrent requests with
one unknown token share one lookup (the cache's single flight); a lookup
runs to its end (bounded by the timeout) even if every waiting request
went away, so that its answer is cached for the client's retry. With a
L{RedisLink}, answers are also shared through Redis (C{SET key json PX
ttl}, the value holding identity fields only): a memory miss asks Redis
before TokenReview. Redis errors fall back to memory alone for
C{redis_retry} seconds.

TokenReview calls go through a L{CircuitBreaker} and a timeout; an open
breaker, a timeout, a network error or a non-2xx answer make the result
"unavailable" (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Coroutine
from typing import Any, Protocol

from attrs import frozen
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.auth.metrics import AuthMetrics
from appliance.auth.model import (
    INVALID,
    MISSING,
    OK,
    UNAVAILABLE,
    AuthRequest,
    AuthResult,
    Identity,
)
from appliance.auth.tokenreview import Review, ReviewUnavailable
from appliance.host.log_throttle import LogThrottle
from appliance.resilience import CircuitBreaker, TTLCache

MAX_TOKEN = 16 * 1024
"""Header values longer than this are invalid without a TokenReview call."""

DEFAULT_HEADER = b"authorization"
# RFC 6750 b64token: what a JWT (base64url segments and dots) is made of.
_TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_BEARER = b"bearer "
# One round trip for a shared answer and its remaining lifetime.
_GET_WITH_TTL = ("local v = redis.call('GET', KEYS[1]) "
                 "if not v then return {false, -2} end "
                 "return {v, redis.call('PTTL', KEYS[1])}")


class ReviewClient(Protocol):
    """What L{KubernetesAuth} needs of a TokenReview client."""

    url: bytes
    audiences: tuple[str, ...]

    def review(self, token: bytes) -> Deferred[Review]:
        """The verdict on C{token}, or a failure when none could be had."""

    def close(self) -> Deferred[None]:
        """Release connections."""


@frozen
class _Landed:
    """A loaded answer and whether a shared cache (not TokenReview) gave it."""

    result: AuthResult
    hit: bool


class KubernetesAuth:
    """
    Authenticates Kubernetes tokens; see the module docstring.
    """

    name = "kubernetes"
    log = Logger()

    def __init__(
        self,
        client: ReviewClient,
        clock: Any,
        header: bytes = DEFAULT_HEADER,
        timeout: float = 2.0,
        cache_ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_entries: int = 10_000,
        redis: Any = None,
        redis_prefix: str = "appliance:auth:k8s",
        redis_retry: float = 1.0,
        breaker: CircuitBreaker | None = None,
        registry: CollectorRegistry | None = None,
        instance: str = "auth_kubernetes",
    ) -> None:
        """
        @param client: the TokenReview client (L{TokenReviewClient}).
        @param clock: the L{IReactorTime} for TTLs and timeouts.
        @param header: the lower-case header carrying the token; for a
            header other than C{authorization} a bare token is accepted too.
        @param timeout: how long a TokenReview call may take.
        @param cache_ttl: how long a success is reused.
        @param negative_ttl: how long a refusal is reused.
        @param max_entries: most tokens remembered in memory.
        @param redis: a L{RedisLink} to share answers through, or None.
        @param redis_prefix: the key prefix in Redis.
        @param redis_retry: seconds to skip Redis after it failed.
        @param breaker: the breaker around TokenReview (a default one if None).
        @param registry: where the metrics go.
        @param instance: a fixed name for the cache and breaker metrics.
        """
        self.header = header.lower()
        self._bare = self.header != DEFAULT_HEADER
        self.client = client
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._warnings = LogThrottle(self.log, clock)  # an outage fails every request
        self.metrics = AuthMetrics.for_registry(registry)
        self._count = {result: self.metrics.counter(self.name, result)
                       for result in (OK, INVALID, UNAVAILABLE)}
        self._hit = self.metrics.cache_hit
        self._miss = self.metrics.cache_miss
        self._memory: TTLCache[bytes, Any] = TTLCache(
            instance, clock, max_entries, cache_ttl, registry=registry)
        self.breaker = breaker if breaker is not None else CircuitBreaker(
            instance, clock, registry=registry)
        self._redis = redis
        self._redis_retry = redis_retry
        self._redis_skip_until = 0.0
        self._redis_degraded = False
        scope = hashlib.sha256(client.url + b"\n" + "\n".join(client.audiences).encode())
        self._redis_prefix = f"{redis_prefix}:{scope.hexdigest()[:16]}:"
        fail = AuthResult.failed
        self._missing = fail(MISSING, self.name, "no_header")
        self._too_long = fail(INVALID, self.name, "too_long")
        self._bad_scheme = fail(INVALID, self.name, "bad_scheme")
        self._malformed = fail(INVALID, self.name, "malformed")

    # -- the request paths ---------------------------------------------------

    def _token(self, request: AuthRequest) -> bytes | AuthResult:
        """The presented token, or the (uncounted) result that ends here."""
        value = request.headers.get(self.header)
        if value is None:
            return self._missing
        if len(value) > MAX_TOKEN:
            return self._too_long
        if value[:7].lower() == _BEARER:
            return value[7:].strip(b" \t")
        return value.strip(b" \t") if self._bare else self._bad_scheme

    def authenticate_now(self, request: AuthRequest) -> AuthResult | None:
        """
        A missing, malformed or cached token is answered at once; None means
        a lookup (Redis, TokenReview) is needed: call L{authenticate}.
        """
        token = self._token(request)
        if isinstance(token, AuthResult):
            return self._finish_early(token)
        result: AuthResult | None = self._memory.get(hashlib.sha256(token).digest())
        if result is not None:
            self._hit.inc()
            self._count[result.failure or OK].inc()
            return result
        if _TOKEN.fullmatch(token) is None:
            return self._finish_early(self._malformed)
        return None

    def authenticate(self, request: AuthRequest) -> Deferred[AuthResult]:
        """The result, looking the token up if it is not cached in memory."""
        now = self.authenticate_now(request)
        if now is not None:
            return succeed(now)
        token = self._token(request)
        assert isinstance(token, bytes)
        key = hashlib.sha256(token).digest()
        d = self._memory.get_or_load(key, lambda: self._detached(self._load(key, token)))
        return d.addCallbacks(self._deliver, self._broken)

    def _detached(self, work: Coroutine[Any, Any, _Landed]) -> Deferred[_Landed]:
        """
        Run C{work} to its end even if every waiting request goes away: its
        answer is still cached, and a cancelled HTTP call is never counted
        against TokenReview by the breaker. The timeout bounds it.
        """
        outer: Deferred[_Landed] = Deferred()

        def forward(result: _Landed | Failure) -> None:
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)
            elif isinstance(result, Failure):
                self.log.failure("kubernetes token lookup failed unexpectedly", result)

        ensureDeferred(work).addBoth(forward)
        return outer

    def _finish_early(self, result: AuthResult) -> AuthResult:
        if result.failure != MISSING:
            self._count[INVALID].inc()
        return result

    def _deliver(self, landed: _Landed | AuthResult) -> AuthResult:
        if isinstance(landed, AuthResult):  # stored by a load that just ended
            result, hit = landed, True
        else:
            result, hit = landed.result, landed.hit
        (self._hit if hit else self._miss).inc()
        self._count[result.failure or OK].inc()
        return result

    def _broken(self, failure: Failure) -> AuthResult | Failure:
        if failure.check(CancelledError):
            return failure  # the caller cancelled its own request
        self.log.failure("kubernetes authentication failed unexpectedly", failure)
        self._count[UNAVAILABLE].inc()
        return AuthResult.failed(UNAVAILABLE, self.name, "internal_error")

    # -- one lookup (shared by concurrent requests) ------------------------

    async def _load(self, key: bytes, token: bytes) -> _Landed:
        shared = await self._shared_get(key)
        if shared is not None:
            result, ttl = shared
            self._remember(key, result, ttl)
            return _Landed(result, True)
        result = await self._review(token)
        ttl = self._ttl_of(result)
        if ttl > 0:
            await self._shared_put(key, result, ttl)
        self._remember(key, result, ttl)
        return _Landed(result, False)

    def _ttl_of(self, result: AuthResult) -> float:
        if result.ok:
            return self.cache_ttl
        return self.negative_ttl if result.failure == INVALID else 0.0

    def _remember(self, key: bytes, result: AuthResult, ttl: float) -> None:
        # The lifetime depends on the answer: end the cache's own load (its
        # waiters still get the answer, which it then does not store) and
        # store the answer with its own TTL; "unavailable" is not stored.
        self._memory.invalidate(key)
        if ttl > 0:
            self._memory.put(key, result, ttl)

    async def _review(self, token: bytes) -> AuthResult:
        ticket = self.breaker.ticket()
        if ticket is None:
            return AuthResult.failed(UNAVAILABLE, self.name, "breaker_open")
        started = self._clock.seconds()
        d = maybeDeferred(self.client.review, token)
        d.addTimeout(self.timeout, self._clock, onTimeoutCancel=_timed_out)
        try:
            review: Review = await d
        except CancelledError:
            ticket.release()
            raise
        except Exception as error:
            ticket.failure()
            self.metrics.tokenreview_seconds.observe(self._clock.seconds() - started)
            reason = _reason_of(error)
            self._warnings.warn("unavailable", "TokenReview is unavailable: {reason}",
                                reason=reason)
            return AuthResult.failed(UNAVAILABLE, self.name, reason)
        ticket.success()
        self.metrics.tokenreview_seconds.observe(self._clock.seconds() - started)
        if review.identity is None:
            self.log.debug("TokenReview refused a token: {reason}", reason=review.reason)
            return AuthResult.failed(INVALID, self.name, review.reason)
        return AuthResult.success(review.identity)

    # -- the shared cache in Redis -----------------------------------------

    def _redis_usable(self) -> bool:
        redis = self._redis
        if redis is None or getattr(redis, "state", "up") == "down":
            return False
        return self._clock.seconds() >= self._redis_skip_until

    def _redis_failed(self, error: Exception) -> None:
        self._redis_skip_until = self._clock.seconds() + self._redis_retry
        if not self._redis_degraded:
            self._redis_degraded = True
            self.log.warn("auth cache: Redis failed ({error}); using memory only",
                          error=str(error))

    def _redis_worked(self) -> None:
        if self._redis_degraded:
            self._redis_degraded = False
            self.log.info("auth cache: Redis is back")

    async def _shared_get(self, key: bytes) -> tuple[AuthResult, float] | None:
        if not self._redis_usable():
            return None
        try:
            reply = await self._redis.call("eval", _GET_WITH_TTL, [self._redis_key(key)])
        except CancelledError:
            raise
        except Exception as error:
            self._redis_failed(error)
            return None
        self._redis_worked()
        return self._decode(reply)

    async def _shared_put(self, key: bytes, result: AuthResult, ttl: float) -> None:
        if not self._redis_usable():
            return
        value: dict[str, object]
        if result.identity is not None:
            value = {"identity": result.identity.to_json()}
        else:
            value = {"failure": result.failure, "reason": result.reason}
        try:
            await self._redis.call("set", self._redis_key(key),
                                   json.dumps(value, separators=(",", ":")),
                                   pexpire=max(1, int(ttl * 1000)))
        except CancelledError:
            raise
        except Exception as error:
            self._redis_failed(error)
        else:
            self._redis_worked()

    def _redis_key(self, key: bytes) -> str:
        return self._redis_prefix + key.hex()

    def _decode(self, reply: Any) -> tuple[AuthResult, float] | None:
        """A stored answer and its remaining TTL (capped by ours), or None."""
        try:
            value, pttl = reply
            if not value or not isinstance(pttl, int) or pttl <= 0:
                return None
            document = json.loads(value)
            remaining = pttl / 1000.0
            identity = document.get("identity")
            if identity is not None:
                found = Identity(name=str(identity["name"]), method=self.name,
                                 namespace=_text_or_none(identity.get("namespace")),
                                 service_account=_text_or_none(identity.get("service_account")),
                                 attributes={str(k): str(v) for k, v in
                                             identity.get("attributes", {}).items()})
                return AuthResult.success(found), min(remaining, self.cache_ttl)
            if document.get("failure") == INVALID:
                reason = document.get("reason")
                return (AuthResult.failed(INVALID, self.name, str(reason) if reason else None),
                        min(remaining, self.negative_ttl))
        except (TypeError, ValueError, KeyError, AttributeError):
            pass
        self.log.warn("auth cache: ignoring an unreadable entry in Redis")
        return None

    # -- operations ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status}."""
        return {"header": self.header.decode("ascii", "replace"),
                "audiences": list(self.client.audiences),
                "breaker": self.breaker.status(), "cache": self._memory.status(),
                "redis": None if self._redis is None else
                ("degraded" if self._redis_degraded else "shared")}

    def close(self) -> Deferred[None]:
        """Close the TokenReview client's connections."""
        self._warnings.flush()
        return self.client.close()


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _timed_out(result: object, timeout: float) -> object:
    # Called only when the timeout cancelled the call, whatever error the
    # cancelled HTTP request turned into.
    raise ReviewUnavailable("timeout")


def _reason_of(error: Exception) -> str:
    if isinstance(error, ReviewUnavailable):
        return error.reason
    return "network_" + type(error).__name__.lower()
