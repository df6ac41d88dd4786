"""
Property tests: any header bytes give a clean result (never an exception),
malformed or oversize tokens never reach TokenReview, and only credentials
that can be valid ever need a lookup.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from appliance.auth import (
    Authenticator,
    AuthRequest,
    AuthResult,
    Identity,
    KubernetesAuth,
    MTLSAuth,
    Review,
    SessionSecretAuth,
)
from appliance.auth.model import FAILURES, OK
from appliance.host.secret import Secret
from appliance.host.tls_identity import PeerIdentity

TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
SECRET = "fuzz-session-secret-0123456789"


class FakeReviews:
    """A TokenReview client answering at once; records what it was asked."""

    url = b"https://fake"
    audiences: tuple[str, ...] = ("secretproxy",)

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def review(self, token: bytes) -> Deferred[Review]:
        """Accept tokens starting with 'good', refuse the rest."""
        self.asked.append(token)
        if token.startswith(b"good"):
            return succeed(Review(Identity("system:serviceaccount:a:b", "kubernetes", "a", "b")))
        return succeed(Review(None, "not_authenticated"))

    def close(self) -> Deferred[None]:
        """Nothing to close."""
        return succeed(None)


REVIEWS = FakeReviews()
K8S = KubernetesAuth(REVIEWS, Clock())
CHAIN = Authenticator([
    SessionSecretAuth([(Identity("s", "session"), Secret("${env:S}", SECRET))]),
    K8S,
    MTLSAuth(),
])

header_values = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=4090, max_size=4100),
    st.builds(lambda b: b"Bearer " + b, st.binary(max_size=64)),
    st.builds(lambda t: b"bEaReR " + t.encode(), st.from_regex(r"[A-Za-z0-9._~+/-]{1,40}=?",
                                                                fullmatch=True)),
    st.just(b"x" * (16 * 1024 + 1)),
)
peers = st.none() | st.builds(
    PeerIdentity,
    dns=st.lists(st.text(max_size=20), max_size=2).map(tuple),
    uris=st.lists(st.one_of(st.text(max_size=40),
                            st.builds(lambda s: "spiffe://" + s, st.text(max_size=40))),
                  max_size=2).map(tuple),
    ips=st.just(()),
    common_name=st.none() | st.text(max_size=20),
)
requests = st.builds(
    lambda headers, peer: AuthRequest(headers=headers, peer_identity=peer),
    st.dictionaries(st.sampled_from([b"x-session-secret", b"authorization", b"x-other"]),
                    header_values, max_size=3),
    peers,
)


def resolved(d: Deferred[AuthResult]) -> AuthResult:
    """The result of an already fired Deferred (the fake answers synchronously)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert len(results) == 1 and isinstance(results[0], AuthResult), results
    return results[0]  # type: ignore[no-any-return]


def clean(result: AuthResult) -> None:
    """A result is either an identity or one known failure code, never both."""
    assert (result.identity is None) == (result.failure is not None)
    assert (result.failure or OK) in (OK, *FAILURES)


@settings(max_examples=400, deadline=None)
@given(requests)
def test_any_request_gives_a_clean_result(request: AuthRequest) -> None:
    """Random headers and certificates: sync and async answers are clean and agree."""
    asked_before = len(REVIEWS.asked)
    now = CHAIN.authenticate_now(request)
    later = resolved(CHAIN.authenticate(request))
    clean(later)
    if now is not None:
        clean(now)
        assert (now.failure, now.method, now.identity) == (
            later.failure, later.method, later.identity)
    for token in REVIEWS.asked[asked_before:]:
        assert len(token) <= 16 * 1024 and TOKEN.fullmatch(token)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_lookups_only_for_well_formed_tokens(value: bytes) -> None:
    """authenticate_now returns None only for a well-formed, not yet cached bearer token."""
    request = AuthRequest(headers={b"authorization": b"Bearer " + value})
    now = K8S.authenticate_now(request)
    token = value.strip(b" \t")
    if now is None:
        assert TOKEN.fullmatch(token)
    elif not now.ok and now.reason == "malformed":
        assert not TOKEN.fullmatch(token)
