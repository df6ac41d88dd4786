"""
End-to-end tests of the secret proxy, in-process on real sockets: a real
HTTPS upstream with its own CA recording exactly what it received, the
encrypted file store, session and Kubernetes (TokenReview-compatible
server) authentication, builtin rules and an OPA-compatible server, the
audit log, and a Doppler-compatible store for outages.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from appliance.http.errors import HTTPError
from appliance.secretproxy.config import Injection
from appliance.secretproxy.records import RequestIds
from appliance.secretproxy.routes import render_injection, strip_query_param
from appliance.secretproxy.upstreams import UpstreamRuntime
from tests.canary import CANARY, check_text
from tests.harness.certs import TestCA
from tests.http_upstream import start_upstream
from tests.inprocess import port_of, start_appliance, stop
from tests.policy_opa_server import FakeOPA
from tests.test_http_engine import raw, responses

SESSION = "session-secret-of-billing-0123456789"
OTHER_SESSION = "session-secret-of-reports-0123456789"


def upstream_tls(ca: TestCA, name: str = "api.upstream.test") -> Any:
    """A server context for the recording upstream, with a cert for C{name}."""
    issued = ca.issue(f"upstream-{name.replace('.', '-')}", dns=(name,))
    return issued.server_context()


def make_store(tmp_path: Path, secrets: dict[str, str]) -> tuple[Path, Path]:
    """An encrypted store holding C{secrets}, created with the real CLI."""
    store, key = tmp_path / "store.json", tmp_path / "store.key"
    cli = [sys.executable, "-m", "appliance.secretproxy.secrets.cli", "--store", str(store),
           "--key-file", str(key)]
    subprocess.run(cli + ["init"], check=True, capture_output=True, timeout=60)
    for name, value in secrets.items():
        subprocess.run(cli + ["put", name], input=value.encode(), check=True,
                       capture_output=True, timeout=60)
    return store, key


class Rig:
    """An appliance running the secret proxy in front of a recording HTTPS upstream."""

    def __init__(self, reactor: Any, tmp_path: Path, extra: str = "",
                 upstream_extra: str = "", secret_value: str = CANARY,
                 tls_name: str = "api.upstream.test", rules: str | None = None,
                 store: str | None = None) -> None:
        self.reactor = reactor
        self.tmp_path = tmp_path
        self.ca = TestCA(tmp_path / "ca")
        self.port, self.behaviour, self.recorder = start_upstream(reactor,
                                                                  upstream_tls(self.ca,
                                                                               tls_name))
        store_path, key_path = make_store(tmp_path, {"upstream-key": secret_value,
                                                     "crlf-key": "bad\r\nX-Evil: 1"})
        (tmp_path / "session").write_text(SESSION)
        (tmp_path / "session").chmod(0o600)
        (tmp_path / "other").write_text(OTHER_SESSION)
        (tmp_path / "other").chmod(0o600)
        (tmp_path / "audit").mkdir()
        self.audit_path = tmp_path / "audit" / "audit.jsonl"
        if rules is None:
            rules = textwrap.dedent("""
                [secretproxy.rule:no-admin]
                effect = deny
                path = /admin/**
                [secretproxy.rule:public]
                identity = billing
                path = /public/**, /v1/**, /echo/**, /status/**, /slow/**, /big/**
                [secretproxy.rule:reports-read]
                identity = reports
                method = GET
                """)
        store = store or f"store_path = {store_path}\nstore_key_file = {key_path}\n"
        self.root = start_appliance(reactor, tmp_path, textwrap.dedent(f"""
            [admin]
            listen = tcp:0:interface=127.0.0.1
            [audit]
            path = {self.audit_path}
            fsync = never
            [tls-client:upstreams]
            ca = {self.ca.cert_path}
            [secretproxy]
            listen = tcp:0:interface=127.0.0.1
            max_body = 64KiB
            """) + store + extra + textwrap.dedent(f"""
            [secretproxy.session:billing]
            secret = file:{tmp_path / 'session'}
            [secretproxy.session:reports]
            secret = file:{tmp_path / 'other'}
            [secretproxy.upstream:api]
            hosts = api.upstream.test
            path_prefix = /via-prefix
            host = api.upstream.test
            address = 127.0.0.1
            port = {self.port.getHost().port}
            tls_client = upstreams
            secret = upstream-key
            allow = loopback
            response_timeout = 500ms
            """) + upstream_extra + rules)
        self.proxy = port_of(self.root, "secretproxy")
        self.admin = port_of(self.root, "admin")

    async def get(self, path: str, headers: dict[str, str] | None = None,
                  method: str = "GET", data: bytes | None = None) -> tuple[int, bytes, Any]:
        """A request through the proxy (routed by X-Upstream-Host unless told otherwise)."""
        sent = {"X-Upstream-Host": "api.upstream.test", "X-Session-Secret": SESSION}
        sent.update(headers or {})
        sent = {k: v for k, v in sent.items() if v is not None}
        response = await treq.request(method, f"http://127.0.0.1:{self.proxy}{path}",
                                      headers=sent, data=data, timeout=10, persistent=False,
                                      allow_redirects=False)
        return response.code, await response.content(), response.headers

    def received(self) -> list[dict[str, Any]]:
        """What the upstream received (one record per request)."""
        return self.behaviour.requests

    async def close(self) -> None:
        """Stop everything."""
        await stop(self.root)
        await self.port.stopListening()


@pytest_twisted.async_yield_fixture
async def rig(reactor: Any, tmp_path: Path) -> Any:
    """The default rig."""
    setup = Rig(reactor, tmp_path)
    yield setup
    await setup.close()


async def metrics_text(rig: Rig) -> str:
    """The admin port's /metrics."""
    return (await (await treq.get(f"http://127.0.0.1:{rig.admin}/metrics")).content()).decode()


def header(record: dict[str, Any], name: str) -> list[str]:
    """Values of one header the upstream received."""
    return [value for key, value in record["headers"] if key == name]


@pytest_twisted.ensureDeferred
async def test_injects_the_secret_over_verified_tls(rig: Rig) -> None:
    """The upstream gets the secret in Authorization, with Host set to its configured name."""
    code, body, _ = await rig.get("/v1/charges?limit=3")
    assert code == 200, body
    [record] = rig.received()
    assert header(record, "authorization") == [f"Bearer {CANARY}"]
    assert header(record, "host") == [f"api.upstream.test:{rig.port.getHost().port}"]
    assert record["path"] == "/v1/charges?limit=3"
    for owned in ("x-session-secret", "x-upstream-host"):
        assert header(record, owned) == []


@pytest_twisted.ensureDeferred
async def test_routing_by_path_prefix(rig: Rig) -> None:
    """Without the routing header, a configured path prefix selects the upstream."""
    code, _, _ = await rig.get("/via-prefix/v1/x", {"X-Upstream-Host": None})
    assert code == 200
    assert rig.received()[0]["path"] == "/v1/x"


@pytest.mark.parametrize("host", [
    "api.upstream.test.evil.test", "api.upstream.test@evil.test", "127.0.0.1.nip.io",
    "evil.test", "api.upstream.test#x", "api.upstream.test, evil.test",
    "api.upstream.test%2eevil.test",
])
@pytest_twisted.ensureDeferred
async def test_look_alike_hosts_are_refused(rig: Rig, host: str) -> None:
    """Hosts that merely resemble the configured one get 400/403 and nothing is sent."""
    code, body, _ = await rig.get("/v1/x", {"X-Upstream-Host": host})
    assert code in (400, 403)
    assert b"upstream.test" not in body and b"upstream-key" not in body
    assert rig.received() == []


@pytest_twisted.ensureDeferred
async def test_host_matching_normalises_case_dot_and_port(rig: Rig) -> None:
    """Case, a trailing dot and the default port are normalised before the exact match."""
    for host in ("API.Upstream.Test", "api.upstream.test.", "api.upstream.test:443"):
        code, _, _ = await rig.get("/v1/x", {"X-Upstream-Host": host})
        assert code == 200, host


@pytest_twisted.ensureDeferred
async def test_authentication_failures_are_401_without_detail(rig: Rig) -> None:
    """Missing or wrong session secrets: 401, the same body, nothing forwarded."""
    missing = await rig.get("/v1/x", {"X-Session-Secret": None})
    wrong = await rig.get("/v1/x", {"X-Session-Secret": "wrong-" + SESSION})
    assert missing[0] == wrong[0] == 401
    assert missing[1] == wrong[1]
    assert rig.received() == []


@pytest_twisted.ensureDeferred
async def test_policy_decides_on_the_normalised_path_and_is_audited(rig: Rig) -> None:
    """/public/..%2Fadmin is /admin for policy and upstream alike; decisions are audited."""
    code, _, _ = await rig.get("/public/..%2Fadmin/keys")
    assert code == 403
    code, _, _ = await rig.get("/public/%2e%2e/admin")
    assert code == 403
    code, _, _ = await rig.get("/public/ok")
    assert code == 200
    assert [r["path"] for r in rig.received()] == ["/public/ok"]
    code, _, _ = await rig.get("/other", {"X-Session-Secret": OTHER_SESSION}, method="POST")
    assert code == 403
    await rig.root.runtime.audit.flush()
    lines = [json.loads(line) for line in rig.audit_path.read_text().splitlines()]
    decisions = [(line["identity"], line["decision"]) for line in lines
                 if line.get("event") == "secretproxy.decision"]
    assert decisions == [("billing", "deny"), ("billing", "deny"), ("billing", "allow"),
                         ("reports", "deny")]
    assert all({"upstream", "method", "reason", "duration"} <= set(line) for line in lines
               if line.get("event") == "secretproxy.decision")
    assert CANARY not in rig.audit_path.read_text()


async def decision_records(rig: Rig) -> list[dict[str, Any]]:
    """The audit log's decision records so far."""
    await rig.root.runtime.audit.flush()
    return [record for record in map(json.loads, rig.audit_path.read_text().splitlines())
            if record.get("event") == "secretproxy.decision"]


@pytest_twisted.ensureDeferred
async def test_a_request_id_is_kept_passed_on_returned_and_audited(rig: Rig) -> None:
    """A caller's plain X-Request-Id reaches the upstream once, comes back, and is audited."""
    code, _, headers = await rig.get("/v1/x", {"X-Request-Id": "job-42.retry_1"})
    assert code == 200
    [record] = rig.received()
    assert header(record, "x-request-id") == ["job-42.retry_1"]
    assert headers.getRawHeaders("x-request-id") == ["job-42.retry_1"]
    [decision] = await decision_records(rig)
    assert decision["request_id"] == "job-42.retry_1" and decision["decision"] == "allow"


@pytest_twisted.ensureDeferred
async def test_a_request_id_is_minted_when_missing_or_not_plain(rig: Rig) -> None:
    """
    No ID, one with spaces, one too long, or one that is a known secret: the
    proxy mints its own, unique per request, and uses it everywhere.
    """
    for supplied in (None, "has space", "x" * 65, SESSION):
        code, _, headers = await rig.get("/v1/x", {"X-Request-Id": supplied})
        assert code == 200
    sent = [header(record, "x-request-id") for record in rig.received()]
    assert all(len(ids) == 1 for ids in sent)
    minted = [ids[0] for ids in sent]
    assert len(set(minted)) == 4 and SESSION not in minted and "has space" not in minted
    decisions = await decision_records(rig)
    assert [d["request_id"] for d in decisions] == minted
    assert SESSION not in rig.audit_path.read_text()


@pytest_twisted.ensureDeferred
async def test_local_answers_carry_the_request_id_and_the_upstreams_own_wins(rig: Rig
                                                                              ) -> None:
    """A 401 from the proxy carries the ID; an upstream's own X-Request-Id is not doubled."""
    code, _, headers = await rig.get("/v1/x", {"X-Session-Secret": "wrong-" + SESSION,
                                              "X-Request-Id": "req-401"})
    assert code == 401 and headers.getRawHeaders("x-request-id") == ["req-401"]
    code, _, headers = await rig.get("/v1/own-id", {"X-Request-Id": "req-mine"})
    assert code == 200
    assert headers.getRawHeaders("x-request-id") == ["upstream-own-id"]
    assert header(rig.received()[-1], "x-request-id") == ["req-mine"]


@pytest_twisted.ensureDeferred
async def test_access_log_when_switched_on(reactor: Any, tmp_path: Path) -> None:
    """access_log = true: one line per routed request, the path without its query."""
    rig = Rig(reactor, tmp_path, extra="access_log = true\n")
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "appliance.secretproxy.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        assert (await rig.get("/v1/charges?api_key=zzz", {"X-Request-Id": "acc-1"}))[0] == 200
        assert (await rig.get("/admin/x", {"X-Request-Id": "acc-2"}))[0] == 403
        assert (await rig.get("/v1/x", {"X-Session-Secret": "nope"}))[0] == 401
    finally:
        globalLogPublisher.removeObserver(observe)
        await rig.close()
    lines = [formatEvent(event) for event in events]
    assert len(lines) == 3
    assert lines[0].startswith("GET /v1/charges 200 api billing ")
    assert lines[0].endswith("request_id=acc-1")
    assert lines[1].startswith("GET /admin/x 403 api billing ")
    assert lines[2].startswith("GET /v1/x 401 api - ")
    assert events[0]["decision"] == "allow" and events[1]["decision"] == "deny"
    assert events[0]["response_bytes"] > 0 and events[0]["client"] == "127.0.0.1"
    assert not any("zzz" in line for line in lines)


@pytest_twisted.ensureDeferred
async def test_client_credentials_and_connection_tricks_never_reach_upstream(rig: Rig
                                                                             ) -> None:
    """The client's Authorization, Proxy-Authorization, cookies, and a Connection header
    naming the injected header cannot displace or leak around the injection."""
    request = (b"GET /v1/trick HTTP/1.1\r\nHost: proxy\r\nX-Upstream-Host: api.upstream.test\r\n"
               b"X-Session-Secret: " + SESSION.encode() + b"\r\n"
               b"Authorization: Bearer client-own\r\nProxy-Authorization: Basic Zm9v\r\n"
               b"Cookie: s=1\r\nConnection: close, Authorization\r\n\r\n")
    [(head, _)] = responses(await raw(rig.reactor, rig.proxy, request))
    assert head.status == 200
    [record] = rig.received()
    assert header(record, "authorization") == [f"Bearer {CANARY}"]
    assert header(record, "proxy-authorization") == [] and header(record, "cookie") == []
    assert b"client-own" not in rig.recorder.raw


@pytest_twisted.ensureDeferred
async def test_redirect_to_metadata_is_passed_back_not_followed(rig: Rig) -> None:
    """An upstream 302 to 169.254.169.254 goes back to the client; the proxy follows nothing."""
    code, _, headers = await rig.get("/status/302")
    assert code == 302
    assert headers.getRawHeaders("location")[0].startswith("http://169.254.169.254")
    assert [r["path"] for r in rig.received()] == ["/status/302"]


@pytest_twisted.ensureDeferred
async def test_tls_name_mismatch_is_502_and_nothing_is_sent(reactor: Any,
                                                           tmp_path: Path) -> None:
    """An upstream whose certificate names another host: 502, the secret never sent."""
    rig = Rig(reactor, tmp_path, tls_name="someone-else.test")
    try:
        code, body, _ = await rig.get("/v1/x")
        assert code == 502
        assert rig.received() == [] and rig.recorder.raw == b""
        assert ('appliance_secretproxy_upstream_failures_total{kind="tls",upstream="api"} 1.0'
                in await metrics_text(rig))
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_an_upstream_outage_is_counted_and_logged_once(reactor: Any,
                                                             tmp_path: Path) -> None:
    """
    Every request fails while the upstream is down (502), each is counted by
    kind, and the log gets one line for the outage, not one per request.
    """
    rig = Rig(reactor, tmp_path)
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if text.startswith("secretproxy: upstream api:"):
            logged.append(text)

    globalLogPublisher.addObserver(observe)
    try:
        await rig.port.stopListening()
        codes = [(await rig.get(f"/v1/{number}"))[0] for number in range(20)]
        assert codes == [502] * 20
        assert ('appliance_secretproxy_upstream_failures_total{kind="unreachable",'
                'upstream="api"} 20.0' in await metrics_text(rig))
        assert len(logged) == 1 and "upstream unreachable" in logged[0]
        rig.root.hosted[0].warnings.flush()  # what stopping does: the summary line
        assert len(logged) == 2 and "(19 more like this in the last 10s)" in logged[1]
    finally:
        globalLogPublisher.removeObserver(observe)
        await stop(rig.root)


@pytest_twisted.ensureDeferred
async def test_slow_upstream_is_504(rig: Rig) -> None:
    """No response head within response_timeout: 504."""
    code, _, _ = await rig.get("/slow/3")
    assert code == 504
    assert ('appliance_secretproxy_upstream_failures_total{kind="timeout",upstream="api"} 1.0'
            in await metrics_text(rig))


@pytest_twisted.ensureDeferred
async def test_crlf_in_a_secret_is_never_sent(reactor: Any, tmp_path: Path) -> None:
    """A secret with CR/LF is refused before anything reaches the upstream."""
    rig = Rig(reactor, tmp_path)
    try:
        pipeline = rig.root.hosted[0].pipeline
        upstream = pipeline.upstreams["api"]
        from attrs import evolve
        pipeline.upstreams["api"] = evolve(upstream, config=evolve(upstream.config,
                                                                     secret="crlf-key"))
        code, _, _ = await rig.get("/v1/x")
        assert code == 502
        assert rig.received() == []
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_egress_to_loopback_needs_an_explicit_allow(reactor: Any,
                                                         tmp_path: Path) -> None:
    """Without allow = loopback, an upstream resolving to 127.0.0.1 is refused (502)."""
    rig = Rig(reactor, tmp_path)
    try:
        from appliance.http.egress import EgressPolicy

        upstream = rig.root.hosted[0].pipeline.upstreams["api"]
        upstream.resolver.policy = EgressPolicy()
        upstream.resolver.clear()
        code, _, _ = await rig.get("/v1/x")
        assert code == 502
        assert rig.received() == []
    finally:
        await rig.close()


@pytest.mark.parametrize("injection", ["header", "query", "basic"])
@pytest_twisted.ensureDeferred
async def test_a_secret_echoed_by_the_upstream_never_reaches_the_client(
        reactor: Any, tmp_path: Path, injection: str) -> None:
    """
    An upstream that redirects to the request's own URL (the injected query
    key included) or echoes the Authorization it got: the client sees the
    redirect and the header, with the secret masked in every spelling.
    """
    extra = {"header": "", "query": "inject = query\nquery_param = key\n",
             "basic": "inject = basic\nbasic_user = api\n"}[injection]
    rig = Rig(reactor, tmp_path, upstream_extra=extra)
    try:
        code, _, headers = await rig.get("/v1/echo-back?a=1")
        assert code == 302
        location = headers.getRawHeaders("location")[0]
        echoed = headers.getRawHeaders("x-echo-authorization")[0]
        received = rig.received()[0]
        if injection == "query":
            assert CANARY in received["path"] and "[REDACTED]" in location
        else:
            assert header(received, "authorization") and "[REDACTED]" in echoed
        basic = base64.b64encode(f"api:{CANARY}".encode()).decode()
        for text in (location, echoed):
            assert CANARY not in text and basic not in text
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_basic_and_query_injection(reactor: Any, tmp_path: Path) -> None:
    """Basic auth and query parameter injection; a client's own parameter is dropped."""
    rig = Rig(reactor, tmp_path, upstream_extra="inject = query\nquery_param = key\n")
    try:
        code, _, _ = await rig.get("/v1/q?key=client-value&a=1")
        assert code == 200
        record = rig.received()[0]
        assert "client-value" not in record["path"]
        assert record["path"].startswith("/v1/q?a=1&key=")
        # Other spellings of the name decode to it upstream: dropped as well.
        for spelling in ("%6Bey", "k%65y", "%6b%65%79"):
            code, _, _ = await rig.get(f"/v1/q?{spelling}=client-value&a=1")
            assert code == 200
            path = rig.received()[-1]["path"]
            assert "client-value" not in path and path.startswith("/v1/q?a=1&key="), path
    finally:
        await rig.close()
    basic = Rig(reactor, tmp_path / "b", upstream_extra="inject = basic\nbasic_user = api\n")
    try:
        assert (await basic.get("/v1/b"))[0] == 200
        value = header(basic.received()[0], "authorization")[0]
        assert base64.b64decode(value.split()[1]).decode() == f"api:{CANARY}"
    finally:
        await basic.close()


@pytest_twisted.ensureDeferred
async def test_rate_limits_answer_429_with_headers(reactor: Any, tmp_path: Path) -> None:
    """Past the identity limit: 429 with Retry-After and RateLimit headers."""
    rig = Rig(reactor, tmp_path, extra="identity_rate_limit = 2/m\n")
    try:
        assert (await rig.get("/v1/1"))[0] == 200
        assert (await rig.get("/v1/2"))[0] == 200
        code, _, headers = await rig.get("/v1/3")
        assert code == 429
        assert headers.getRawHeaders("retry-after") and headers.getRawHeaders("ratelimit")
        assert len(rig.received()) == 2
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_oversized_requests(rig: Rig) -> None:
    """Bodies over max_body get 413; heads over the limit 431; nothing forwarded."""
    code, _, _ = await rig.get("/v1/post", method="POST", data=b"x" * 70_000)
    assert code == 413
    big_head = await raw(rig.reactor, rig.proxy, b"GET / HTTP/1.1\r\nHost: p\r\nX-A: "
                         + b"a" * 20_000 + b"\r\n\r\n")
    assert big_head.startswith(b"HTTP/1.1 431 ")
    assert rig.received() == []


@pytest_twisted.ensureDeferred
async def test_smuggling_through_the_proxy_is_400(rig: Rig) -> None:
    """Conflicting framing never reaches the upstream."""
    data = await raw(rig.reactor, rig.proxy,
                     b"POST /v1/x HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: api.upstream.test\r\n"
                     b"X-Session-Secret: " + SESSION.encode() + b"\r\n"
                     b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert rig.received() == []


@pytest_twisted.ensureDeferred
async def test_opa_down_fails_closed(reactor: Any, tmp_path: Path) -> None:
    """With OPA as the policy, an unreachable OPA means 403 (fail closed)."""
    opa = FakeOPA(reactor, policy=lambda document: True).start()
    rig = Rig(reactor, tmp_path, extra=f"policy = opa\nopa_url = {opa.url}\n"
              "opa_path = secretproxy/allow\nopa_timeout = 300ms\n", rules="")
    try:
        assert (await rig.get("/v1/x"))[0] == 200
        await opa.stop()
        code, _, _ = await rig.get("/v1/other-path")  # not in OPA's decision cache
        assert code == 403
        assert len(rig.received()) == 1
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_store_down_with_and_without_fallback(reactor: Any, tmp_path: Path) -> None:
    """Doppler down: served from the encrypted fallback when one exists, else 503; a
    fallback older than max stale is refused (503)."""
    from tests.secret_servers import FakeDoppler, SecretServer

    doppler = FakeDoppler()
    doppler.set_secret("proj", "prd", "upstream-key", CANARY)
    doppler.service_tokens["dp.st.test-token-0123456789"] = ("proj", "prd")
    server = SecretServer(doppler, reactor).start()
    token = tmp_path / "doppler-token"
    token.write_text("dp.st.test-token-0123456789")
    token.chmod(0o600)
    fallback_key = tmp_path / "fallback.key"
    fallback_key.write_bytes(base64.b64encode(b"k" * 32))
    fallback_key.chmod(0o600)
    store = (f"store = doppler\ndoppler_url = {server.url}\ndoppler_token = file:{token}\n"
             f"secret_cache_ttl = 1s\n"
             f"store_timeout = 300ms\nfallback_dir = {tmp_path / 'fallback'}\n"
             f"fallback_key_file = {fallback_key}\nfallback_max_stale = 2s\n")
    rig = Rig(reactor, tmp_path / "rig", store=store)
    try:
        code, body, _ = await rig.get("/v1/warm")
        assert code == 200, body
        await deferLater(reactor, 1.2, lambda: None)  # the memory cache expires
        await server.stop()
        code, _, _ = await rig.get("/v1/from-fallback")
        assert code == 200
        assert header(rig.received()[-1], "authorization") == [f"Bearer {CANARY}"]
        await deferLater(reactor, 2.5, lambda: None)  # past max stale
        code, _, _ = await rig.get("/v1/too-stale")
        assert code == 503
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_drain_lets_in_flight_requests_finish(rig: Rig) -> None:
    """Shutdown with a request in flight: it completes, then the appliance stops."""
    pending = ensureDeferred(rig.get("/slow/0.3"))
    await deferLater(rig.reactor, 0.1, lambda: None)
    stopping = rig.root.stopService()
    code, body, _ = await pending
    assert code == 200 and body == b"slow\n"
    await stopping


@pytest_twisted.ensureDeferred
async def test_reload_changes_rules_without_dropping_requests(rig: Rig) -> None:
    """SIGHUP-style reload: a new rule table applies to new requests; an in-flight request
    finishes."""
    config = rig.tmp_path / "appliance.ini"
    pending = ensureDeferred(rig.get("/slow/0.3"))
    await deferLater(rig.reactor, 0.1, lambda: None)
    text = config.read_text().replace("path = /public/**, /v1/**",
                                      "path = /public/**, /echo/**")
    config.write_text(text)
    await rig.root.reload()
    assert (await pending)[0] == 200
    assert (await rig.get("/v1/now-denied"))[0] == 403
    assert (await rig.get("/public/still"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_connection_limit_and_its_reload(reactor: Any, tmp_path: Path) -> None:
    """
    Beyond max_connections a client gets 503 (counted, nothing forwarded); a
    reload that raises the limit applies to the next connection, and new
    pool limits apply to the upstream pool.
    """
    import socket

    rig = Rig(reactor, tmp_path, extra="max_connections = 2\npool_idle = 8\n")
    held = []
    try:
        for _ in range(2):
            held.append(socket.create_connection(("127.0.0.1", rig.proxy), timeout=10))
        await deferLater(reactor, 0.05, lambda: None)
        code, _, _ = await rig.get("/v1/x")
        assert code == 503 and rig.received() == []
        assert ('appliance_secretproxy_refused_total{reason="too_many_connections"} 1.0'
                in await metrics_text(rig))
        config = rig.tmp_path / "appliance.ini"
        config.write_text(config.read_text().replace("max_connections = 2",
                                                     "max_connections = 5")
                          .replace("pool_idle = 8", "pool_idle = 2"))
        await rig.root.reload()
        assert (await rig.get("/v1/x"))[0] == 200
        assert rig.root.hosted[0].pool.max_idle == 2  # the pool limits follow too
    finally:
        for sock in held:
            sock.close()
        await rig.close()


@pytest.mark.parametrize("policy", ["deny", "allow"])
@pytest_twisted.ensureDeferred
async def test_an_audit_log_that_refuses_lines(reactor: Any, tmp_path: Path,
                                               policy: str) -> None:
    """
    The audit log refuses lines (here: stopped): by default an allowed request
    is then refused with 503 and nothing is forwarded, since every decision
    must be on record; with on_audit_failure = allow it goes through and the
    failure is counted.
    """
    rig = Rig(reactor, tmp_path, extra=f"on_audit_failure = {policy}\n")
    try:
        assert (await rig.get("/v1/before"))[0] == 200
        await rig.root.runtime.audit.stopService()
        code, _, _ = await rig.get("/v1/after")
        metrics = await metrics_text(rig)
        if policy == "deny":
            assert code == 503
            assert [r["path"] for r in rig.received()] == ["/v1/before"]
            assert ('appliance_secretproxy_refused_total{reason="audit_unavailable"} 1.0'
                    in metrics)
        else:
            assert code == 200
            assert [r["path"] for r in rig.received()] == ["/v1/before", "/v1/after"]
        assert "appliance_secretproxy_audit_failures_total 1.0" in metrics
        assert (await rig.get("/admin/x"))[0] == 403  # a denial stays a denial
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_metrics_and_status_hold_no_secrets(rig: Rig) -> None:
    """Metrics carry bounded labels and no secret; /status shows the upstream table."""
    await rig.get("/v1/x")
    await rig.get("/v1/y", {"X-Session-Secret": "nope"})
    await rig.get("/v1/z", {"X-Upstream-Host": "evil.test"})
    metrics = (await (await treq.get(f"http://127.0.0.1:{rig.admin}/metrics")).content()
               ).decode()
    status = (await (await treq.get(f"http://127.0.0.1:{rig.admin}/status")).content()
              ).decode()
    assert 'appliance_secretproxy_request_seconds_count{class="2xx",upstream="api"}' in metrics
    assert 'appliance_secretproxy_refused_total{reason="unauthenticated"} 1.0' in metrics
    assert 'appliance_secretproxy_refused_total{reason="unknown_upstream"} 1.0' in metrics
    assert "evil.test" not in metrics
    assert "/v1/x" not in metrics and "127.0.0.1:" not in metrics.split("appliance_tls")[0]
    assert '"api"' in status
    for text in (metrics, status):
        assert CANARY not in text and SESSION not in text
        check_text(text, "secretproxy metrics/status")


@pytest_twisted.ensureDeferred
async def test_kubernetes_workload_identity(reactor: Any, tmp_path: Path) -> None:
    """A service-account token validated by TokenReview (with audiences) authenticates;
    the namespace reaches policy; TokenReview down means 503 (fail closed)."""
    from tests.tokenreview_server import AUDIENCE, TokenReviewServer, write_token_file

    server = TokenReviewServer(reactor, TestCA(tmp_path / "k8s-ca")).start()
    token_file = write_token_file(tmp_path / "sa-token", server.caller_token)
    rules = textwrap.dedent("""
        [secretproxy.rule:payments]
        namespace = payments
        path = /v1/**
        """)
    rig = Rig(reactor, tmp_path / "rig", rules=rules,
              extra=f"kubernetes_api = {server.url}\nkubernetes_ca = {server.ca.cert_path}\n"
                    f"kubernetes_token_file = {token_file}\n"
                    f"kubernetes_audiences = {AUDIENCE}\nkubernetes_timeout = 500ms\n",
              upstream_extra="auth = kubernetes, session\n")
    try:
        payments = server.add_token(namespace="payments", service_account="api")
        other = server.add_token(namespace="other", service_account="api")
        bearer = {"X-Session-Secret": None}
        code, _, _ = await rig.get("/v1/k", {**bearer, "Authorization": f"Bearer {payments}"})
        assert code == 200
        assert header(rig.received()[0], "authorization") == [f"Bearer {CANARY}"]
        code, _, _ = await rig.get("/v1/k", {**bearer, "Authorization": f"Bearer {other}"})
        assert code == 403
        code, _, _ = await rig.get("/v1/k", {**bearer, "Authorization": "Bearer forged"})
        assert code == 401
        await server.stop()
        fresh = "never-seen-" + payments[-8:]
        code, _, _ = await rig.get("/v1/k", {**bearer, "Authorization": f"Bearer {fresh}"})
        assert code == 503
    finally:
        await rig.close()
        await server.stop()


def _runtime(kind: str) -> Any:
    """An upstream runtime for api.test over https with C{kind} injection."""
    injection = Injection(kind=kind, header=b"authorization", template="Bearer {secret}",
                          basic_user="u", query_param="api key")
    config = SimpleNamespace(authority=b"api.test", injection=injection, port=443,
                             host="api.test", scheme="https")
    return UpstreamRuntime(config=config, authenticator=None, resolver=None,  # type: ignore[arg-type]
                           bulkhead=None, drop=frozenset(), client_tls=None)


def test_injection_is_rendered_once_per_current_value() -> None:
    """The current secret's rendering is reused; a rotation replaces it; CR/LF always refuse."""
    upstream = _runtime("header")
    first = upstream.injection("s1")
    assert first == (None, b"authorization: Bearer s1")
    assert upstream.injection("s1") is first
    assert upstream.injection("s2") == (None, b"authorization: Bearer s2")
    for _ in range(2):
        with pytest.raises(HTTPError):
            upstream.injection("bad\r\nX-Evil: 1")
    assert upstream.injection("s2") == (None, b"authorization: Bearer s2")
    query = _runtime("query")
    assert query.injection("a&b") == (render_injection(query.config, "a&b"), None)
    assert upstream.host_line == b"Host: api.test"
    assert upstream.target("10.0.0.1") is upstream.target("10.0.0.1")
    assert upstream.target("10.0.0.1").server_name == "api.test"


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=100), repeated=st.booleans())
def test_request_id_from_any_header_value(value: bytes, repeated: bool) -> None:
    """Whatever a client sends, the ID is plain: its own when plain and sent once, else new."""
    ids = RequestIds()
    head = SimpleNamespace(fields={b"x-request-id": value},
                           repeated=frozenset({b"x-request-id"}) if repeated else frozenset())
    request_id = ids.for_request(head)
    assert re.fullmatch(rb"[A-Za-z0-9._-]{1,64}", request_id)
    minted = re.fullmatch(rb"[0-9a-f]{16}-1", request_id) is not None
    plain = re.fullmatch(rb"[A-Za-z0-9._-]{1,64}", value) is not None
    if plain and not repeated:  # kept, unless it holds a secret the process knows
        assert request_id == value or minted
    else:
        assert minted
    assert ids.mint() != ids.mint()



@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.tuples(st.text(max_size=6), st.booleans(), st.text(max_size=6)),
                      max_size=6),
       name=st.sampled_from(["key", "api_key", "api key", "ключ"]))
def test_a_clients_own_query_parameter_is_dropped_however_spelled(
        parts: list[tuple[str, bool, str]], name: str) -> None:
    """After stripping, no parameter decodes to the injected one's name; others stay."""
    from urllib.parse import parse_qsl, quote_plus

    encoded = []
    for key, quoted, value in parts:
        key = name if key == "" else key
        encoded.append((quote_plus(key) if quoted else quote(key, safe="")) + "=" + value)
    query = "&".join(encoded).encode("utf-8")
    stripped = strip_query_param(query, name)
    remaining = parse_qsl((stripped or b"").decode("utf-8"), keep_blank_values=True)
    assert all(key != name for key, _ in remaining)
    expected = [pair for pair in parse_qsl(query.decode("utf-8"), keep_blank_values=True)
                if pair[0] != name]
    assert remaining == expected
