"""Tests for SSRF-safe egress: address categories, the policy, vetted resolution, its cache."""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from appliance.http.egress import (
    CATEGORIES,
    EgressPolicy,
    EgressRefused,
    EgressResolver,
    ResolutionFailed,
    classify,
    embedded_ipv4,
    resolve_and_vet,
)

# -- categories ----------------------------------------------------------------

V4_TABLE = [
    # public neighbours of every range
    ("1.1.1.1", set()), ("8.8.8.8", set()), ("9.255.255.255", set()), ("11.0.0.0", set()),
    ("100.63.255.255", set()), ("100.128.0.0", set()), ("126.255.255.255", set()),
    ("128.0.0.0", set()), ("169.253.255.255", set()), ("169.255.0.0", set()),
    ("172.15.255.255", set()), ("172.32.0.0", set()), ("191.255.255.255", set()),
    ("192.0.1.0", set()), ("192.0.3.0", set()), ("192.88.98.255", set()),
    ("192.88.100.0", set()), ("192.167.255.255", set()), ("192.169.0.0", set()),
    ("198.17.255.255", set()), ("198.20.0.0", set()), ("198.51.99.255", set()),
    ("198.51.101.0", set()), ("203.0.112.255", set()), ("203.0.114.0", set()),
    ("223.255.255.255", set()), ("65.54.227.120", set()), ("169.254.169.253", {"link_local"}),
    # reserved / unspecified / broadcast
    ("0.0.0.0", {"reserved", "unspecified"}), ("0.0.0.1", {"reserved"}),
    ("0.255.255.255", {"reserved"}),
    ("240.0.0.0", {"reserved"}), ("250.1.2.3", {"reserved"}),
    ("255.255.255.254", {"reserved"}), ("255.255.255.255", {"reserved", "broadcast"}),
    ("192.0.0.0", {"reserved"}), ("192.0.0.255", {"reserved"}),
    ("192.88.99.0", {"reserved"}), ("192.88.99.255", {"reserved"}),
    ("198.18.0.0", {"reserved"}), ("198.19.255.255", {"reserved"}),
    # documentation
    ("192.0.2.0", {"documentation"}), ("192.0.2.255", {"documentation"}),
    ("198.51.100.0", {"documentation"}), ("198.51.100.255", {"documentation"}),
    ("203.0.113.0", {"documentation"}), ("203.0.113.255", {"documentation"}),
    # private
    ("10.0.0.0", {"private"}), ("10.255.255.255", {"private"}),
    ("172.16.0.0", {"private"}), ("172.31.255.255", {"private"}),
    ("192.168.0.0", {"private"}), ("192.168.255.255", {"private"}),
    # cgnat, loopback, link-local, metadata, multicast
    ("100.64.0.0", {"cgnat"}), ("100.127.255.255", {"cgnat"}),
    ("100.100.100.200", {"cgnat", "metadata"}),
    ("127.0.0.0", {"loopback"}), ("127.0.0.1", {"loopback"}),
    ("127.255.255.255", {"loopback"}),
    ("169.254.0.0", {"link_local"}), ("169.254.255.255", {"link_local"}),
    ("169.254.169.254", {"link_local", "metadata"}),
    ("169.254.170.2", {"link_local", "metadata"}),
    ("169.254.170.23", {"link_local", "metadata"}),
    ("192.0.0.192", {"reserved", "metadata"}),
    ("224.0.0.0", {"multicast"}), ("224.0.0.251", {"multicast"}),
    ("239.255.255.255", {"multicast"}),
]

