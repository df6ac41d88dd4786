"""
A TTL + LRU cache with single-flight loading and stale reads.

Entries expire C{ttl} seconds after they were put, but stay in memory
(subject to LRU eviction) so that L{TTLCache.get_stale} can still serve them
while a backend is down. Memory is bounded by C{max_entries} and, with a
C{sizeof} callable, by C{max_size}.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure

from appliance.host.metrics import lock_free
from appliance.resilience._support import ReactorTime, metric, registry_or_private

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING: Any = object()


class _Entry:
    __slots__ = ("expires", "size", "value")

    def __init__(self, value: Any, expires: float, size: int) -> None:
        self.value = value
        self.expires = expires
        self.size = size


class _Load:
    __slots__ = ("deferred", "discard", "waiters")

    def __init__(self) -> None:
        self.waiters: list[Deferred[Any]] = []
        self.deferred: Deferred[Any] | None = None
        self.discard = False


class TTLCache(Generic[K, V]):
    """
    A bounded cache of values that expire; see the module docstring.

    Metrics (label C{cache}): C{appliance_cache_hits_total},
    C{appliance_cache_misses_total}, C{appliance_cache_stale_hits_total},
    C{appliance_cache_evictions_total} (entries pushed out by the bounds)
    and the gauge C{appliance_cache_entries}.
    """

    def __init__(
        self,
        name: str,
        clock: ReactorTime,
        max_entries: int,
        ttl: float,
        max_size: int | None = None,
        sizeof: Callable[[V], int] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param name: a fixed name, used as the metric label.
        @param clock: the L{IReactorTime} expiry is measured on.
        @param max_entries: most entries kept (at least 1).
        @param ttl: default lifetime of an entry, in seconds.
        @param max_size: most total C{sizeof} kept; needs C{sizeof}.
        @param sizeof: the size of a value (bytes, say).
        @param registry: where the metrics go (None: not exported).
        """
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_size is not None and sizeof is None:
            raise ValueError("max_size needs a sizeof callable")
        self.name = name
        self.max_entries = max_entries
        self.ttl = ttl
        self.max_size = max_size
        self._sizeof = sizeof
        self._clock = clock
        self._entries: OrderedDict[K, _Entry] = OrderedDict()
        self._loading: dict[K, _Load] = {}
        self._size = 0
        registry = registry_or_private(registry)

        def counter(what: str, text: str) -> Any:
            # Bumped on the reactor thread only, on every lookup: no lock.
            return lock_free(metric(Counter, registry, f"appliance_cache_{what}_total", text,
                                    ("cache",)).labels(name))

        self._hits = counter("hits", "Cache lookups answered with a fresh value.")
        self._misses = counter("misses", "Cache lookups without a fresh value.")
        self._stale_hits = counter("stale_hits", "Expired values served by get_stale.")
        self._evictions = counter("evictions", "Entries pushed out by the size bounds.")
        self._entries_gauge = metric(Gauge, registry, "appliance_cache_entries",
                                     "Entries in the cache.", ("cache",)).labels(name)

    def __len__(self) -> int:
        """Entries held, expired ones included."""
        return len(self._entries)

    @property
    def size(self) -> int:
        """Total C{sizeof} of the held values (0 without C{sizeof})."""
        return self._size

    def get(self, key: K, default: Any = None) -> Any:
        """The fresh value for C{key}, or C{default}."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= self._clock.seconds():
            self._misses.inc()
            return default
        self._entries.move_to_end(key)
        self._hits.inc()
        return entry.value

    def get_stale(self, key: K, max_stale: float, default: Any = None) -> Any:
        """
        The value for C{key} if it is fresh, or expired for at most
        C{max_stale} seconds; else C{default}. For fallbacks while the
        backend that feeds the cache is down.
        """
        entry = self._entries.get(key)
        if entry is None:
            return default
        now = self._clock.seconds()
        if now - entry.expires > max_stale:
            return default
        self._entries.move_to_end(key)
        (self._hits if entry.expires > now else self._stale_hits).inc()
        return entry.value

    def put(self, key: K, value: V, ttl: float | None = None) -> bool:
        """
        Store C{value} for C{ttl} seconds (default: the cache's C{ttl}).
        Returns False, and drops any older entry, if the value alone is
        larger than C{max_size}.
        """
        size = self._sizeof(value) if self._sizeof is not None else 0
        self._drop(key)
        if self.max_size is not None and size > self.max_size:
            self._entries_gauge.set(len(self._entries))
            return False
        expires = self._clock.seconds() + (self.ttl if ttl is None else ttl)
        self._entries[key] = _Entry(value, expires, size)
        self._size += size
        while len(self._entries) > self.max_entries or (
                self.max_size is not None and self._size > self.max_size):
            _, evicted = self._entries.popitem(last=False)
            self._size -= evicted.size
            self._evictions.inc()
        self._entries_gauge.set(len(self._entries))
        return True

    def invalidate(self, key: K) -> bool:
        """
        Forget C{key}; a load in flight for it still answers its waiters but
        is not stored. Returns whether an entry was dropped.
        """
        load = self._loading.pop(key, None)
        if load is not None:
            load.discard = True
        dropped = self._drop(key)
        self._entries_gauge.set(len(self._entries))
        return dropped

    def clear(self) -> None:
        """Forget every entry (loads in flight are not stored)."""
        for load in self._loading.values():
            load.discard = True
        self._loading.clear()
        self._entries.clear()
        self._size = 0
        self._entries_gauge.set(0)

    def purge(self, max_stale: float = 0.0) -> int:
        """Drop entries expired for more than C{max_stale} seconds; return how many."""
        limit = self._clock.seconds() - max_stale
        old = [key for key, entry in self._entries.items() if entry.expires < limit]
        for key in old:
            self._drop(key)
        self._entries_gauge.set(len(self._entries))
        return len(old)

    def get_or_load(
        self,
        key: K,
        loader: Callable[[], V | Deferred[V]],
        ttl: float | None = None,
        stale_if_error: float | None = None,
    ) -> Deferred[V]:
        """
        The fresh value for C{key}, or the result of C{loader()}, stored.

        Concurrent misses for one key share one C{loader()} call. A failure
        reaches every waiter and is not cached, unless C{stale_if_error} is
        given and a value expired for at most that many seconds exists: then
        the waiters get that value. Cancelling one waiter does not disturb
        the others; when the last one leaves, the load is cancelled.
        """
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return succeed(value)
        load = self._loading.get(key)
        fresh = load is None
        if load is None:
            load = self._loading[key] = _Load()
        waiter: Deferred[V] = Deferred(lambda w: self._abandon(key, load, w))
        load.waiters.append(waiter)
        if fresh:
            load.deferred = maybeDeferred(loader)
            load.deferred.addBoth(self._loaded, key, load, ttl, stale_if_error)
        return waiter

    def status(self) -> dict[str, Any]:
        """JSON-ready numbers for C{/status}."""
        return {"entries": len(self._entries), "max_entries": self.max_entries,
                "size": self._size, "max_size": self.max_size,
                "loading": len(self._loading)}

    def _drop(self, key: K) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._size -= entry.size
        return True

    def _loaded(self, result: Any, key: K, load: _Load, ttl: float | None,
                stale_if_error: float | None) -> None:
        if self._loading.get(key) is load:
            del self._loading[key]
        waiters, load.waiters = load.waiters, []
        if isinstance(result, Failure):
            if stale_if_error is not None and waiters:
                stale = self.get_stale(key, stale_if_error, _MISSING)
                if stale is not _MISSING:
                    result = stale
        elif not load.discard:
            self.put(key, result, ttl)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _abandon(self, key: K, load: _Load, waiter: Deferred[Any]) -> None:
        if waiter in load.waiters:
            load.waiters.remove(waiter)
        if not load.waiters and load.deferred is not None and not load.deferred.called:
            load.deferred.cancel()
