"""
SSRF-safe upstream address selection.

L{EgressPolicy} refuses any address with a category (see
L{appliance.http.addresses.classify}) its upstream did not allow, and the
proxy's own listening addresses (category C{self}).

L{resolve_and_vet} resolves a configured name once, off the reactor
thread, and keeps only the allowed addresses. B{Contract:} the caller dials
one of the returned addresses itself and sends the configured name as SNI
and C{Host}; it never hands the name to anything that resolves it again.
The address that was vetted is therefore the address connected to, and a
DNS answer that changes between check and use (rebinding) cannot matter.

L{EgressResolver} caches vetted answers for a bounded TTL, so the hot path
(L{EgressResolver.vetted_now}) is a dict lookup.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from ipaddress import ip_address
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.http.addresses import (
    CATEGORIES,
    PRIORITY,
    IPAddress,
    as_address,
    classify,
    embedded_ipv4,
)

__all__ = ["CATEGORIES", "classify", "embedded_ipv4", "EgressPolicy", "EgressRefused",
           "EgressResolver", "ResolutionFailed", "resolve_and_vet"]


class EgressRefused(Exception):
    """
    An upstream address the policy does not allow.

    @ivar address: the refused address.
    @ivar category: the most telling refused category (C{self}, then
        C{metadata}, C{loopback}, ...).
    @ivar categories: every refused category.
    """

    def __init__(self, address: IPAddress, categories: frozenset[str]) -> None:
        """@param categories: the refused categories (not empty)."""
        self.address = address
        self.categories = categories
        self.category = next(name for name in PRIORITY if name in categories)
        super().__init__(f"egress to {address} refused: {self.category}")


class ResolutionFailed(Exception):
    """A configured upstream name did not resolve (C{reason}: the resolver's words)."""

    def __init__(self, host: str, reason: str) -> None:
        """@param host: the name looked up."""
        self.host = host
        self.reason = reason
        super().__init__(f"cannot resolve {host}: {reason}")


def _categories(values: Iterable[str]) -> frozenset[str]:
    names = frozenset(values)
    unknown = names - CATEGORIES
    if unknown:
        raise ValueError(f"unknown egress categories: {', '.join(sorted(unknown))}")
    return names


def _own(values: Iterable[Any]) -> frozenset[tuple[IPAddress, int | None]]:
    own: set[tuple[IPAddress, int | None]] = set()
    for value in values:
        ip, port = value if isinstance(value, tuple) else (value, None)
        address = as_address(ip)
        own.add((address, port))
        if address.version == 6 and address.ipv4_mapped is not None:
            own.add((address.ipv4_mapped, port))
    return frozenset(own)


@frozen
class EgressPolicy:
    """
    Which upstream addresses may be dialled.

    An address is allowed when every one of its categories is in C{allow}
    (so the metadata address, C{link_local} and C{metadata}, needs both).
    Ordinary public addresses have no category and are always allowed.

    @ivar allow: categories to permit, from L{CATEGORIES}; internal and
        test upstreams on loopback need C{loopback}.
    @ivar own_addresses: the proxy's own listening addresses, each an
        address (any port) or an C{(address, port)} pair; dialling one is
        category C{self}. Expand wildcard listeners (0.0.0.0, ::) into the
        host's interface addresses.
    """

    allow: frozenset[str] = field(default=frozenset(), converter=_categories)
    own_addresses: frozenset[tuple[IPAddress, int | None]] = field(
        default=frozenset(), converter=_own)

    def categories(self, ip: IPAddress | str, port: int | None = None) -> frozenset[str]:
        """L{classify}, plus C{self} for one of our own listening addresses."""
        address = as_address(ip)
        found = classify(address)
        if self.own_addresses and self._is_own(address, port):
            found = found | {"self"}
        return found

    def refused(self, ip: IPAddress | str, port: int | None = None) -> frozenset[str]:
        """The categories of C{ip} that C{allow} does not permit (empty: allowed)."""
        return self.categories(ip, port) - self.allow

    def check(self, ip: IPAddress | str, port: int | None = None) -> None:
        """
        Return if C{ip} (at C{port}, when known) may be dialled.

        @raise EgressRefused: otherwise.
        """
        address = as_address(ip)
        refused = self.refused(address, port)
        if refused:
            raise EgressRefused(address, refused)

    def _is_own(self, address: IPAddress, port: int | None) -> bool:
        forms = (address, *embedded_ipv4(address))
        for own, own_port in self.own_addresses:
            if own in forms and (own_port is None or port is None or own_port == port):
                return True
        return False


GetAddrInfo = Callable[..., list[tuple[Any, ...]]]
log = Logger()


def resolve_and_vet(reactor: Any, host: str, port: int, policy: EgressPolicy,
                    getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> Deferred[list[IPAddress]]:
    """
    Resolve C{host} once and keep the addresses C{policy} allows, in order.

    An IP literal (brackets allowed) is vetted without DNS. A name is
    resolved with C{getaddrinfo} in the reactor's thread pool, never on
    the reactor thread. When a name resolves to allowed and refused
    addresses, the refused ones are dropped (and logged) and the rest
    returned: an attacker who can add a record gains nothing, and a
    dual-homed service keeps working. Dial only the returned addresses and
    send C{host} as SNI/C{Host} yourself (see the module docstring).

    @param reactor: an C{IReactorThreads} provider.
    @return: a Deferred firing with the allowed addresses, or failing with
        L{EgressRefused} (none allowed; the first refused one is reported)
        or L{ResolutionFailed}.
    """
    try:
        literal: IPAddress | None = as_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        try:
            policy.check(literal, port)
        except EgressRefused as refused:
            return fail(refused)
        return succeed([literal])
    if not host:
        return fail(ResolutionFailed(host, "empty name"))
    lookup: Deferred[list[tuple[Any, ...]]] = deferToThreadPool(
        reactor, reactor.getThreadPool(), getaddrinfo, host, port,
        socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    return lookup.addCallbacks(_vet, _lookup_failed, callbackArgs=(host, port, policy),
                               errbackArgs=(host,))


def _lookup_failed(failure: Failure, host: str) -> Failure:
    if failure.check(OSError, UnicodeError):
        return Failure(ResolutionFailed(host, str(failure.value)))
    return failure


def _vet(infos: list[tuple[Any, ...]], host: str, port: int, policy: EgressPolicy
         ) -> list[IPAddress]:
    allowed: list[IPAddress] = []
    refused: list[EgressRefused] = []
    seen: set[IPAddress] = set()
    for info in infos:
        address = ip_address(info[4][0])
        if address in seen:
            continue
        seen.add(address)
        categories = policy.refused(address, port)
        if categories:
            refused.append(EgressRefused(address, categories))
        else:
            allowed.append(address)
    if not allowed:
        if refused:
            raise refused[0]
        raise ResolutionFailed(host, "no addresses")
    if refused:
        log.warn("{host} resolved to refused addresses {refused}; using {allowed}",
                 host=host, refused=[f"{r.address} ({r.category})" for r in refused],
                 allowed=[str(address) for address in allowed])
    return allowed


DEFAULT_TTL = 30.0
_REFRESH_AT = 0.75


class _Entry:
    __slots__ = ("addresses", "error", "expires", "refresh_at")

    def __init__(self, addresses: tuple[IPAddress, ...], error: Exception | None,
                 expires: float, refresh_at: float) -> None:
        self.addresses = addresses
        self.error = error
        self.expires = expires
        self.refresh_at = refresh_at


class EgressResolver:
    """
    L{resolve_and_vet} with a small cache, for one L{EgressPolicy}.

    C{getaddrinfo} reports no TTL, so every answer is kept C{ttl} seconds,
    clamped to C{[min_ttl, max_ttl]}; refusals and lookup failures are kept
    C{negative_ttl} seconds (0: not at all). Concurrent lookups of one
    C{(host, port)} share one C{getaddrinfo} call. Once three quarters of
    an answer's life has passed, L{vetted_now} starts a refresh in the
    background and keeps answering from the cache, so steady traffic never
    waits for DNS; a failed refresh keeps the old answer until it expires.
    """

    log = Logger()

    def __init__(self, reactor: Any, policy: EgressPolicy, *, ttl: float = DEFAULT_TTL,
                 min_ttl: float = 1.0, max_ttl: float = 300.0, negative_ttl: float = 1.0,
                 max_entries: int = 1024, getaddrinfo: GetAddrInfo = socket.getaddrinfo
                 ) -> None:
        """
        @param reactor: an C{IReactorThreads} and C{IReactorTime} provider.
        @param max_entries: most C{(host, port)} answers kept; the oldest go.
        """
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        if negative_ttl < 0 or max_entries < 1:
            raise ValueError("need negative_ttl >= 0 and max_entries >= 1")
        self.policy = policy
        self.ttl = min(max(ttl, min_ttl), max_ttl)
        self.negative_ttl = min(negative_ttl, max_ttl)
        self.max_entries = max_entries
        self._reactor = reactor
        self._getaddrinfo = getaddrinfo
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._loading: dict[tuple[str, int], list[Deferred[list[IPAddress]]]] = {}

    def vetted_now(self, host: str, port: int) -> list[IPAddress] | None:
        """
        The cached allowed addresses of C{host}, or C{None} when there is no
        fresh answer (then call L{resolve}). Synchronous, for the hot path.
        """
        key = (host, port)
        entry = self._entries.get(key)
        if entry is None or entry.error is not None:
            return None
        now = self._reactor.seconds()
        if now >= entry.expires:
            return None
        if now >= entry.refresh_at and key not in self._loading:
            self._start(key, self._loading.setdefault(key, []))
        return list(entry.addresses)

    def resolve(self, host: str, port: int) -> Deferred[list[IPAddress]]:
        """
        The allowed addresses of C{host}, from the cache or a fresh lookup.

        @return: a Deferred failing like L{resolve_and_vet}'s; cancelling
            it does not disturb other callers waiting for the same lookup.
        """
        key = (host, port)
        entry = self._entries.get(key)
        if entry is not None and self._reactor.seconds() < entry.expires:
            if entry.error is not None:
                return fail(entry.error)
            return succeed(list(entry.addresses))
        waiters = self._loading.get(key)
        fresh = waiters is None
        if waiters is None:
            waiters = self._loading[key] = []
        waiter: Deferred[list[IPAddress]] = Deferred(
            lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(waiter)
        if fresh:
            self._start(key, waiters)  # may land at once (an IP literal)
        return waiter

    def forget(self, host: str, port: int) -> None:
        """Drop the cached answer for C{(host, port)} (a lookup in flight still lands)."""
        self._entries.pop((host, port), None)

    def clear(self) -> None:
        """Drop every cached answer."""
        self._entries.clear()

    def __len__(self) -> int:
        """Cached answers, expired ones included."""
        return len(self._entries)

    def _start(self, key: tuple[str, int], waiters: list[Deferred[list[IPAddress]]]) -> None:
        resolve_and_vet(self._reactor, key[0], key[1], self.policy, self._getaddrinfo
                        ).addBoth(self._landed, key, waiters)

    def _landed(self, result: list[IPAddress] | Failure, key: tuple[str, int],
                waiters: list[Deferred[list[IPAddress]]]) -> None:
        if self._loading.get(key) is waiters:
            del self._loading[key]
        now = self._reactor.seconds()
        if not isinstance(result, Failure):
            self._store(key, _Entry(tuple(result), None, now + self.ttl,
                                    now + self.ttl * _REFRESH_AT))
            for waiter in waiters[:]:
                if not waiter.called:
                    waiter.callback(list(result))
            return
        if result.check(EgressRefused, ResolutionFailed):
            old = self._entries.get(key)
            if old is not None and old.error is None and now < old.expires:
                self.log.warn("refresh of {host}:{port} failed ({error}); keeping the "
                              "cached answer", host=key[0], port=key[1], error=result.value)
            elif self.negative_ttl > 0:
                error = result.value
                assert isinstance(error, Exception)
                expires = now + self.negative_ttl
                self._store(key, _Entry((), error, expires, expires))
        elif not waiters:
            self.log.failure("egress lookup of {host}:{port} failed", result,
                             host=key[0], port=key[1])
        for waiter in waiters[:]:
            if not waiter.called:
                waiter.errback(result)

    def _store(self, key: tuple[str, int], entry: _Entry) -> None:
        entries = self._entries
        entries.pop(key, None)
        if len(entries) >= self.max_entries:
            now = self._reactor.seconds()
            for stale in [k for k, e in entries.items() if e.expires <= now]:
                del entries[stale]
            while len(entries) >= self.max_entries:
                del entries[next(iter(entries))]
        entries[key] = entry