V6_TABLE = [
    # public
    ("2606:4700:4700::1111", set()), ("2001:4860:4860::8888", set()), ("2000::", set()),
    ("3ffe:ffff::", set()), ("3fff:1000::", set()), ("2001:1::", set()),
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", set()), ("2001:db9::", set()),
    ("2003::1", set()), ("2001:3::1", set()),
    # unspecified, loopback
    ("::", {"reserved", "unspecified"}), ("::1", {"loopback"}),
    # outside 2000::/3 and nothing else
    ("::1:0:0:0", {"reserved"}), ("1::", {"reserved"}), ("4000::1", {"reserved"}),
    ("1fff:ffff::", {"reserved"}), ("fbff::", {"reserved"}), ("64:ff9b:0:1::1", {"reserved"}),
    ("100::", {"reserved"}), ("100::ffff:ffff:ffff:ffff", {"reserved"}),
    ("100:0:0:1::", {"reserved"}),
    ("2001:2::", {"reserved"}), ("2001:2:0:ffff::1", {"reserved"}),
    ("2001:10::", {"reserved"}), ("2001:1f:ffff::", {"reserved"}),
    # documentation
    ("2001:db8::", {"documentation"}), ("2001:db8:ffff::1", {"documentation"}),
    ("3fff::", {"documentation"}), ("3fff:fff:ffff::", {"documentation"}),
    # private, link-local, multicast
    ("fc00::", {"private"}), ("fdff:ffff::1", {"private"}), ("fd12:3456::1", {"private"}),
    ("fd00:ec2::254", {"private", "metadata"}), ("fd00:ec2::23", {"private", "metadata"}),
    ("fe80::", {"link_local"}), ("fe80::1%eth0", {"link_local"}),
    ("febf:ffff::", {"link_local"}),
    ("fec0::1", {"private"}), ("feff::", {"private"}),
    ("ff00::", {"multicast"}), ("ff02::1", {"multicast"}), ("ffff::", {"multicast"}),
]

EMBEDDED_TABLE = [
    # IPv4-mapped, IPv4-compatible, SIIT-translated
    ("::ffff:127.0.0.1", {"loopback"}, ["127.0.0.1"]),
    ("::ffff:169.254.169.254", {"link_local", "metadata"}, ["169.254.169.254"]),
    ("::ffff:10.0.0.1", {"private"}, ["10.0.0.1"]),
    ("::ffff:0.0.0.0", {"reserved", "unspecified"}, ["0.0.0.0"]),
    ("::ffff:8.8.8.8", set(), ["8.8.8.8"]),
    ("::127.0.0.1", {"loopback"}, ["127.0.0.1"]),
    ("::192.168.1.1", {"private"}, ["192.168.1.1"]),
    ("::0.0.0.2", {"reserved"}, ["0.0.0.2"]),
    ("::8.8.8.8", set(), ["8.8.8.8"]),
    ("::ffff:0:127.0.0.1", {"loopback"}, ["127.0.0.1"]),
    ("::ffff:0:8.8.8.8", set(), ["8.8.8.8"]),
    # NAT64, well-known and local-use
    ("64:ff9b::a9fe:a9fe", {"link_local", "metadata"}, ["169.254.169.254"]),
    ("64:ff9b::127.0.0.1", {"loopback"}, ["127.0.0.1"]),
    ("64:ff9b::100.64.0.1", {"cgnat"}, ["100.64.0.1"]),
    ("64:ff9b::8.8.8.8", set(), ["8.8.8.8"]),
    ("64:ff9b:1::10.1.2.3", {"private"}, ["10.1.2.3"]),
    ("64:ff9b:1::8.8.8.8", set(), ["8.8.8.8"]),
    ("64:ff9b:1:ffff::8.8.8.8", {"reserved"}, []),
    ("64:ff9b:1:0:0:1::", {"reserved"}, []),
    # 6to4
    ("2002:7f00:1::", {"loopback"}, ["127.0.0.1"]),
    ("2002:7f00:1:1234:5678::1", {"loopback"}, ["127.0.0.1"]),
    ("2002:a9fe:a9fe::", {"link_local", "metadata"}, ["169.254.169.254"]),
    ("2002:c0a8:101::", {"private"}, ["192.168.1.1"]),
    ("2002:808:808::1", set(), ["8.8.8.8"]),
    ("2002::", {"reserved", "unspecified"}, ["0.0.0.0"]),
    # Teredo: server in bits 32-63, client inverted in the last 32 bits
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", {"documentation"},
     ["65.54.227.120", "192.0.2.45"]),
    ("2001:0:4136:e378::80ff:fffe", {"loopback"}, ["65.54.227.120", "127.0.0.1"]),
    ("2001:0:4136:e378::5601:5601", {"link_local", "metadata"},
     ["65.54.227.120", "169.254.169.254"]),
    ("2001:0:7f00:1::f7f7:f7f7", {"loopback"}, ["127.0.0.1", "8.8.8.8"]),
    ("2001:0:4136:e378::f7f7:f7f7", set(), ["65.54.227.120", "8.8.8.8"]),
]


