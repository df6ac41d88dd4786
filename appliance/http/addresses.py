"""
What an IP address is, for egress decisions; sans-IO.

L{classify} names what an IP address is (loopback, private, link_local,
metadata, cgnat, multicast, reserved, unspecified, broadcast,
documentation) and sees through every IPv6 form that embeds an IPv4
address (mapped, compatible, SIIT-translated, NAT64, 6to4, Teredo): the
embedding inherits the categories of the IPv4 address inside.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

IPAddress = IPv4Address | IPv6Address

CATEGORIES = frozenset({
    "loopback", "private", "link_local", "metadata", "cgnat", "multicast", "reserved",
    "unspecified", "broadcast", "documentation", "self",
})
"""Every category L{classify} and L{EgressPolicy} use; C{allow} takes these."""

# The order in which the most telling refused category is reported.
PRIORITY = ("self", "metadata", "loopback", "link_local", "private", "cgnat",
             "unspecified", "broadcast", "multicast", "documentation", "reserved")

_V4_RANGES = (
    ("0.0.0.0/8", "reserved"),            # "this network"; Linux dials 0.0.0.0 as localhost
    ("0.0.0.0/32", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link_local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),         # IETF protocol assignments
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),       # 6to4 relay anycast (deprecated)
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "reserved"),        # benchmarking
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    # Cloud instance metadata services (on top of their range's category).
    ("169.254.169.254/32", "metadata"),   # AWS, GCP, Azure, OCI, DigitalOcean, ...
    ("169.254.170.2/32", "metadata"),     # AWS ECS task metadata
    ("169.254.170.23/32", "metadata"),    # AWS EKS pod identity
    ("100.100.100.200/32", "metadata"),   # Alibaba Cloud
    ("192.0.0.192/32", "metadata"),       # Oracle Cloud (legacy)
)

_V6_RANGES = (
    ("100::/64", "reserved"),             # discard-only
    ("2001:2::/48", "reserved"),          # benchmarking
    ("2001:10::/28", "reserved"),         # ORCHID (deprecated)
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "private"),              # unique local
    ("fd00:ec2::254/128", "metadata"),    # AWS IMDS over IPv6
    ("fd00:ec2::23/128", "metadata"),     # AWS EKS pod identity over IPv6
    ("fe80::/10", "link_local"),
    ("fec0::/10", "private"),             # site-local (deprecated)
    ("ff00::/8", "multicast"),
)

_NONE: frozenset[str] = frozenset()
_RESERVED = frozenset({"reserved"})
_UNSPECIFIED = frozenset({"reserved", "unspecified"})
_LOOPBACK = frozenset({"loopback"})
_MASK32 = 0xFFFFFFFF


def _by_prefix(rows: Iterable[tuple[str, str]], network: Any, bits: int, key_bits: int
               ) -> dict[int, tuple[tuple[int, int, frozenset[str]], ...]]:
    """
    Index ranges by the top C{key_bits} of the address, so that a lookup
    checks only the few ranges that can contain it.
    """
    table: dict[int, list[tuple[int, int, frozenset[str]]]] = {}
    for text, category in rows:
        net = network(text)
        start, mask = int(net.network_address), int(net.netmask)
        shift = bits - key_bits
        first, last = start >> shift, int(net.broadcast_address) >> shift
        for key in range(first, last + 1):
            table.setdefault(key, []).append((start, mask, frozenset({category})))
    return {key: tuple(matching) for key, matching in table.items()}


_V4_INDEX = _by_prefix(_V4_RANGES, IPv4Network, 32, 8)
_V6_INDEX = _by_prefix(_V6_RANGES, IPv6Network, 128, 16)


def _classify4(value: int) -> frozenset[str]:
    rows = _V4_INDEX.get(value >> 24)
    if rows is None:
        return _NONE
    found = _NONE
    for start, mask, categories in rows:
        if value & mask == start:
            found = found | categories
    return found


def _embedded4(value: int) -> tuple[int, ...] | None:
    """
    The IPv4 addresses an IPv6 address embeds, as ints: C{None} when it is
    no embedding form, C{()} when the form is ambiguous (then: reserved).
    """
    high = value >> 32
    if high == 0 or high == 0xFFFF or high == 0xFFFF0000:
        return (value & _MASK32,)              # compatible, mapped, SIIT-translated
    top32 = value >> 96
    if top32 == 0x0064FF9B and (value >> 32) & (2**64 - 1) == 0:
        return (value & _MASK32,)              # NAT64 well-known prefix, 64:ff9b::/96
    if value >> 80 == 0x0064FF9B0001:          # NAT64 local use, 64:ff9b:1::/48
        # Only the /96 layout (last 32 bits) is unambiguous; other prefix
        # lengths (RFC 6052) put the IPv4 bits elsewhere.
        return (value & _MASK32,) if (value >> 32) & (2**48 - 1) == 0 else ()
    if value >> 112 == 0x2002:
        return ((value >> 80) & _MASK32,)      # 6to4
    if top32 == 0x20010000:                    # Teredo: server, then obfuscated client
        return ((value >> 64) & _MASK32, (value & _MASK32) ^ _MASK32)
    return None


def _classify6(value: int) -> frozenset[str]:
    if value == 0:
        return _UNSPECIFIED
    if value == 1:
        return _LOOPBACK
    embedded = _embedded4(value)
    if embedded is not None:
        if not embedded:
            return _RESERVED
        found = _NONE
        for inner in embedded:
            found = found | _classify4(inner)
        return found
    top16 = value >> 112
    found = _NONE
    for start, mask, categories in _V6_INDEX.get(top16, ()):
        if value & mask == start:
            found = found | categories
    if not found and not 0x2000 <= top16 < 0x4000:
        return _RESERVED                       # outside global unicast 2000::/3
    return found


def as_address(ip: IPAddress | str) -> IPAddress:
    """C{ip} as an C{ipaddress} object (a string is parsed; brackets allowed)."""
    if isinstance(ip, str):
        return ip_address(ip[1:-1] if ip[:1] == "[" and ip[-1:] == "]" else ip)
    return ip


def classify(ip: IPAddress | str) -> frozenset[str]:
    """
    The categories of an address; empty for an ordinary public address.

    An IPv6 address embedding an IPv4 address gets the IPv4 address's
    categories (Teredo: the union of server and client); C{64:ff9b:1::/48}
    outside its C{/96} layout and IPv6 space outside C{2000::/3} without
    another category are C{reserved}.
    """
    address = as_address(ip)
    if address.version == 4:
        return _classify4(int(address))
    return _classify6(int(address))


def embedded_ipv4(ip: IPAddress | str) -> tuple[IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address embeds (none for IPv4 and ::, ::1)."""
    address = as_address(ip)
    value = int(address)
    if address.version == 4 or value <= 1:
        return ()
    return tuple(IPv4Address(inner) for inner in _embedded4(value) or ())
