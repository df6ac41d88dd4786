"""
Kubernetes tokens against a real HTTPS TokenReview server: identities,
refusals, audiences, fail-closed outages (stopped, 500, timeout, bad CA),
the circuit breaker, caching (repeat, single flight, negative) and the
rotation of the proxy's own token file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, gatherResults
from twisted.internet.task import Clock

from appliance.auth import INVALID, UNAVAILABLE, AuthRequest, AuthResult, KubernetesAuth
from appliance.auth.tokenreview import judge
from appliance.resilience import BreakerPolicy, BreakerState, CircuitBreaker
from tests.harness.certs import TestCA
from tests.test_auth_redis import wait_until
from tests.tokenreview_server import (
    AUDIENCE,
    TokenReviewServer,
    bearer,
    kubernetes_auth,
    tokenreview,  # noqa: F401 - fixture
    write_token_file,
)


@pytest_twisted.async_yield_fixture
async def auth(tokenreview: TokenReviewServer,  # noqa: F811
               tmp_path: Path) -> AsyncIterator[KubernetesAuth]:
    """A KubernetesAuth on the real reactor, its connections closed afterwards."""
    method = kubernetes_auth(tokenreview, tmp_path, timeout=1.0)
    yield method
    await method.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric sample's value (0 when absent)."""
    return registry.get_sample_value(name, labels) or 0.0


@pytest_twisted.ensureDeferred
async def test_valid_token_gives_namespace_and_service_account(
        tokenreview: TokenReviewServer, auth: KubernetesAuth) -> None:  # noqa: F811
    """A token TokenReview accepts names system:serviceaccount:NS:SA, split into its parts."""
    token = tokenreview.add_token("payments", "checkout")
    request = bearer(token)
    assert auth.authenticate_now(request) is None  # needs a lookup
    result = await auth.authenticate(request)
    assert result.ok and result.failure is None and result.method == "kubernetes"
    identity = result.identity
    assert identity is not None
    assert identity.name == "system:serviceaccount:payments:checkout"
    assert (identity.namespace, identity.service_account) == ("payments", "checkout")
    assert identity.attributes["uid"] == "uid-checkout"
    assert identity.attributes["pod_name"] == "checkout-0"
    assert "system:serviceaccounts:payments" in identity.attributes["groups"]
    # now cached: answered synchronously, without another review
    assert auth.authenticate_now(request) is result
    assert tokenreview.reviews == 1


@pytest_twisted.ensureDeferred
async def test_unknown_and_expired_tokens_are_invalid(
        tokenreview: TokenReviewServer, auth: KubernetesAuth) -> None:  # noqa: F811
    """authenticated=false is 'invalid', with status.error turned into a reason code."""
    unknown = await auth.authenticate(bearer("eyJhbGciOi.unknown.token"))
    assert (unknown.failure, unknown.reason) == (INVALID, "invalid_token")
    expired = tokenreview.add_token(error="[invalid bearer token, Token has expired.]")
    result = await auth.authenticate(bearer(expired))
    assert (result.failure, result.reason, result.identity) == (INVALID, "expired", None)


@pytest_twisted.ensureDeferred
async def test_audience_mismatch_is_refused(tokenreview: TokenReviewServer,  # noqa: F811
                                            auth: KubernetesAuth) -> None:
    """Tokens for another audience are refused, also when the server ignores audiences."""
    other = tokenreview.add_token(audiences=("vault",))
    result = await auth.authenticate(bearer(other))
    assert (result.failure, result.reason) == (INVALID, "audience_mismatch")
    tokenreview.ignore_audiences = True
    # authenticated: true, but for the API server's audience, not ours
    token = tokenreview.add_token(audiences=("vault",))
    result = await auth.authenticate(bearer(token))
    assert (result.failure, result.reason) == (INVALID, "audience_mismatch")
    assert tokenreview.reviews == 2


@pytest_twisted.ensureDeferred
async def test_non_service_account_users_are_refused(
        tokenreview: TokenReviewServer, auth: KubernetesAuth) -> None:  # noqa: F811
    """A username that is not system:serviceaccount:NS:SA gives no workload identity."""
    token = tokenreview.add_token(username="alice@example.com")
    result = await auth.authenticate(bearer(token))
    assert (result.failure, result.reason) == (INVALID, "not_service_account")