@pytest.mark.parametrize(("address", "categories"), V4_TABLE + V6_TABLE)
def test_classify(address: str, categories: set[str]) -> None:
    """Every range, its boundary addresses and its public neighbours classify as listed."""
    assert classify(address) == categories
    assert classify(ip_address(address)) == categories


@pytest.mark.parametrize(("address", "categories", "inner"), EMBEDDED_TABLE)
def test_embedded_ipv4(address: str, categories: set[str], inner: list[str]) -> None:
    """An IPv6 form embedding IPv4 inherits the categories of what it embeds."""
    assert classify(address) == categories
    assert [str(v4) for v4 in embedded_ipv4(address)] == inner


def test_embedded_ipv4_of_plain_addresses() -> None:
    """IPv4, ::, ::1 and ordinary IPv6 embed nothing."""
    for address in ("127.0.0.1", "::", "::1", "2606:4700::1111", "fe80::1"):
        assert embedded_ipv4(address) == ()


def test_classify_bracketed_literal() -> None:
    """A bracketed IPv6 string is accepted; junk is a ValueError."""
    assert classify("[::1]") == {"loopback"}
    with pytest.raises(ValueError):
        classify("localhost")


def embeddings(v4: IPv4Address, tail: int) -> list[IPv6Address]:
    """Every IPv6 form that carries C{v4} (C{tail}: arbitrary bits where a form has room)."""
    value = int(v4)
    low16 = tail & 0xFFFF
    return [
        IPv6Address(0xFFFF << 32 | value),                              # mapped
        IPv6Address(0xFFFF0000 << 32 | value),                          # SIIT-translated
        IPv6Address(0x0064FF9B << 96 | value),                          # NAT64 well-known
        IPv6Address(0x0064FF9B0001 << 80 | value),                      # NAT64 local use
        IPv6Address(0x2002 << 112 | value << 80 | (tail & (2**80 - 1))),  # 6to4
        # Teredo with the address as server and client, then with a public server.
        IPv6Address(0x20010000 << 96 | value << 64 | low16 << 32 | (value ^ 0xFFFFFFFF)),
        IPv6Address(0x20010000 << 96 | int(IPv4Address("65.54.227.120")) << 64
                    | low16 << 32 | (value ^ 0xFFFFFFFF)),
    ]


@given(st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**80 - 1))
def test_every_embedding_classifies_like_its_ipv4(v4: IPv4Address, tail: int) -> None:
    """For any IPv4 address, each IPv6 embedding has exactly the IPv4 categories."""
    expected = classify(v4)
    forms = embeddings(v4, tail)
    if int(v4) > 1:  # ::0.0.0.0 and ::0.0.0.1 are :: and ::1
        forms.append(IPv6Address(int(v4)))
    for form in forms:
        assert classify(form) == expected, form
        assert v4 in embedded_ipv4(form)


@given(st.one_of(st.integers(0, 2**32 - 1).map(IPv4Address),
                 st.integers(0, 2**128 - 1).map(IPv6Address)))
def test_any_address_classifies(address: IPv4Address | IPv6Address) -> None:
    """Every address gets known categories (never "self", which only the policy adds)."""
    assert classify(address) <= CATEGORIES - {"self"}


# -- policy ----------------------------------------------------------------------

def refusal(policy: EgressPolicy, address: str, port: int | None = None) -> EgressRefused:
    """The EgressRefused that C{policy.check} raises."""
    with pytest.raises(EgressRefused) as caught:
        policy.check(address, port)
    return caught.value


