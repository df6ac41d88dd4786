"""
Tests for the OPA client and the opa/both modes, against an OPA-compatible
server on a real socket (tests/policy_opa_server.py: the real OPA cannot run here).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import Agent

from appliance.host.secret import Secret
from appliance.policy import (
    UNAVAILABLE,
    OPAConfig,
    OPAError,
    Policy,
    PolicyConfig,
    PolicyDecision,
    PolicyInput,
    Rule,
    build_policy,
)
from appliance.policy.opa import parse_answer
from appliance.resilience import BreakerPolicy
from tests.canary import CANARY
from tests.policy_opa_server import FakeOPA

ALICE_GET = PolicyInput("alice", "stripe", "GET", "/v1/charges/ch_1", "payments", "api",
                        {"tenant": "t1"})
ALICE_POST = PolicyInput("alice", "stripe", "POST", "/v1/charges")
BOB = PolicyInput("bob", "stripe", "GET", "/v1/charges")
CAROL = PolicyInput("carol", "stripe", "GET", "/v1/charges")


@pytest_twisted.async_yield_fixture
async def opa(reactor: Any) -> AsyncIterator[FakeOPA]:
    """A running OPA-compatible server, stopped after the test; no timer may be left behind."""
    before = set(reactor.getDelayedCalls())
    server = FakeOPA(reactor).start()
    yield server
    await server.stop()
    await deferLater(reactor, 0, lambda: None)  # let aborted connections finish closing
    left = [call for call in reactor.getDelayedCalls() if call not in before
            and not getattr(call.func, "__module__", "").startswith("pytest_twisted")]
    assert left == [], left


@asynccontextmanager
async def policy_for(server: FakeOPA, mode: str = "opa", clock: Any = None,
                     rules: tuple[Rule, ...] = (), timeout: float = 2.0, ttl: float = 5.0,
                     breaker: BreakerPolicy | None = None, token: Secret | None = None,
                     registry: CollectorRegistry | None = None,
                     http: Any = None) -> AsyncIterator[Policy]:
    """A Policy asking ``server``; its connections are closed afterwards."""
    from twisted.internet import reactor

    config = PolicyConfig(mode, rules, OPAConfig(server.url, "secretproxy/allow", timeout,
                                                 token, ttl, 100))
    policy = build_policy(config, clock if clock is not None else reactor, reactor,
                          registry if registry is not None else CollectorRegistry(),
                          "secretproxy", breaker_policy=breaker, http=http)
    try:
        yield policy
    finally:
        await policy.close()


async def until(condition: Any, limit: float = 5.0) -> None:
    """Let the reactor run until ``condition()`` holds (bounded)."""
    from twisted.internet import reactor

    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await deferLater(reactor, 0.005, lambda: None)


@pytest_twisted.ensureDeferred
async def test_allow_and_deny_via_opa(opa: FakeOPA) -> None:
    """Boolean and object results, and undefined, become decisions; OPA sees the document."""
    async with policy_for(opa) as policy:
        assert await policy.decide(ALICE_GET) == PolicyDecision(True, "allowed by opa", "opa")
        assert await policy.decide(ALICE_POST) == PolicyDecision(False, "denied by opa", "opa")
        assert await policy.decide(BOB) == PolicyDecision(False, "bob is suspended", "opa")
        assert await policy.decide(CAROL) == PolicyDecision(False, "opa result undefined",
                                                            "opa")
    assert opa.requests[0] == {
        "identity": "alice", "namespace": "payments", "service_account": "api",
        "upstream": "stripe", "method": "GET", "path": "/v1/charges/ch_1",
        "attributes": {"tenant": "t1"}}
    assert len(opa.requests) == 4 and opa.authorizations == [None] * 4


@pytest_twisted.ensureDeferred
async def test_repeated_identical_inputs_are_served_from_the_cache(opa: FakeOPA) -> None:
    """One request for repeated questions; decide_now answers cached ones without a Deferred."""
    async with policy_for(opa) as policy:
        assert policy.decide_now(ALICE_GET) is None
        assert (await policy.decide(ALICE_GET)).source == "opa"
        for _ in range(3):
            assert await policy.decide(ALICE_GET) == PolicyDecision(True, "allowed by opa",
                                                                    "cache")
        assert policy.decide_now(ALICE_GET) == PolicyDecision(True, "allowed by opa", "cache")
        assert len(opa.requests) == 1
        assert (await policy.decide(ALICE_POST)).source == "opa"  # another question
        assert len(opa.requests) == 2


@pytest_twisted.ensureDeferred
async def test_concurrent_identical_inputs_share_one_request(opa: FakeOPA) -> None:
    """N concurrent identical questions make one request (single flight); all get the answer."""
    opa.mode = "slow"
    async with policy_for(opa) as policy:
        waiting = [policy.decide(ALICE_GET) for _ in range(20)]
        other = policy.decide(ALICE_POST)
        await until(lambda: len(opa.requests) == 2)
        assert not any(d.called for d in waiting)
        opa.release()
        decisions = await gatherResults(waiting)
        assert (await other).allowed is False
    assert decisions == [PolicyDecision(True, "allowed by opa", "opa")] * 20
    assert len(opa.requests) == 2


@pytest_twisted.ensureDeferred
async def test_cache_entries_expire_after_the_ttl(opa: FakeOPA) -> None:
    """With a fake clock: the answer is reused until the TTL passes, then asked again."""
    clock = Clock()
    async with policy_for(opa, clock=clock, ttl=5.0) as policy:
        await policy.decide(ALICE_GET)
        clock.advance(4.9)
        assert (await policy.decide(ALICE_GET)).source == "cache"
        clock.advance(0.1)
        assert policy.decide_now(ALICE_GET) is None
        assert (await policy.decide(ALICE_GET)).source == "opa"
    assert len(opa.requests) == 2
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_zero_ttl_caches_nothing(opa: FakeOPA) -> None:
    """opa_cache_ttl = 0 asks every time (concurrent questions still share a request)."""
    async with policy_for(opa, clock=Clock(), ttl=0.0) as policy:
        for _ in range(3):
            assert (await policy.decide(ALICE_GET)).source == "opa"
        assert policy.decide_now(ALICE_GET) is None
    assert len(opa.requests) == 3


@pytest_twisted.ensureDeferred
async def test_timeout_fails_closed(opa: FakeOPA) -> None:
    """An OPA that does not answer within the timeout means deny, not an exception."""
    opa.mode = "slow"
    async with policy_for(opa, timeout=0.2) as policy:
        started = time.monotonic()
        assert await policy.decide(ALICE_GET) is UNAVAILABLE
        assert 0.15 < time.monotonic() - started < 3
        assert policy.decide_now(ALICE_GET) is None  # failures are not cached
        assert policy.readiness() == (False, "policy engine unreachable")
    await until(lambda: not opa._held)  # the client hung up


@pytest_twisted.ensureDeferred
async def test_server_error_fails_closed_and_is_not_cached(opa: FakeOPA) -> None:
    """A 500 means deny; the next question asks again; the outage and the return log once."""
    opa.mode = "fail"
    async with policy_for(opa) as policy:
        with capturedLogs() as events:
            assert await policy.decide(ALICE_GET) == PolicyDecision(
                False, "policy unavailable", "error")
            assert await policy.decide(ALICE_GET) is UNAVAILABLE
            assert policy.opa is not None
            assert policy.opa.status()["last_error"] == "OPA answered HTTP 500"
            opa.mode = "ok"
            assert (await policy.decide(ALICE_GET)).allowed
    assert len(opa.requests) == 3
    texts = [formatEvent(e) for e in events if e.get("log_namespace", "").endswith("OPAClient")]
    assert texts == [
        f"policy policy-secretproxy: OPA at {opa.url} failed (OPA answered HTTP 500); "
        "denying until it answers",
        f"policy policy-secretproxy: OPA at {opa.url} answers again",
    ]


@pytest_twisted.ensureDeferred
async def test_garbage_fails_closed(opa: FakeOPA) -> None:
    """A 200 whose body is not JSON means deny."""
    opa.mode = "garbage"
    async with policy_for(opa) as policy:
        assert await policy.decide(ALICE_GET) is UNAVAILABLE


@pytest_twisted.ensureDeferred
async def test_server_down_fails_closed(opa: FakeOPA) -> None:
    """A refused connection (and a dropped kept-alive one) means deny."""
    async with policy_for(opa) as policy:
        assert (await policy.decide(ALICE_GET)).allowed
        await opa.stop()
        assert await policy.decide(ALICE_POST) is UNAVAILABLE
        assert (await policy.check()) is False


@pytest_twisted.ensureDeferred
async def test_breaker_opens_then_recovers_when_the_server_is_back(opa: FakeOPA) -> None:
    """After repeated failures no request is made; once OPA is back a probe closes it."""
    clock = Clock()
    breaker = BreakerPolicy(failure_threshold=3, failure_ratio=None, open_base=10.0)
    async with policy_for(opa, clock=clock, breaker=breaker) as policy:
        assert (await policy.check()) is True
        opa.mode = "fail"
        for _ in range(3):
            assert await policy.decide(ALICE_GET) is UNAVAILABLE
        assert len(opa.requests) == 3
        asked = len(opa.requests), opa.health_checks
        for _ in range(5):  # fast fail, nothing reaches the server
            assert await policy.decide(ALICE_GET) is UNAVAILABLE
        assert policy.readiness() == (False, "policy engine unreachable (circuit open)")
        assert (len(opa.requests), opa.health_checks) == asked
        await opa.stop()
        opa.start()  # back on the same port, healthy
        opa.mode = "ok"
        clock.advance(10.0)
        assert await policy.decide(ALICE_GET) == PolicyDecision(True, "allowed by opa", "opa")
        assert len(opa.requests) == 4
        assert policy.readiness() == (True, "")
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_readiness_probes_health_without_traffic(opa: FakeOPA) -> None:
    """Readiness starts probes itself, so a service without traffic still sees OPA return."""
    clock = Clock()
    async with policy_for(opa, clock=clock) as policy:
        assert policy.readiness() == (False, "policy engine not checked yet")
        await until(lambda: policy.readiness() == (True, ""))
        assert opa.health_checks == 1 and opa.requests == []
        opa.mode = "fail"
        clock.advance(5.0)  # the last outcome is now stale: the next poll probes
        assert policy.readiness() == (True, "")
        await until(lambda: policy.readiness() == (False, "policy engine unreachable"))
        opa.mode = "ok"
        await until(lambda: policy.readiness() == (True, ""))


@pytest_twisted.ensureDeferred
async def test_both_mode_needs_both_to_allow(opa: FakeOPA) -> None:
    """The rules go first; OPA is asked only when they allow, and must allow too."""
    rules = (Rule("no-refunds", effect="deny", path=["/v1/refunds/**"]),
             Rule("stripe", upstream=["stripe"]))
    async with policy_for(opa, mode="both", rules=rules) as policy:
        refund = PolicyInput("alice", "stripe", "GET", "/v1/refunds/r1")
        assert policy.decide_now(refund) == PolicyDecision(False, "no-refunds", "rules")
        assert await policy.decide(refund) == PolicyDecision(False, "no-refunds", "rules")
        github = PolicyInput("alice", "github", "GET", "/repos")
        assert (await policy.decide(github)).reason == "no rule matched"
        assert opa.requests == []  # OPA was never asked
        assert policy.decide_now(ALICE_GET) is None
        assert await policy.decide(ALICE_GET) == PolicyDecision(True, "allowed by opa", "opa")
        assert policy.decide_now(ALICE_GET) == PolicyDecision(True, "allowed by opa", "cache")
        assert await policy.decide(ALICE_POST) == PolicyDecision(False, "denied by opa", "opa")
        assert len(opa.requests) == 2
        opa.mode = "fail"
        assert await policy.decide(BOB) is UNAVAILABLE


@pytest_twisted.ensureDeferred
async def test_opa_mode_refuses_unnormalised_paths_without_asking(opa: FakeOPA) -> None:
    """The input check applies in every mode."""
    async with policy_for(opa) as policy:
        raw = PolicyInput("alice", "stripe", "GET", "/public/..%2Fadmin")
        assert policy.decide_now(raw) == PolicyDecision(False, "path not normalised", "rules")
        assert (await policy.decide(raw)).reason == "path not normalised"
    assert opa.requests == []


@pytest_twisted.ensureDeferred
async def test_bearer_token_is_sent_and_never_logged(opa: FakeOPA) -> None:
    """The token (the session canary) reaches OPA; failures are logged without it."""
    token = Secret("${env:APPLIANCE_TEST_CANARY}", CANARY)
    async with policy_for(opa, token=token) as policy:
        await policy.decide(ALICE_GET)
        opa.mode = "fail"
        await policy.decide(ALICE_POST)
        assert CANARY not in repr(policy.status())
    assert opa.authorizations == [f"Bearer {CANARY}"] * 2


@pytest_twisted.ensureDeferred
async def test_a_cancelled_question_does_not_count_against_opa(opa: FakeOPA) -> None:
    """The caller may cancel; it gets CancelledError and the breaker sees no failure."""
    opa.mode = "slow"
    async with policy_for(opa) as policy:
        waiting = policy.decide(ALICE_GET)
        await until(lambda: len(opa.requests) == 1)
        waiting.cancel()
        with pytest.raises(CancelledError):
            await waiting
        assert policy.opa is not None
        assert policy.opa.breaker.status()["consecutive_failures"] == 0


@pytest_twisted.ensureDeferred
async def test_a_dropped_kept_alive_connection_is_retried_once(opa: FakeOPA) -> None:
    """A POST that failed before any answer (stale pooled connection) is asked again."""
    from twisted.internet import reactor

    agent: Any = Agent(reactor)
    real = HTTPClient(agent)

    class FlakyOnce:
        """Fails the first request like a connection the server had closed."""

        calls = 0

        def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            self.calls += 1
            if self.calls == 1:
                return fail(ResponseNeverReceived([Failure(ConnectionDone())]))
            return real.request(*args, **kwargs)

    flaky = FlakyOnce()
    async with policy_for(opa, http=flaky) as policy:
        assert (await policy.decide(ALICE_GET)).allowed
    assert flaky.calls == 2 and len(opa.requests) == 1


@pytest_twisted.ensureDeferred
async def test_decision_metrics(opa: FakeOPA) -> None:
    """Decisions are counted by decision and source, and timed by source."""
    registry = CollectorRegistry()
    async with policy_for(opa, registry=registry) as policy:
        await policy.decide(ALICE_GET)
        await policy.decide(ALICE_GET)
        policy.decide_now(ALICE_GET)
        await policy.decide(ALICE_POST)
        opa.mode = "fail"
        await policy.decide(BOB)

    def count(decision: str, source: str) -> float | None:
        return registry.get_sample_value("appliance_policy_decisions_total", {
            "service": "secretproxy", "decision": decision, "source": source})

    assert (count("allow", "opa"), count("allow", "cache"), count("deny", "opa"),
            count("deny", "error"), count("allow", "rules")) == (1, 2, 1, 1, 0)
    assert registry.get_sample_value("appliance_policy_decision_seconds_count", {
        "service": "secretproxy", "source": "cache"}) == 2
    assert registry.get_sample_value("appliance_policy_decision_seconds_bucket", {
        "service": "secretproxy", "source": "opa", "le": "+Inf"}) == 2
    assert registry.get_sample_value("appliance_cache_hits_total",
                                     {"cache": "policy-secretproxy"}) == 2
    assert registry.get_sample_value("appliance_breaker_state",
                                     {"breaker": "policy-secretproxy"}) == 0


# -- answers, without a server ---------------------------------------------------


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'"x"', b'{"result": "yes"}', b'{"result": 1}',
    b'{"result": {"allow": "true"}}', b'{"result": {"allow": null}}', b"\xff\xfe",
    b"[" * 100000,
])
def test_malformed_answers_are_errors(body: bytes) -> None:
    """Anything but a boolean or an object with a boolean allow is an OPAError."""
    with pytest.raises(OPAError):
        parse_answer(body, ALICE_GET)


def test_answers_and_reasons() -> None:
    """Undefined denies; a reason is kept only if short, plain and free of request data."""
    def decision(body: bytes) -> PolicyDecision:
        return parse_answer(body, ALICE_GET).fresh

    assert decision(b"{}") == PolicyDecision(False, "opa result undefined", "opa")
    assert decision(b'{"result": {}}').reason == "opa result undefined"
    assert decision(b'{"result": true, "decision_id": "x"}').allowed is True
    assert decision(b'{"result": {"allow": true, "reason": "tier gold"}}') == \
        PolicyDecision(True, "tier gold", "opa")
    for reason in ("denied for alice", "path /v1/charges/ch_1", "x" * 65, "a\nb", 7,
                   "charges blocked", "payments is frozen"):
        body = b'{"result": {"allow": false, "reason": %s}}' % repr(reason).replace(
            "'", '"').encode()
        assert decision(body).reason in ("denied by opa",), reason
