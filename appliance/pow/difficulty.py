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


class DifficultyController:
    """
    Tracks challenge requests per client group over a sliding window and
    answers the difficulty for the next challenge of a given client.
    """

    def __init__(self, policy: DifficultyPolicy, clock: object) -> None:
        self._policy = policy
        self._clock = clock
        self._clients: OrderedDict[str, deque[float]] = OrderedDict()
        self._counted = 0  # capped requests in the window, over all clients
        self._last_sweep = float("-inf")
        self._groups: dict[str, str] = {}
        self.active_connections = 0

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
        self._groups = {}  # prefixes may have changed

    def record(self, address: str) -> str:
        """Count a challenge request; return the client group."""
        group = self.group(address)
        now = self._clock.seconds()  # type: ignore[attr-defined]
        times = self._clients.get(group)
        if times is None:
            times = self._clients[group] = deque()
            if len(self._clients) > self.policy.max_tracked_clients:
                _, evicted = self._clients.popitem(last=False)
                self._counted -= min(len(evicted), self.policy.per_client_cap)
        else:
            self._clients.move_to_end(group)
        self._expire(times, now)
        before = min(len(times), self.policy.per_client_cap)
        times.append(now)
        self._counted += min(len(times), self.policy.per_client_cap) - before
        return group

    def difficulty_for(self, address: str) -> int:
        """The difficulty to issue to C{address} now."""
        policy = self.policy
        group = self.group(address)
        now = self._clock.seconds()  # type: ignore[attr-defined]
        times = self._clients.get(group)
        client_rate = 0
        if times is not None:
            self._expire(times, now)
            client_rate = len(times)
        extra_global = _bits(self.load())
        extra_client = min(_bits(client_rate / max(1, policy.client_threshold)),
                           policy.client_extra_max)
        return max(policy.minimum, min(policy.maximum,
                                       policy.base + extra_global + extra_client))

    def global_difficulty(self) -> int:
        """The difficulty a quiet client gets now (the exported gauge)."""
        policy = self.policy
        return max(policy.minimum, min(policy.maximum, policy.base + _bits(self.load())))

    def load(self) -> float:
        """The load factor; 1.0 is the configured capacity."""
        self._expire_all()
        policy = self.policy
        rate = self._counted / policy.window
        return max(self.active_connections / max(1, policy.max_connections),
                   rate / max(policy.target_rate, 1e-9))

    def _expire(self, times: deque[float], now: float) -> None:
        horizon = now - self.policy.window
        cap = self.policy.per_client_cap
        while times and times[0] <= horizon:
            before = min(len(times), cap)
            times.popleft()
            self._counted -= before - min(len(times), cap)

    def _expire_all(self) -> None:
        # A full sweep at most once a second keeps this O(1) per request;
        # between sweeps the count may include a few stale entries (errs high).
        now = self._clock.seconds()  # type: ignore[attr-defined]
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for group in list(self._clients):
            times = self._clients[group]
            self._expire(times, now)
            if not times:
                del self._clients[group]

    @property
    def tracked_clients(self) -> int:
        """How many client groups are in the window."""
        return len(self._clients)


def _bits(factor: float) -> int:
    """Extra leading-zero bits for a load factor: one per doubling above 1."""
    if factor <= 1.0:
        return 0
    return int(math.floor(math.log2(factor))) + 1