def test_default_policy_allows_only_public_addresses() -> None:
    """With nothing allowed, any categorised address is refused and public ones pass."""
    policy = EgressPolicy()
    for address, categories in V4_TABLE + V6_TABLE:
        if categories:
            assert refusal(policy, address).categories == categories
        else:
            policy.check(address)
    refused = refusal(policy, "169.254.169.254")
    assert refused.category == "metadata" and refused.address == IPv4Address("169.254.169.254")
    assert "169.254.169.254" in str(refused) and "metadata" in str(refused)


def test_allow_needs_every_category() -> None:
    """Allowing link_local does not open the metadata address; allowing both does."""
    policy = EgressPolicy(allow=frozenset({"link_local"}))
    policy.check("169.254.1.1")
    assert refusal(policy, "169.254.169.254").categories == {"metadata"}
    EgressPolicy(allow=frozenset({"link_local", "metadata"})).check("169.254.169.254")
    loopback = EgressPolicy(allow=frozenset({"loopback"}))
    loopback.check("127.0.0.1")
    loopback.check("::1")
    loopback.check("::ffff:127.0.0.1")
    assert refusal(loopback, "10.0.0.1").category == "private"


def test_unknown_allowed_category_is_a_config_error() -> None:
    """A typo in allow fails at construction, not silently at request time."""
    with pytest.raises(ValueError, match="privat"):
        EgressPolicy(allow=frozenset({"privat"}))


def test_own_addresses_are_self() -> None:
    """The proxy's own addresses are refused, even when their category is allowed."""
    policy = EgressPolicy(allow=frozenset({"loopback", "private"}),
                          own_addresses={"127.0.0.1", ip_address("10.0.0.5"), "::1"})
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "10.0.0.5", "::1"):
        assert refusal(policy, address, 443).category == "self"
    policy.check("127.0.0.2", 443)
    policy.check("10.0.0.6")
    EgressPolicy(allow=frozenset({"loopback", "self"}), own_addresses={"127.0.0.1"}
                 ).check("127.0.0.1")


def test_own_address_with_port() -> None:
    """An (address, port) entry makes only that port self (and any port when unknown)."""
    policy = EgressPolicy(allow=frozenset({"loopback"}),
                          own_addresses={("127.0.0.1", 8080)})
    policy.check("127.0.0.1", 9000)
    assert refusal(policy, "127.0.0.1", 8080).categories == {"self"}
    assert refusal(policy, "127.0.0.1").category == "self"
    mapped = EgressPolicy(own_addresses={"::ffff:203.0.114.8"})
    assert refusal(mapped, "203.0.114.8").categories == {"self"}
    public = EgressPolicy(own_addresses={("203.0.114.7", 443)})
    assert refusal(public, "203.0.114.7", 443).categories == {"self"}
    public.check("203.0.114.7", 8443)


def test_refusal_reports_the_most_telling_category() -> None:
    """The reported category follows a fixed priority, whatever the set order."""
    policy = EgressPolicy(own_addresses={"169.254.169.254"})
    assert refusal(policy, "169.254.169.254").category == "self"
    assert refusal(EgressPolicy(), "::ffff:169.254.169.254").category == "metadata"
    assert refusal(EgressPolicy(), "0.0.0.0").category == "unspecified"


# -- resolve_and_vet ---------------------------------------------------------------

class SyncPool:
    """A thread pool stand-in that runs work when told to (or at once)."""

    def __init__(self, immediate: bool = True) -> None:
        """@param immediate: run each call as it is submitted."""
        self.immediate = immediate
        self.pending: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...]]] = []

    def callInThreadWithCallback(self, on_result: Callable[..., Any], f: Callable[..., Any],
                                 *args: Any, **kwargs: Any) -> None:
        """What deferToThreadPool calls."""
        self.pending.append((on_result, f, args))
        if self.immediate:
            self.run()

    def run(self) -> None:
        """Run every pending call."""
        while self.pending:
            on_result, f, args = self.pending.pop(0)
            try:
                result = f(*args)
            except Exception:
                on_result(False, Failure())
            else:
                on_result(True, result)


