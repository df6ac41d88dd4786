"""
The canary: session secrets, client tokens and the proxy's own token never
appear in log events, metric output, results or status pages, on any path
(success, refusal, outage, timeout, Redis down, unexpected errors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs, formatEvent

from appliance.auth import (
    Authenticator,
    AuthRequest,
    KubernetesAuth,
    Review,
    build_authenticators,
    parse_auth,
)
from appliance.host.ini import ConfigReader, read_ini
from tests import canary
from tests.harness.ports import free_port
from tests.test_auth_redis import link_to
from tests.tokenreview_server import (
    TokenInfo,
    TokenReviewServer,
    bearer,
    kubernetes_auth,
    tokenreview,  # noqa: F401 - fixture
)


def event_text(event: dict[str, Any]) -> str:
    """Everything an observer could write for an event."""
    text = formatEvent(event) + json.dumps(event, default=repr)
    failure = event.get("log_failure")
    if failure is not None:
        text += failure.getTraceback()
    return text


class ExplodingReviews:
    """A client whose errors quote the token, as a careless library might."""

    url = b"https://exploding"
    audiences: tuple[str, ...] = ("secretproxy",)

    def review(self, token: bytes) -> Deferred[Review]:
        """Fail with the token in the message."""
        return fail(RuntimeError(f"could not review {token.decode()}"))

    def close(self) -> Deferred[None]:
        """Nothing to close."""
        return fail(RuntimeError("never called"))


@pytest_twisted.ensureDeferred
async def test_no_credential_leaks_anywhere(reactor: Any,
                                            tokenreview: TokenReviewServer,  # noqa: F811
                                            tmp_path: Path) -> None:
    """Drive every path with the canary as secret and token; scan logs, metrics, results."""
    secret_token = canary.CANARY + "-token"
    tokenreview.tokens[secret_token] = TokenInfo("payments", "api")
    unknown_token = canary.CANARY + "-unknown"
    ini = tmp_path / "a.ini"
    ini.write_text(f"[svc]\n[svc.session:batch]\nsecret = ${{env:{canary.CANARY_ENV}}}\n")
    problems: list[Any] = []
    reader = ConfigReader(read_ini(str(ini), problems), problems)
    config = parse_auth(reader.section("svc"))
    assert problems == []
    registry = CollectorRegistry()
    session = build_authenticators(config, reactor, reactor, registry, None)["session"]
    link = link_to(reactor, free_port())  # Redis down
    k8s = kubernetes_auth(tokenreview, tmp_path, timeout=0.3, registry=registry, redis=link)
    exploding = KubernetesAuth(ExplodingReviews(), reactor, registry=registry,
                               instance="auth_exploding")
    chain = Authenticator([session, k8s])
    results: list[Any] = []
    try:
        with capturedLogs() as events:
            results.append(chain.authenticate_now(
                AuthRequest(headers={b"x-session-secret": canary.CANARY.encode()})))
            results.append(chain.authenticate_now(
                AuthRequest(headers={b"x-session-secret": canary.CANARY.encode() + b"x"})))
            results.append(await chain.authenticate(bearer(secret_token)))
            results.append(await chain.authenticate(bearer(unknown_token)))
            for mode in ("fail", "hang", "own_token"):
                tokenreview.fail_with = 500 if mode == "fail" else None
                tokenreview.hang = mode == "hang"
                if mode == "own_token":
                    tokenreview.caller_token += "-rotated"
                results.append(await chain.authenticate(bearer(unknown_token + mode)))
            results.append(await exploding.authenticate(bearer(secret_token)))
        assert results[0].ok and results[2].ok
        assert [r.failure for r in results[1:]] == [
            "invalid", None, "invalid", "unavailable", "unavailable", "unavailable",
            "unavailable"]
        outputs = [event_text(event) for event in events]
        outputs.append(generate_latest(registry).decode())
        outputs += [repr(result) for result in results]
        outputs += [json.dumps(m.status(), default=repr) for m in (session, k8s, exploding)]
        outputs.append(repr(config))
        assert len(outputs) > 10
        for needle in (canary.CANARY, tokenreview.caller_token):
            leaked = [text for text in outputs if needle in text]
            assert leaked == [], leaked[:1]
        assert any("TokenReview is unavailable" in text for text in outputs)
    finally:
        await k8s.close()
        d = link.stopService()
        if d is not None:
            await d
