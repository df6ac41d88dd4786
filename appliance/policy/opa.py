"""
A client of OPA's REST Data API that fails closed.

C{POST {url}/v1/data/{path}} with C{{"input": <document>}}; OPA answers
C{{"result": true|false}}, C{{"result": {"allow": bool, "reason": str}}}, or
C{{}} when the document is undefined (deny). Every question is bounded by a
timeout and goes through a L{CircuitBreaker}; answers are kept in a bounded
L{TTLCache} keyed by the input document's canonical JSON, and concurrent
identical questions share one request. Whatever goes wrong (timeout,
refused connection, non-2xx, malformed JSON, open circuit) the answer is
L{UNAVAILABLE}: a denial, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from appliance.policy.config import OPAConfig
from appliance.policy.model import UNAVAILABLE, PolicyDecision, PolicyInput
from appliance.policy.opa_wire import (
    Answer,
    BytesProducer,
    OPAError,
    canonical_json,
    parse_answer,
    read_body,
)
from appliance.resilience import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Deadline,
    TTLCache,
)

__all__ = ["OPAClient", "OPAError", "canonical_json", "parse_answer"]

MAX_PERSISTENT_CONNECTIONS = 16
"""Idle keep-alive connections kept to OPA."""


def _cancelled(error: BaseException) -> bool:
    reasons = getattr(error, "reasons", None) or ()
    return any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


class OPAClient:
    """
    Asks OPA, caches its answers, and fails closed; see the module docstring.

    Readiness: L{healthy} is False while the breaker is open or the last
    question or probe failed. L{readiness} starts a background probe
    (C{GET /health}, through the breaker) when the last outcome is older
    than C{probe_interval} or was a failure, so a service that stopped
    getting traffic because it was not ready still notices OPA's return.
    """

    log = Logger()

    def __init__(
        self,
        config: OPAConfig,
        clock: Any,
        reactor: Any,
        name: str = "policy",
        registry: CollectorRegistry | None = None,
        breaker_policy: BreakerPolicy | None = None,
        http: Any = None,
        probe_interval: float = 5.0,
    ) -> None:
        """
        @param config: URL, document path, timeout, token, cache settings.
        @param clock: the L{IReactorTime} for timeouts, the breaker and the cache.
        @param reactor: the reactor connections are made with.
        @param name: names the breaker and cache (metric labels).
        @param registry: where the breaker and cache metrics go.
        @param breaker_policy: when to stop asking (default L{BreakerPolicy}()).
        @param http: a treq C{HTTPClient}-like object (tests); by default one
            over a persistent L{HTTPConnectionPool}.
        @param probe_interval: how old the last outcome may be before
            L{readiness} probes again, in seconds.
        """
        self.config = config
        self.name = name
        self.probe_interval = probe_interval
        self._clock = clock
        self._data_url = config.data_url
        self._health_url = config.health_url
        self._header_items: list[tuple[str, str]] = [("Content-Type", "application/json"),
                                                     ("Accept", "application/json")]
        if config.token is not None:
            self._header_items.append(("Authorization", f"Bearer {config.token.reveal()}"))
        self._pool: Any = None
        if http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = MAX_PERSISTENT_CONNECTIONS
            agent: Any = Agent(reactor, pool=self._pool)
            producer: Any = BytesProducer
            http = HTTPClient(agent, data_to_body_producer=producer)
        self._http = http
        self.breaker = CircuitBreaker(name, clock, breaker_policy, registry=registry)
        self.cache: TTLCache[str, Answer] = TTLCache(
            name, clock, config.cache_size, config.cache_ttl, registry=registry)
        self._last_ok: bool | None = None
        self._last_at: float | None = None
        self._last_error: str | None = None
        self._probe: Deferred[Any] | None = None
        self._probe_waiters: list[Deferred[bool]] = []

    # -- decisions ---------------------------------------------------------

    def lookup(self, input: PolicyInput) -> PolicyDecision | None:
        """OPA's cached answer for C{input} (source C{"cache"}), or None; no I/O."""
        return self._peek(canonical_json(input))

    def ask(self, input: PolicyInput) -> Deferred[PolicyDecision]:
        """
        OPA's decision for C{input}: cached, or asked (one request for any
        number of concurrent identical questions). Never fails, except with
        L{CancelledError} when the caller cancels.
        """
        key = canonical_json(input)
        cached = self._peek(key)
        if cached is not None:
            return succeed(cached)
        d = self.cache.get_or_load(key, lambda: self._load(key, input))
        return d.addCallbacks(_fresh, self._unavailable)

    def _peek(self, key: str) -> PolicyDecision | None:
        # get() would count a miss, and ask() goes on to get_or_load, which
        # counts it again. get_stale() counts hits only; with a max_stale
        # just below zero it serves exactly what get() would (an entry is
        # expired once now >= its expiry time).
        if self.config.cache_ttl <= 0:
            return None
        answer = self.cache.get_stale(key, -1e-9)
        return None if answer is None else answer.cached

    def _load(self, key: str, input: PolicyInput) -> Deferred[Answer]:
        body = b'{"input":' + key.encode("utf-8") + b"}"
        d = self.breaker.call(self._bounded, lambda: self._post(body, input))
        return d.addCallbacks(self._succeeded, self._failed)

    def _bounded(self, start: Callable[[], Coroutine[Any, Any, Any]]) -> Deferred[Any]:
        return Deadline(self._clock, self.config.timeout).bound(ensureDeferred(start()))

    async def _post(self, body: bytes, input: PolicyInput) -> Answer:
        response = await self._send("POST", self._data_url, body)
        if not 200 <= response.code < 300:
            await read_body(response)
            raise OPAError(f"OPA answered HTTP {response.code}")
        return parse_answer(await read_body(response), input)

    async def _send(self, method: str, url: str, body: bytes | None = None) -> IResponse:
        from twisted.web._newclient import (
            RequestNotSent,
            RequestTransmissionFailed,
            ResponseNeverReceived,
        )

        for attempt in (1, 2):
            try:
                response: IResponse = await self._http.request(
                    method, url, data=body,
                    headers=Headers({k: [v] for k, v in self._header_items}),
                    allow_redirects=False, unbuffered=True)
                return response
            except (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived) as error:
                if _cancelled(error):
                    raise CancelledError() from None
                if attempt == 2:
                    raise
                # A kept-alive connection OPA had closed. The Data API
                # query has no side effect, so it is safe to ask again on a
                # new connection (Twisted retries only idempotent methods).
        raise AssertionError("unreachable")

    def _unavailable(self, failure: Failure) -> PolicyDecision | Failure:
        if failure.check(CancelledError):
            return failure
        return UNAVAILABLE

    # -- health ------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether the last outcome was a success and the breaker is not open."""
        return self._last_ok is True and self.breaker.state is not BreakerState.OPEN

    def check(self) -> Deferred[bool]:
        """
        Probe C{GET /health} through the breaker (fails fast while it is
        open); fires with the new L{healthy}. Concurrent calls share a probe.
        """
        waiter: Deferred[bool] = Deferred()
        self._probe_waiters.append(waiter)
        if self._probe is None:
            self._probe = self.breaker.call(self._bounded, self._get_health)
            # (A breaker that fails fast runs this chain at once.)
            self._probe.addCallbacks(self._succeeded, self._failed).addBoth(self._probed)
        return waiter

    async def _get_health(self) -> None:
        response = await self._send("GET", self._health_url)
        await read_body(response)
        if response.code != 200:
            raise OPAError(f"OPA's /health answered HTTP {response.code}")

    def _probed(self, result: Any) -> None:
        self._probe = None
        waiters, self._probe_waiters = self._probe_waiters, []
        healthy = self.healthy
        for waiter in waiters:
            waiter.callback(healthy)

    def readiness(self) -> tuple[bool, str]:
        """
        (ready, reason); starts a background probe when the last outcome
        is stale or a failure (see the class docstring).
        """
        if self._probe is None and (
                self._last_ok is not True or self._last_at is None
                or self._clock.seconds() - self._last_at >= self.probe_interval):
            self.check()
        if self.breaker.state is BreakerState.OPEN:
            return False, "policy engine unreachable (circuit open)"
        if self._last_ok is None:
            return False, "policy engine not checked yet"
        if not self._last_ok:
            return False, "policy engine unreachable"
        return True, ""

    def _succeeded(self, result: Any) -> Any:
        if self._last_ok is False:
            self.log.info("policy {name}: OPA at {url} answers again",
                          name=self.name, url=self.config.url)
        self._last_ok, self._last_at, self._last_error = True, self._clock.seconds(), None
        return result

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(CancelledError, CircuitOpen):
            return failure
        error = failure.type.__name__ if failure.type else "error"
        if failure.check(OPAError):
            error = failure.getErrorMessage()
        if self._last_ok is not False:
            self.log.warn("policy {name}: OPA at {url} failed ({error}); denying until it "
                          "answers", name=self.name, url=self.config.url, error=error)
        self._last_ok, self._last_at, self._last_error = False, self._clock.seconds(), error
        return failure

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status}."""
        return {"url": self.config.url, "path": self.config.path,
                "healthy": self.healthy, "last_error": self._last_error,
                "breaker": self.breaker.status(), "cache": self.cache.status()}

    def close(self) -> Deferred[None]:
        """Stop a probe in flight and close the idle keep-alive connections."""
        if self._probe is not None:
            self._probe.cancel()
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


def _fresh(answer: Answer) -> PolicyDecision:
    return answer.fresh