class ThreadlessReactor(Clock):
    """A Clock that is also an IReactorThreads running its 'threads' synchronously."""

    def __init__(self, immediate: bool = True) -> None:
        """@param immediate: see L{SyncPool}."""
        super().__init__()
        self.pool = SyncPool(immediate)

    def getThreadPool(self) -> SyncPool:
        """The fake pool."""
        return self.pool

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Already on the 'reactor thread'."""
        f(*args, **kwargs)


class FakeDNS:
    """A getaddrinfo stand-in answering from a table and counting lookups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        """@param table: name -> addresses, in answer order."""
        self.table = table
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int, family: int = 0, type: int = 0, proto: int = 0
                 ) -> list[tuple[Any, ...]]:
        """Answer like getaddrinfo (duplicated per address, as some resolvers do)."""
        self.calls.append((host, port))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answers = []
        for text in self.table[host]:
            family = socket.AF_INET6 if ":" in text else socket.AF_INET
            sockaddr = (text, port, 0, 0) if ":" in text else (text, port)
            answers.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
            answers.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return answers


def outcome(d: Deferred[Any]) -> Any:
    """What an already-fired Deferred holds: the value, or the exception (consumed)."""
    seen: list[Any] = []
    d.addCallbacks(seen.append, lambda f: seen.append(f.value))
    assert seen, "the Deferred has not fired"
    return seen[0]


DNS = {
    "api.example.com": ["203.0.114.10", "2606:4700::10"],
    "mixed.example.com": ["10.0.0.1", "203.0.114.11", "169.254.169.254", "2606:4700::11"],
    "internal.example.com": ["10.0.0.2", "fd00::2"],
    "metadata.example.com": ["169.254.169.254"],
    "empty.example.com": [],
}


def test_literal_addresses_skip_dns() -> None:
    """An IP literal is vetted without any lookup."""
    dns = FakeDNS({})
    reactor = ThreadlessReactor()
    assert outcome(resolve_and_vet(reactor, "203.0.114.1", 443, EgressPolicy(), dns)) == [
        IPv4Address("203.0.114.1")]
    assert outcome(resolve_and_vet(reactor, "[2606:4700::1]", 443, EgressPolicy(), dns)) == [
        IPv6Address("2606:4700::1")]
    refused = outcome(resolve_and_vet(reactor, "169.254.169.254", 80, EgressPolicy(), dns))
    assert isinstance(refused, EgressRefused) and refused.category == "metadata"
    allowed = EgressPolicy(allow=frozenset({"loopback"}))
    assert outcome(resolve_and_vet(reactor, "::1", 8443, allowed, dns)) == [IPv6Address("::1")]
    assert dns.calls == [] and reactor.pool.pending == []


def test_names_are_resolved_in_the_pool_and_vetted() -> None:
    """A name is looked up once, through the thread pool; duplicates are dropped."""
    dns = FakeDNS(DNS)
    reactor = ThreadlessReactor(immediate=False)
    d = resolve_and_vet(reactor, "api.example.com", 443, EgressPolicy(), dns)
    assert not d.called and dns.calls == []
    reactor.pool.run()
    assert outcome(d) == [IPv4Address("203.0.114.10"), IPv6Address("2606:4700::10")]
    assert dns.calls == [("api.example.com", 443)]


def test_mixed_answers_keep_only_allowed_addresses() -> None:
    """Private and metadata addresses in an answer are dropped and logged; order is kept."""
    reactor = ThreadlessReactor()
    with capturedLogs() as events:
        result = outcome(resolve_and_vet(reactor, "mixed.example.com", 443, EgressPolicy(),
                                         FakeDNS(DNS)))
    assert result == [IPv4Address("203.0.114.11"), IPv6Address("2606:4700::11")]
    [event] = [e for e in events if e.get("host") == "mixed.example.com"]
    assert event["refused"] == ["10.0.0.1 (private)", "169.254.169.254 (metadata)"]


