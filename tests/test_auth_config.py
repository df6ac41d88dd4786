"""
Reading authentication settings from a service section: defaults, a full
configuration built into working methods, and every problem reported at once.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client import CollectorRegistry

from appliance.auth import (
    AuthConfig,
    AuthRequest,
    KubernetesAuth,
    build_authenticators,
    parse_auth,
)
from appliance.host.ini import ConfigReader, read_ini
from tests.harness.certs import TestCA
from tests.tokenreview_server import (
    TokenReviewServer,
    bearer,
    tokenreview,  # noqa: F401 - fixture
    write_token_file,
)

ALICE = "alice-session-secret-0123456789"


def parse(tmp_path: Path, text: str, environ: dict[str, str] | None = None
          ) -> tuple[AuthConfig, list[str]]:
    """Parse [svc] from an ini text; return the config and the problems as text."""
    path = tmp_path / "appliance.ini"
    path.write_text(textwrap.dedent(text))
    problems: list[Any] = []
    reader = ConfigReader(read_ini(str(path), problems), problems,
                          environ if environ is not None else {"ALICE": ALICE})
    config = parse_auth(reader.section("svc"))
    reader.finish()
    return config, [str(problem) for problem in problems]


def test_defaults(tmp_path: Path) -> None:
    """An empty section: the default session header, no sessions, no TokenReview."""
    config, problems = parse(tmp_path, "[svc]\n")
    assert problems == []
    assert config == AuthConfig(service="svc")
    methods = build_authenticators(config, None, None, None, None)
    assert set(methods) == {"mtls"}


@pytest_twisted.ensureDeferred
async def test_full_configuration_builds_working_methods(
        reactor: Any, tokenreview: TokenReviewServer, tmp_path: Path) -> None:  # noqa: F811
    """Sessions, TokenReview (relative paths) and trust domains all end up in the methods."""
    write_token_file(tmp_path / "sa" / "token", tokenreview.caller_token)
    (tmp_path / "sa" / "ca.crt").write_bytes(tokenreview.ca.cert_pem)
    config, problems = parse(tmp_path, f"""
        [svc]
        session_header = X-Workload-Secret
        kubernetes_api = {tokenreview.url}/
        kubernetes_ca = sa/ca.crt
        kubernetes_token_file = sa/token
        kubernetes_audiences = secretproxy, other
        kubernetes_timeout = 500ms
        kubernetes_cache_ttl = 30s
        kubernetes_negative_ttl = 2s
        mtls_trust_domains = Prod.Example
        [svc.session:batch-job]
        secret = ${{env:ALICE}}
        namespace = jobs
        service_account = batch
    """)
    assert problems == []
    assert config.session_header == b"x-workload-secret"
    k8s = config.kubernetes
    assert k8s is not None and k8s.api == tokenreview.url
    assert k8s.ca == str(tmp_path / "sa" / "ca.crt")
    assert (k8s.audiences, k8s.timeout, k8s.cache_ttl, k8s.negative_ttl) == (
        ("secretproxy", "other"), 0.5, 30.0, 2.0)
    assert config.mtls_trust_domains == ("prod.example",)
    assert ALICE not in repr(config)
    registry = CollectorRegistry()
    methods = build_authenticators(config, reactor, reactor, registry, None)
    assert set(methods) == {"mtls", "session", "kubernetes"}
    session = methods["session"].authenticate_now(
        AuthRequest(headers={b"x-workload-secret": ALICE.encode()}))
    assert session is not None and session.identity is not None
    assert (session.identity.name, session.identity.namespace) == ("batch-job", "jobs")
    kubernetes = methods["kubernetes"]
    assert isinstance(kubernetes, KubernetesAuth)
    try:
        result = await kubernetes.authenticate(bearer(tokenreview.add_token()))
        assert result.ok
        assert registry.get_sample_value("appliance_breaker_state",
                                         {"breaker": "auth_svc_kubernetes"}) == 0
    finally:
        await kubernetes.close()


def test_every_problem_at_once(tmp_path: Path) -> None:
    """Bad URL, missing audiences, weak/duplicate/missing secrets, bad names: one report."""
    _, problems = parse(tmp_path, """
        [svc]
        session_header = bad header
        kubernetes_api = http://apiserver
        kubernetes_ca = /nonexistent/ca.crt
        kubernetes_timeout = soon
        mtls_trust_domains = spiffe://x
        [svc.session:a]
        secret = ${env:ALICE}
        [svc.session:b]
        secret = ${env:ALICE}
        [svc.session:weak]
        secret = ${env:WEAK}
        [svc.session:c]
        secret = ${env:UNSET}
        namespace = Not_A_Namespace
        colour = blue
        [svc.session:bad name]
        secret = ${env:OTHER}
    """, {"ALICE": ALICE, "WEAK": "short", "OTHER": "other-secret-0123456789"})
    text = "\n".join(problems)
    for expected in ("session_header: expected an HTTP header name",
                     "kubernetes_api: expected an https:// URL",
                     "kubernetes_timeout: expected a duration",
                     "mtls_trust_domains: expected SPIFFE trust domains",
                     "[svc.session:b] secret: the same secret as [svc.session:a]",
                     "[svc.session:weak] secret: a session secret needs at least 16",
                     "[svc.session:c] secret: environment variable UNSET is not set",
                     "[svc.session:c] namespace: expected a Kubernetes namespace",
                     "[svc.session:c] colour: unknown key",
                     "[svc.session:bad name]: an identity name is"):
        assert expected in text, expected
    assert ALICE not in text


def test_kubernetes_needs_audiences_and_a_ca(tmp_path: Path) -> None:
    """kubernetes_api without audiences or with an unreadable CA; k8s keys without the API."""
    _, problems = parse(tmp_path, """
        [svc]
        kubernetes_api = https://10.96.0.1:443
        kubernetes_ca = missing.crt
        kubernetes_header = x-session-secret
    """)
    text = "\n".join(problems)
    assert "kubernetes_audiences: is required with kubernetes_api" in text
    assert f"kubernetes_ca: cannot read a PEM certificate from {tmp_path}/missing.crt" in text
    assert "kubernetes_header: is the same header as session_header" in text
    _, problems = parse(tmp_path, "[svc]\nkubernetes_audiences = x\nkubernetes_cache_ttl = 1s\n")
    assert len(problems) == 2 and all("has no effect without kubernetes_api" in p
                                      for p in problems)


def test_relative_ca_path_is_checked(tmp_path: Path) -> None:
    """A readable CA next to the config file is accepted."""
    ca = TestCA(tmp_path / "pki")
    config, problems = parse(tmp_path, """
        [svc]
        kubernetes_api = https://kubernetes.default.svc
        kubernetes_ca = pki/ca.crt
        kubernetes_audiences = secretproxy
    """)
    assert problems == []
    assert config.kubernetes is not None and config.kubernetes.ca == str(ca.cert_path)
    assert config.kubernetes.token_file == (
        "/var/run/secrets/kubernetes.io/serviceaccount/token")
