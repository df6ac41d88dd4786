"""
Where quotes come from: the shipped (or configured) quote file, and an
optional HTTP quote API fetched in the background with treq behind a
circuit breaker and a timeout. Picking a quote is a memory lookup and never
waits for the network; when the API is down the local file serves.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from importlib import resources
from typing import Any

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, Metric
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from appliance.host.metrics import CallbackCollector
from appliance.resilience import CircuitBreaker, CircuitOpen

MAX_QUOTE = 2000
MAX_API_BODY = 256 * 1024


@frozen(cache_hash=True)  # the key of the server's encoded-frame cache
class Quote:
    """One quote and its author."""

    text: str
    author: str

    def to_json(self) -> dict[str, str]:
        """The QUOTE frame payload."""
        return {"quote": self.text, "author": self.author}


def load_quote_file(path: str | None) -> tuple[Quote, ...]:
    """
    Read a JSON-lines file of C{{"quote": ..., "author": ...}} (the shipped
    one when C{path} is None). Raises ValueError naming the bad line.
    """
    if path is None:
        text = resources.files("appliance.pow").joinpath("quotes.jsonl").read_text("utf-8")
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read quote file {path}: {error}") from None
    quotes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        quote = _quote_from(_loads(line))
        if quote is None:
            raise ValueError(f"quote file line {number}: expected "
                             '{"quote": "...", "author": "..."}')
        quotes.append(quote)
    if not quotes:
        raise ValueError("the quote file holds no quote")
    return tuple(quotes)


def parse_api_body(body: bytes) -> list[Quote]:
    """
    Quotes from an API answer: one object or a list of objects with a text
    (C{quote}, C{q}, C{content} or C{text}) and an author (C{author} or C{a}).
    """
    data = _loads(body.decode("utf-8", "replace"))
    items = data if isinstance(data, list) else [data]
    return [quote for quote in (_quote_from(item) for item in items) if quote is not None]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _quote_from(item: Any) -> Quote | None:
    if not isinstance(item, dict):
        return None
    text = next((item[k] for k in ("quote", "q", "content", "text") if k in item), None)
    author = next((item[k] for k in ("author", "a") if k in item), "Unknown")
    if not isinstance(text, str) or not isinstance(author, str) or not text.strip():
        return None
    return Quote(text.strip()[:MAX_QUOTE], author.strip()[:200] or "Unknown")


class QuoteSource:
    """
    Serves quotes from a pool refilled from the API, else from the file.

    Metrics: C{appliance_pow_quotes_served_total{source}} (api, file) and
    C{appliance_pow_quote_api_fetches_total{result}}.
    """

    log = Logger()

    def __init__(self, local: tuple[Quote, ...], registry: CollectorRegistry,
                 clock: Any, api: QuoteAPI | None = None) -> None:
        self.local = local
        self.api = api
        self._clock = clock
        self._pool: deque[tuple[float, Quote]] = deque(maxlen=256)
        # Plain counts read at scrape time: a Counter takes a lock per quote.
        self.served = {"api": 0, "file": 0}
        registry.register(CallbackCollector(self._collect))
        self._fetches = Counter("appliance_pow_quote_api_fetches",
                                "Quote API fetches by result.", ["result"], registry=registry)
        self._refresh: LoopingCall | None = None
        # Which quote comes next needs no secrecy: a seeded generator is enough.
        self._random = random.Random(os.urandom(16))

    def pick(self) -> Quote:
        """A quote now: fresh from the API pool if there is one, else from the file."""
        now = self._clock.seconds()
        pool = self._pool
        while pool:
            fetched_at, quote = pool.popleft()
            if self.api is None or now - fetched_at <= self.api.cache_ttl:
                pool.append((fetched_at, quote))  # reuse: the pool rotates
                self.served["api"] += 1
                return quote
        self.served["file"] += 1
        return self._random.choice(self.local)

    def _collect(self) -> list[Metric]:
        family = CounterMetricFamily("appliance_pow_quotes_served", "Quotes served by source.",
                                     labels=["source"])
        for source, count in self.served.items():
            family.add_metric([source], count)
        return [family]

    def start(self) -> None:
        """Begin refreshing from the API, if one is configured."""
        if self.api is not None:
            self._refresh = LoopingCall(self.refresh)
            self._refresh.clock = self._clock
            self._refresh.start(self.api.refresh_interval, now=True)

    def stop(self) -> None:
        """Stop refreshing."""
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()

    def refresh(self) -> Deferred[None]:
        """Fetch a batch from the API (never raises; failures are counted)."""
        return ensureDeferred(self._refresh_once())

    async def _refresh_once(self) -> None:
        assert self.api is not None
        try:
            quotes = await self.api.fetch()
        except CircuitOpen:
            self._fetches.labels("breaker_open").inc()
            return
        except Exception as error:
            self._fetches.labels("failed").inc()
            self.log.warn("quote API unavailable, serving the quote file: {error}",
                          error=str(error))
            return
        if not quotes:
            self._fetches.labels("empty").inc()
            return
        self._fetches.labels("ok").inc()
        now = self._clock.seconds()
        self._pool.extend((now, quote) for quote in quotes)

    @property
    def api_quotes(self) -> int:
        """Quotes in the API pool (fresh or not)."""
        return len(self._pool)


class QuoteAPI:
    """An HTTP quote API fetched with treq behind a breaker and a timeout."""

    def __init__(self, url: str, timeout: float, cache_ttl: float, refresh_interval: float,
                 breaker: CircuitBreaker, reactor: Any) -> None:
        self.url = url
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.refresh_interval = refresh_interval
        self.breaker = breaker
        self._reactor = reactor

    def fetch(self) -> Deferred[list[Quote]]:
        """GET the URL; parse the quotes; fail on non-2xx, timeouts, oversize."""
        return self.breaker.call(lambda: ensureDeferred(self._get()))

    async def _get(self) -> list[Quote]:
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool

        agent = Agent(self._reactor, pool=HTTPConnectionPool(self._reactor, persistent=False))
        response = await treq.get(self.url, timeout=self.timeout, agent=agent,
                                  headers={"Accept": "application/json"})
        if not 200 <= response.code < 300:
            await response.content()
            raise ValueError(f"quote API answered {response.code}")
        chunks: list[bytes] = []
        received = 0

        def collect(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if received > MAX_API_BODY:
                raise ValueError("quote API answer too large")
            chunks.append(data)

        await treq.collect(response, collect)
        return parse_api_body(b"".join(chunks))