def test_nothing_allowed_or_nothing_found() -> None:
    """All-refused answers fail with the first refusal; lookup errors are ResolutionFailed."""
    reactor = ThreadlessReactor()
    dns = FakeDNS(DNS)
    refused = outcome(resolve_and_vet(reactor, "internal.example.com", 443, EgressPolicy(), dns))
    assert isinstance(refused, EgressRefused)
    assert refused.address == IPv4Address("10.0.0.2") and refused.category == "private"
    allowed = EgressPolicy(allow=frozenset({"private"}))
    assert len(outcome(resolve_and_vet(reactor, "internal.example.com", 443, allowed, dns))) == 2
    for host in ("nowhere.example.com", "empty.example.com", ""):
        failed = outcome(resolve_and_vet(reactor, host, 443, EgressPolicy(), dns))
        assert isinstance(failed, ResolutionFailed) and failed.host == host


@pytest_twisted.ensureDeferred
async def test_localhost_with_the_real_resolver(reactor: Any) -> None:
    """localhost resolves through real getaddrinfo in a thread, and is loopback only."""
    with pytest.raises(EgressRefused) as caught:
        await resolve_and_vet(reactor, "localhost", 8443, EgressPolicy())
    assert caught.value.category == "loopback"
    allowed = EgressPolicy(allow=frozenset({"loopback"}))
    addresses = await resolve_and_vet(reactor, "localhost", 8443, allowed)
    assert addresses and all(classify(address) == {"loopback"} for address in addresses)
    assert await resolve_and_vet(reactor, "127.0.0.1", 8443, allowed) == [
        IPv4Address("127.0.0.1")]


# -- the cache -------------------------------------------------------------------

def make_resolver(immediate: bool = True, **kwargs: Any
                  ) -> tuple[EgressResolver, ThreadlessReactor, FakeDNS]:
    """A resolver over the fake DNS table, with a fake clock and pool."""
    reactor = ThreadlessReactor(immediate)
    dns = FakeDNS(dict(DNS))
    return EgressResolver(reactor, EgressPolicy(), getaddrinfo=dns, **kwargs), reactor, dns


def test_cache_serves_the_hot_path_until_the_ttl() -> None:
    """After one lookup, vetted_now answers synchronously until the 30 s TTL runs out."""
    resolver, reactor, dns = make_resolver()
    assert resolver.ttl == 30.0
    assert resolver.vetted_now("api.example.com", 443) is None
    expected = [IPv4Address("203.0.114.10"), IPv6Address("2606:4700::10")]
    assert outcome(resolver.resolve("api.example.com", 443)) == expected
    assert resolver.vetted_now("api.example.com", 443) == expected
    assert outcome(resolver.resolve("api.example.com", 443)) == expected
    assert resolver.vetted_now("api.example.com", 8443) is None
    assert len(dns.calls) == 1
    reactor.advance(30.0)
    assert resolver.vetted_now("api.example.com", 443) is None
    outcome(resolver.resolve("api.example.com", 443))
    assert len(dns.calls) == 2 and len(resolver) == 1


def test_ttl_is_clamped_and_validated() -> None:
    """The TTL stays within [min_ttl, max_ttl]; nonsense bounds are refused."""
    assert make_resolver(ttl=0.1, min_ttl=5.0)[0].ttl == 5.0
    assert make_resolver(ttl=3600.0, max_ttl=60.0)[0].ttl == 60.0
    for bad in ({"min_ttl": 10.0, "max_ttl": 5.0}, {"min_ttl": -1.0},
                {"negative_ttl": -1.0}, {"max_entries": 0}):
        with pytest.raises(ValueError):
            make_resolver(**bad)


