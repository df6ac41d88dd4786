"""
Session secrets: the happy path, wrong and missing secrets, oversize
values, and that only keyed digests are kept and compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from appliance.auth import (
    INVALID,
    MAX_SESSION_SECRET,
    MISSING,
    AuthRequest,
    Identity,
    SessionSecretAuth,
)
from appliance.host.secret import Secret

ALICE = "alice-secret-" + "a" * 24
BOB = "bob-secret-" + "b" * 24


def make(registry: CollectorRegistry | None = None, header: bytes = b"x-session-secret"
         ) -> SessionSecretAuth:
    """Two identities with their secrets."""
    return SessionSecretAuth(
        [(Identity("alice", "session", "payments", "checkout"), Secret("${env:A}", ALICE)),
         (Identity("bob", "session"), Secret("file:/run/bob", BOB))],
        header=header, registry=registry)


def request(value: bytes | None, header: bytes = b"x-session-secret") -> AuthRequest:
    """A request with (or without) the session header."""
    return AuthRequest(headers={} if value is None else {header: value})


def test_right_secret_names_its_identity() -> None:
    """Each secret maps to its own identity, synchronously, the same result object each time."""
    registry = CollectorRegistry()
    auth = make(registry)
    result = auth.authenticate_now(request(ALICE.encode()))
    assert result.ok and result.method == "session"
    assert result.identity == Identity("alice", "session", "payments", "checkout")
    assert auth.authenticate_now(request(ALICE.encode())) is result
    bob = auth.authenticate_now(request(BOB.encode()))
    assert bob.identity is not None and bob.identity.name == "bob"
    assert bob.identity.namespace is None
    assert registry.get_sample_value("appliance_auth_results_total",
                                     {"method": "session", "result": "ok"}) == 3


def test_wrong_missing_and_oversize() -> None:
    """Wrong or near-miss secrets are invalid; no header is missing; >4 KiB invalid unhashed."""
    auth = make()
    for wrong in (b"", b"nope", ALICE[:-1].encode(), ALICE.encode() + b"x",
                  ALICE.upper().encode(), BOB.encode() + b"\x00"):
        result = auth.authenticate_now(request(wrong))
        assert (result.failure, result.reason, result.identity) == (
            INVALID, "unknown_secret", None)
    missing = auth.authenticate_now(request(None))
    assert (missing.failure, missing.method) == (MISSING, "session")
    other_header = auth.authenticate_now(request(ALICE.encode(), b"x-other"))
    assert other_header.failure == MISSING
    oversize = auth.authenticate_now(request(b"a" * (MAX_SESSION_SECRET + 1)))
    assert (oversize.failure, oversize.reason) == (INVALID, "too_long")


def test_compare_is_constant_time_on_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookups compare HMAC digests with hmac.compare_digest, never the secret itself."""
    auth = make()
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    hashed: list[bytes] = []
    real_digest = auth._digest

    def digest_spy(message: bytes) -> bytes:
        hashed.append(message)
        return real_digest(message)

    monkeypatch.setattr(auth, "_digest", digest_spy)
    assert auth.authenticate_now(request(ALICE.encode())).ok
    assert len(compared) == 1
    a, b = compared[0]
    assert len(a) == len(b) == 32 and ALICE.encode() not in (a, b)
    # an oversize value is refused before any hashing
    auth.authenticate_now(request(b"x" * (MAX_SESSION_SECRET + 1)))
    assert hashed == [ALICE.encode()]


def test_only_keyed_digests_are_kept() -> None:
    """Nothing reachable from the object holds a secret; digests differ per process key."""
    auth = make()
    held = list(_strings({k: v for k, v in vars(auth).items()
                          if k not in {"metrics", "_ok", "_invalid", "_keyed"}}))
    assert held and all(ALICE not in str(v) and BOB not in str(v) for v in held)
    assert all(len(digest) == 32 for digest in auth._by_digest)
    other = make()
    assert set(auth._by_digest).isdisjoint(other._by_digest)  # random key per instance
    assert other.authenticate_now(request(ALICE.encode())).ok
    assert sorted(auth.status()["identities"]) == ["alice", "bob"]  # type: ignore[call-overload]


def _strings(value: Any, depth: int = 0) -> Iterator[str | bytes]:
    """Every str and bytes reachable from C{value} through containers and attributes."""
    if depth > 6:
        return
    if isinstance(value, (str, bytes)):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key, depth + 1)
            yield from _strings(item, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _strings(item, depth + 1)
    elif hasattr(value, "__attrs_attrs__"):
        for attribute in value.__attrs_attrs__:
            yield from _strings(getattr(value, attribute.name), depth + 1)


def test_one_secret_for_two_identities_is_refused() -> None:
    """Two identities sharing a secret would be ambiguous."""
    with pytest.raises(ValueError, match="uses the secret of another session") as error:
        SessionSecretAuth([(Identity("a", "session"), Secret("${env:A}", ALICE)),
                           (Identity("b", "session"), Secret("${env:B}", ALICE))])
    assert ALICE not in str(error.value)


@pytest.mark.parametrize("header", [b"x-session-secret", b"x-api-session"])
def test_async_form_and_custom_header(header: bytes) -> None:
    """authenticate() answers with an already fired Deferred; the header is configurable."""
    auth = make(header=header)
    results: list[Any] = []
    auth.authenticate(request(BOB.encode(), header)).addCallback(results.append)
    assert results[0].ok and results[0].identity.name == "bob"