@pytest.mark.parametrize("outage", ["stopped", "500", "timeout", "wrong_ca"])
@pytest_twisted.ensureDeferred
async def test_tokenreview_outage_fails_closed(reactor: Any, test_ca: TestCA, tmp_path: Path,
                                               outage: str) -> None:
    """Stopped, 500, too slow, or an untrusted certificate: 'unavailable', nothing cached."""
    server = TokenReviewServer(reactor, test_ca).start()
    other_ca = TestCA(tmp_path / "other-ca")
    # HostnameEndpoint reports a refused connection only after its 0.3 s
    # attempt delay, so only the hang case uses a timeout that short.
    timeout = 0.3 if outage == "timeout" else 1.0
    method = kubernetes_auth(server, tmp_path, timeout=timeout,
                             ca_file=other_ca.cert_path if outage == "wrong_ca" else None)
    token = server.add_token()
    try:
        if outage == "stopped":
            await server.stop()
        elif outage == "500":
            server.fail_with = 500
        elif outage == "timeout":
            server.hang = True
        started = reactor.seconds()
        result = await method.authenticate(bearer(token))
        assert result.failure == UNAVAILABLE and result.identity is None
        assert reactor.seconds() - started < timeout + 0.5
        expected = {"stopped": "network_", "500": "http_500", "timeout": "timeout",
                    "wrong_ca": "network_"}[outage]
        assert result.reason is not None and result.reason.startswith(expected)
        assert method.authenticate_now(bearer(token)) is None  # not cached
        if outage != "stopped":
            server.fail_with, server.hang = None, False
            if outage != "wrong_ca":
                assert (await method.authenticate(bearer(token))).ok
    finally:
        await method.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_breaker_opens_and_spares_the_server(reactor: Any,
                                                   tokenreview: TokenReviewServer,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """After 3 failures the breaker opens: later lookups fail fast and never reach the server."""
    breaker = CircuitBreaker("auth-test", reactor,
                             BreakerPolicy(failure_threshold=3, open_base=60.0))
    method = kubernetes_auth(tokenreview, tmp_path, breaker=breaker)
    try:
        tokenreview.fail_with = 503
        for _ in range(3):
            result = await method.authenticate(bearer(tokenreview.add_token()))
            assert (result.failure, result.reason) == (UNAVAILABLE, "http_503")
        assert breaker.state is BreakerState.OPEN and tokenreview.reviews == 3
        tokenreview.fail_with = None
        results = await gatherResults([method.authenticate(bearer(tokenreview.add_token()))
                                       for _ in range(5)])
        assert {(r.failure, r.reason) for r in results} == {(UNAVAILABLE, "breaker_open")}
        assert tokenreview.reviews == 3
        breaker.reset()
        assert (await method.authenticate(bearer(tokenreview.add_token()))).ok
        assert tokenreview.reviews == 4
    finally:
        await method.close()


@pytest_twisted.ensureDeferred
async def test_cache_repeat_single_flight_and_negative(
        tokenreview: TokenReviewServer, tmp_path: Path) -> None:  # noqa: F811
    """Repeats and concurrent duplicates cost one review; refusals are cached for negative_ttl."""
    clock = Clock()
    registry = CollectorRegistry()
    method = kubernetes_auth(tokenreview, tmp_path, clock=clock, cache_ttl=60.0,
                             negative_ttl=5.0, registry=registry)
    try:
        token = tokenreview.add_token()
        concurrent = [method.authenticate(bearer(token)) for _ in range(20)]
        results: list[AuthResult] = await gatherResults(concurrent)
        assert all(r.ok for r in results) and tokenreview.reviews == 1
        assert len({id(r) for r in results}) == 1
        for _ in range(5):
            assert method.authenticate_now(bearer(token)) is results[0]
        assert tokenreview.reviews == 1
        clock.advance(61)  # the positive TTL is over: asked again
        assert method.authenticate_now(bearer(token)) is None
        assert (await method.authenticate(bearer(token))).ok and tokenreview.reviews == 2

        bad = "eyJhbGciOi.not.known"
        first = await gatherResults([method.authenticate(bearer(bad)) for _ in range(3)])
        assert {r.failure for r in first} == {INVALID} and tokenreview.reviews == 3
        cached = method.authenticate_now(bearer(bad))
        assert cached is not None and cached.failure == INVALID and tokenreview.reviews == 3
        clock.advance(5.5)
        assert method.authenticate_now(bearer(bad)) is None
        await method.authenticate(bearer(bad))
        assert tokenreview.reviews == 4

        assert sample(registry, "appliance_auth_cache_total", result="miss") == 20 + 1 + 3 + 1
        assert sample(registry, "appliance_auth_cache_total", result="hit") == 5 + 1
        assert sample(registry, "appliance_auth_results_total",
                      method="kubernetes", result="ok") == 20 + 5 + 1
        assert sample(registry, "appliance_auth_tokenreview_seconds_count") == 4
    finally:
        await method.close()


@pytest_twisted.ensureDeferred
async def test_own_token_file_rotation(tokenreview: TokenReviewServer,  # noqa: F811
                                       tmp_path: Path) -> None:
    """The proxy's token file is re-read when it changes; a refused own token is 'unavailable'."""
    method = kubernetes_auth(tokenreview, tmp_path)
    try:
        assert (await method.authenticate(bearer(tokenreview.add_token()))).ok
        # the API server moves on to a new projected token before the file does
        old = tokenreview.caller_token
        tokenreview.caller_token = "proxy-rotated-" + old[-8:]
        result = await method.authenticate(bearer(tokenreview.add_token()))
        assert (result.failure, result.reason) == (UNAVAILABLE, "http_401")
        assert tokenreview.refused_callers == 1
        write_token_file(tmp_path / "sa-token", tokenreview.caller_token)
        assert (await method.authenticate(bearer(tokenreview.add_token()))).ok
        (tmp_path / "sa-token").unlink()
        method.client.own_token.forget()  # type: ignore[attr-defined]
        result = await method.authenticate(bearer(tokenreview.add_token()))
        assert (result.failure, result.reason) == (UNAVAILABLE, "own_token_unreadable")
    finally:
        await method.close()


@pytest_twisted.ensureDeferred
async def test_custom_header_and_sync_rejections(tokenreview: TokenReviewServer,  # noqa: F811
                                                 tmp_path: Path) -> None:
    """Oversize, malformed and wrong-scheme tokens are invalid at once, without a review."""
    method = kubernetes_auth(tokenreview, tmp_path, header=b"x-k8s-token")
    try:
        token = tokenreview.add_token()
        bare = AuthRequest(headers={b"x-k8s-token": token.encode()})
        assert (await method.authenticate(bare)).ok
        for value, reason in ((b"x" * (16 * 1024 + 1), "too_long"),
                              (b"Bearer a b", "malformed"), (b"", "malformed")):
            result = method.authenticate_now(AuthRequest(headers={b"x-k8s-token": value}))
            assert result is not None and (result.failure, result.reason) == (INVALID, reason)
        assert method.authenticate_now(bearer(token)).failure == "missing"  # type: ignore[union-attr]
        assert tokenreview.reviews == 1
    finally:
        await method.close()
    standard = kubernetes_auth(tokenreview, tmp_path)
    result = standard.authenticate_now(AuthRequest(headers={b"authorization": b"Basic Zm9v"}))
    assert result is not None and (result.failure, result.reason) == (INVALID, "bad_scheme")
    await standard.close()


def test_judge_edge_cases() -> None:
    """Answers that are not TokenReviews are the server's fault; odd users are refused."""
    from appliance.auth.tokenreview import ReviewUnavailable

    for body in (b"not json", b"[]", b'{"kind": "TokenReview"}'):
        with pytest.raises(ReviewUnavailable):
            judge(body, (AUDIENCE,))

    def status(**fields: Any) -> bytes:
        import json

        return json.dumps({"status": fields}).encode()

    user = {"username": "system:serviceaccount:ns:sa"}
    assert judge(status(authenticated=True, user=user), (AUDIENCE,)).reason == \
        "audience_mismatch"  # no status.audiences: the server ignored ours
    assert judge(status(authenticated=True, audiences=[AUDIENCE], user=user),
                 (AUDIENCE,)).identity is not None
    for name in ("system:serviceaccount:ns", "system:serviceaccount:NS:sa",
                 "system:serviceaccount:ns:sa:x", "system:serviceaccount::sa"):
        review = judge(status(authenticated=True, audiences=[AUDIENCE],
                              user={"username": name}), (AUDIENCE,))
        assert review.identity is None and review.reason == "bad_username"


@pytest_twisted.ensureDeferred
async def test_lookup_outlives_a_cancelled_request(reactor: Any,
                                                   tokenreview: TokenReviewServer,  # noqa: F811
                                                   auth: KubernetesAuth) -> None:
    """A client that goes away mid-review: the review finishes, is cached, and is no failure."""
    tokenreview.delay = 0.2
    token = tokenreview.add_token()
    pending = auth.authenticate(bearer(token))
    pending.cancel()
    with pytest.raises(CancelledError):
        await pending
    await wait_until(reactor, lambda: auth.authenticate_now(bearer(token)) is not None, 2.0)
    cached = auth.authenticate_now(bearer(token))
    assert cached is not None and cached.ok and tokenreview.reviews == 1
    assert auth.breaker.status()["consecutive_failures"] == 0