def test_refresh_ahead_keeps_the_hot_path_warm() -> None:
    """Late in an answer's life vetted_now refreshes it in the background, once."""
    resolver, reactor, dns = make_resolver(immediate=False)
    d = resolver.resolve("api.example.com", 443)
    reactor.pool.run()
    assert outcome(d)
    reactor.advance(22.0)
    assert resolver.vetted_now("api.example.com", 443) is not None
    assert len(reactor.pool.pending) == 0
    reactor.advance(1.0)  # 23 s: past three quarters of 30 s
    assert resolver.vetted_now("api.example.com", 443) is not None
    assert resolver.vetted_now("api.example.com", 443) is not None
    assert len(reactor.pool.pending) == 1
    dns.table["api.example.com"] = ["203.0.114.99"]
    reactor.pool.run()
    reactor.advance(20.0)  # past the first answer's expiry, within the new one's
    assert resolver.vetted_now("api.example.com", 443) == [IPv4Address("203.0.114.99")]
    assert len(dns.calls) == 2


def test_failed_refresh_keeps_the_old_answer() -> None:
    """A refresh that fails does not replace a still-valid answer."""
    resolver, reactor, dns = make_resolver()
    outcome(resolver.resolve("api.example.com", 443))
    reactor.advance(25.0)
    del dns.table["api.example.com"]
    with capturedLogs() as events:
        assert resolver.vetted_now("api.example.com", 443) is not None
    assert any("keeping the cached answer" in e.get("log_format", "") for e in events)
    assert resolver.vetted_now("api.example.com", 443) is not None
    reactor.advance(5.0)
    assert resolver.vetted_now("api.example.com", 443) is None


def test_refusals_and_failures_are_cached_briefly() -> None:
    """A refused or unknown name fails from the cache for negative_ttl seconds."""
    resolver, reactor, dns = make_resolver(negative_ttl=2.0)
    for _ in range(3):
        assert isinstance(outcome(resolver.resolve("internal.example.com", 443)), EgressRefused)
        assert isinstance(outcome(resolver.resolve("nowhere.example.com", 443)),
                          ResolutionFailed)
        assert resolver.vetted_now("internal.example.com", 443) is None
    assert len(dns.calls) == 2
    reactor.advance(2.0)
    outcome(resolver.resolve("internal.example.com", 443))
    assert len(dns.calls) == 3
    uncached, _, dns = make_resolver(negative_ttl=0.0)
    outcome(uncached.resolve("nowhere.example.com", 443))
    outcome(uncached.resolve("nowhere.example.com", 443))
    assert len(dns.calls) == 2


def test_concurrent_lookups_share_one_call() -> None:
    """Callers waiting for one name share a lookup; a cancelled one leaves the others."""
    resolver, reactor, dns = make_resolver(immediate=False)
    first = resolver.resolve("api.example.com", 443)
    second = resolver.resolve("api.example.com", 443)
    third = resolver.resolve("api.example.com", 443)
    second.cancel()
    assert isinstance(outcome(second), CancelledError)
    reactor.pool.run()
    answer = outcome(first)
    assert answer == outcome(third) and len(answer) == 2
    assert len(dns.calls) == 1


def test_literals_through_the_cache() -> None:
    """A literal resolves at once through the cache, refused or not."""
    resolver, reactor, dns = make_resolver(immediate=False)
    assert outcome(resolver.resolve("203.0.114.5", 443)) == [IPv4Address("203.0.114.5")]
    assert resolver.vetted_now("203.0.114.5", 443) == [IPv4Address("203.0.114.5")]
    assert isinstance(outcome(resolver.resolve("127.0.0.1", 443)), EgressRefused)
    assert dns.calls == [] and reactor.pool.pending == []


def test_cache_is_bounded_and_can_be_cleared() -> None:
    """Past max_entries the oldest answers go; forget and clear drop answers."""
    resolver, _, dns = make_resolver(max_entries=2)
    for port in (1, 2, 3):
        outcome(resolver.resolve("api.example.com", port))
    assert len(resolver) == 2 and resolver.vetted_now("api.example.com", 1) is None
    assert resolver.vetted_now("api.example.com", 3) is not None
    resolver.forget("api.example.com", 3)
    assert resolver.vetted_now("api.example.com", 3) is None and len(resolver) == 1
    resolver.clear()
    assert len(resolver) == 0 and len(dns.calls) == 3
