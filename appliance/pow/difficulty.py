"""
Adaptive difficulty: rises with load and with one client's pressure, falls
back when they drop, always within configured bounds.

Load is the larger of (active connections / max connections) and (challenge
rate / target rate). In the rate, each client group counts for at most
C{per_client_cap} challenges per window, so a flood from a few clients raises
their own difficulty steeply but can lift everyone else's by a bounded
amount only: the controller cannot be turned into a denial of service.

Clients are grouped by network prefix (IPv4 /32 or /24, IPv6 /64 or /48) so
rotating addresses within a prefix does not escape the accounting.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque

from attrs import frozen


@frozen
class DifficultyPolicy:
    """The controller's parameters."""

    base: int
    minimum: int
    maximum: int
    window: float
    target_rate: float
    max_connections: int
    client_threshold: int
    client_extra_max: int
    per_client_cap: int
    prefix_v4: int = 32
    prefix_v6: int = 64
    max_tracked_clients: int = 100_000


def client_group(address: str, prefix_v4: int = 32, prefix_v6: int = 64) -> str:
    """The network a client address is accounted under, e.g. C{10.1.2.0/24}."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = prefix_v4 if ip.version == 4 else prefix_v6
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


BUCKETS = 10
"""Slices of the window: each client's count is kept per slice, so memory per
client is bounded whatever its rate, and a slice expires as a whole (the
window covers between 90% and 100% of its length)."""


class _Client:
    """One client group's challenge count in the window, by slice."""

    __slots__ = ("slices", "total")

    def __init__(self) -> None:
        self.slices: deque[list[int]] = deque()  # [slice index, count], oldest first
        self.total = 0


class DifficultyController:
    """
    Tracks challenge requests per client group over a sliding window and
    answers the difficulty for the next challenge of a given client.
    """

    def __init__(self, policy: DifficultyPolicy, clock: object) -> None:
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._counted = 0  # capped requests in the window, over all clients
        self._last_sweep = float("-inf")
        self.active_connections = 0
        self.policy = policy

    def group(self, address: str) -> str:
        """The client group of an address under this policy (memoised: it is
        asked several times per session, and parsing an address is costly)."""
        cache = self._groups
        group = cache.get(address)
        if group is None:
            if len(cache) >= 65_536:
                cache.clear()
            group = cache[address] = client_group(address, self.policy.prefix_v4,
                                                  self.policy.prefix_v6)
        return group

    @property
    def policy(self) -> DifficultyPolicy:
        """The parameters in force."""
        return self._policy

    @policy.setter
    def policy(self, policy: DifficultyPolicy) -> None:
        self._policy = policy
        self._groups: dict[str, str] = {}  # prefixes may have changed
        width = policy.window / BUCKETS
        if getattr(self, "_width", width) != width:
            self._clients.clear()  # counts by the old slices mean nothing now
            self._counted = 0
        self._width = width

    def issue(self, address: str) -> int:
        """The difficulty for a challenge to C{address} now, and count it."""
        policy = self._policy
        now = self._clock.seconds()  # type: ignore[attr-defined]
        load = self._load(policy, now)  # first: its sweep may drop empty clients
        client = self._client(self.group(address), now, create=True)
        assert client is not None
        difficulty = self._difficulty(policy, load, client.total)
        self._count(client, now)
        return difficulty

    def record(self, address: str) -> str:
        """Count a challenge request; return the client group."""
        self.issue(address)
        return self.group(address)

    def difficulty_for(self, address: str) -> int:
        """The difficulty to issue to C{address} now."""
        now = self._clock.seconds()  # type: ignore[attr-defined]
        load = self._load(self._policy, now)
        client = self._client(self.group(address), now, create=False)
        return self._difficulty(self._policy, load, 0 if client is None else client.total)

    def global_difficulty(self) -> int:
        """The difficulty a quiet client gets now (the exported gauge)."""
        policy = self.policy
        return max(policy.minimum, min(policy.maximum, policy.base + _bits(self.load())))

    def load(self) -> float:
        """The load factor; 1.0 is the configured capacity."""
        return self._load(self._policy, self._clock.seconds())  # type: ignore[attr-defined]

    @property
    def tracked_clients(self) -> int:
        """How many client groups are in the window."""
        return len(self._clients)

    # -- internals ---------------------------------------------------------

    def _difficulty(self, policy: DifficultyPolicy, load: float, client_rate: int) -> int:
        extra = _bits(load) if load > 1.0 else 0
        if client_rate > policy.client_threshold:
            extra += min(_bits(client_rate / max(1, policy.client_threshold)),
                         policy.client_extra_max)
        return max(policy.minimum, min(policy.maximum, policy.base + extra))

    def _load(self, policy: DifficultyPolicy, now: float) -> float:
        if now - self._last_sweep >= 1.0:
            self._sweep(now)
        rate = self._counted / policy.window
        return max(self.active_connections / max(1, policy.max_connections),
                   rate / max(policy.target_rate, 1e-9))

    def _client(self, group: str, now: float, create: bool) -> _Client | None:
        clients = self._clients
        client = clients.get(group)
        if client is None:
            if not create:
                return None
            client = clients[group] = _Client()
            if len(clients) > self._policy.max_tracked_clients:
                _, evicted = clients.popitem(last=False)
                self._counted -= min(evicted.total, self._policy.per_client_cap)
            return client
        clients.move_to_end(group)
        slices = client.slices
        if slices and slices[0][0] <= now // self._width - BUCKETS:
            self._expire(client, now)
        return client

    def _count(self, client: _Client, now: float) -> None:
        index = now // self._width
        slices = client.slices
        if slices and slices[-1][0] == index:
            slices[-1][1] += 1
        else:
            slices.append([index, 1])
        client.total += 1
        if client.total <= self._policy.per_client_cap:
            self._counted += 1

    def _expire(self, client: _Client, now: float) -> None:
        horizon = now // self._width - BUCKETS
        slices = client.slices
        cap = self._policy.per_client_cap
        before = min(client.total, cap)
        while slices and slices[0][0] <= horizon:
            client.total -= slices.popleft()[1]
        self._counted -= before - min(client.total, cap)

    def _sweep(self, now: float) -> None:
        # A full sweep at most once a second keeps this O(1) per request;
        # between sweeps the count may include a few stale entries (errs high).
        self._last_sweep = now
        clients = self._clients
        for group in list(clients):
            client = clients[group]
            self._expire(client, now)
            if not client.total:
                del clients[group]


def _bits(factor: float) -> int:
    """Extra leading-zero bits for a load factor: one per doubling above 1."""
    if factor <= 1.0:
        return 0
    return int(math.floor(math.log2(factor))) + 1
