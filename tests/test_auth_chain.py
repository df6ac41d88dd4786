"""
Chains of methods: the first method whose credential is present decides,
a present but invalid credential never falls through, and the sync and
async entry points agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry

from appliance.auth import (
    INVALID,
    MISSING,
    NOTHING_PRESENTED,
    Authenticator,
    AuthRequest,
    Identity,
    MTLSAuth,
    SessionSecretAuth,
)
from appliance.host.secret import Secret
from appliance.host.tls_identity import PeerIdentity
from tests.tokenreview_server import (
    TokenReviewServer,
    kubernetes_auth,
    tokenreview,  # noqa: F401 - fixture
)

SECRET = "chain-session-secret-0123456789"
PEER = PeerIdentity(dns=(), uris=("spiffe://prod.example/ns/jobs/sa/runner",), ips=(),
                    common_name="runner")


def request(session: str | None = None, token: str | None = None,
            peer: PeerIdentity | None = None) -> AuthRequest:
    """A request with any combination of the three credentials."""
    headers = {}
    if session is not None:
        headers[b"x-session-secret"] = session.encode()
    if token is not None:
        headers[b"authorization"] = b"Bearer " + token.encode()
    return AuthRequest(headers=headers, peer_identity=peer, peer_address="10.0.0.7")


def session_method(registry: CollectorRegistry | None = None) -> SessionSecretAuth:
    """One session identity."""
    return SessionSecretAuth([(Identity("batch", "session"), Secret("${env:S}", SECRET))],
                             registry=registry)


@pytest_twisted.ensureDeferred
async def test_present_but_invalid_never_falls_through(
        tokenreview: TokenReviewServer, tmp_path: Path) -> None:  # noqa: F811
    """A wrong session secret fails even with a valid token; a bad token fails despite a cert."""
    k8s = kubernetes_auth(tokenreview, tmp_path)
    try:
        token = tokenreview.add_token("payments", "api")
        session_first = Authenticator([session_method(), k8s])
        wrong = session_first.authenticate_now(request("wrong-secret", token))
        assert wrong is not None and (wrong.failure, wrong.method) == (INVALID, "session")
        assert tokenreview.reviews == 0
        # only the token present: the chain moves past session and needs a lookup
        assert session_first.authenticate_now(request(token=token)) is None
        result = await session_first.authenticate(request(token=token))
        assert result.ok and result.method == "kubernetes" and tokenreview.reviews == 1

        k8s_first = Authenticator([k8s, MTLSAuth()])
        bad = await k8s_first.authenticate(request(token="eyJhbGciOi.bad.token", peer=PEER))
        assert (bad.failure, bad.method) == (INVALID, "kubernetes")
        malformed = k8s_first.authenticate_now(request(token="not a token", peer=PEER))
        assert malformed is not None and malformed.failure == INVALID
        by_cert = k8s_first.authenticate_now(request(peer=PEER))
        assert by_cert is not None and by_cert.method == "mtls" and by_cert.ok
        # the cached token is answered synchronously through the chain
        cached = session_first.authenticate_now(request(token=token))
        assert cached is not None and cached.identity == result.identity
    finally:
        await k8s.close()


def test_nothing_presented_is_missing_and_counted_once() -> None:
    """No credential for any method: 'missing' with method label 'none', counted once."""
    registry = CollectorRegistry()
    chain = Authenticator([MTLSAuth(registry=registry), session_method(registry)])
    assert chain.authenticate_now(request()) is NOTHING_PRESENTED
    results: list[Any] = []
    chain.authenticate(request()).addCallback(results.append)
    assert results == [NOTHING_PRESENTED] and NOTHING_PRESENTED.failure == MISSING
    assert registry.get_sample_value("appliance_auth_results_total",
                                     {"method": "none", "result": "missing"}) == 2
    assert registry.get_sample_value("appliance_auth_results_total",
                                     {"method": "session", "result": "missing"}) is None
    assert registry.get_sample_value("appliance_auth_results_total",
                                     {"method": "session", "result": "invalid"}) == 0


def test_order_decides_between_present_credentials() -> None:
    """With a certificate and a session secret both valid, the first listed method wins."""
    mtls, session = MTLSAuth(), session_method()
    both = request(SECRET, peer=PEER)
    first = Authenticator([mtls, session]).authenticate_now(both)
    second = Authenticator([session, mtls]).authenticate_now(both)
    assert first is not None and first.method == "mtls"
    assert second is not None and second.method == "session"
    assert Authenticator([session]).names == ("session",)


def test_bad_chains_are_refused() -> None:
    """An empty chain or a repeated method is a programming error."""
    with pytest.raises(ValueError):
        Authenticator([])
    mtls = MTLSAuth()
    with pytest.raises(ValueError):
        Authenticator([mtls, mtls])
