"""
Tests for the Doppler, Vault and environment stores against the
Doppler- and Vault-compatible servers of tests/secret_servers.py on real
sockets (plain HTTP and TLS): happy paths, not found, refused tokens,
server errors, hangs, a stopped server, oversized answers, redirects and
path tricks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource

from appliance.host.secret import Secret
from appliance.secretproxy.secrets import (
    DopplerStore,
    EnvStore,
    SecretNotFound,
    StoreHTTP,
    StoreUnavailable,
    VaultStore,
)
from appliance.secretproxy.secrets.vault import split_name
from tests.harness.certs import TestCA
from tests.secret_servers import FakeDoppler, FakeVault, SecretServer

DOPPLER_TOKEN = "dp.st.prd." + "T" * 40
VAULT_TOKEN = "hvs." + "V" * 40
STRIPE = "sk_live_" + "S" * 30


async def failure_of(d: Deferred[Any]) -> BaseException:
    """The exception a Deferred fails with (the test fails if it succeeds)."""
    try:
        result = await d
    except Exception as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")


@pytest_twisted.async_yield_fixture
async def doppler(reactor: Any) -> AsyncIterator[SecretServer]:
    """A Doppler-compatible server with one service token and one secret."""
    fake = FakeDoppler()
    fake.service_tokens[DOPPLER_TOKEN] = ("payments", "prd")
    fake.set_secret("payments", "prd", "STRIPE_KEY", STRIPE)
    server = SecretServer(fake, reactor).start()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def vault(reactor: Any) -> AsyncIterator[SecretServer]:
    """A Vault-compatible server with one token and one KV v2 secret."""
    fake = FakeVault()
    fake.tokens.add(VAULT_TOKEN)
    fake.put("payments/stripe", {"api_key": STRIPE, "value": "default-key-value"})
    server = SecretServer(fake, reactor).start()
    yield server
    await server.stop()


def doppler_store(reactor: Any, server: SecretServer, timeout: float = 2.0,
                  token: str = DOPPLER_TOKEN, **kw: Any) -> DopplerStore:
    """A DopplerStore talking to C{server}."""
    return DopplerStore(StoreHTTP(reactor, timeout, kw.pop("ca_file", None)),
                        Secret("${env:DOPPLER_TOKEN}", token), server.url, **kw)


def vault_store(reactor: Any, server: SecretServer, timeout: float = 2.0,
                token: str = VAULT_TOKEN, **kw: Any) -> VaultStore:
    """A VaultStore talking to C{server}."""
    return VaultStore(StoreHTTP(reactor, timeout, kw.pop("ca_file", None)), server.url,
                      Secret("${env:VAULT_TOKEN}", token), **kw)


# -- Doppler -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_doppler_fetches_with_a_service_token(reactor: Any,
                                                    doppler: SecretServer) -> None:
    """The service token goes as a Bearer header; project/config are implied."""
    store = doppler_store(reactor, doppler)
    try:
        value = await store.fetch("STRIPE_KEY")
        assert value.value == STRIPE and value.version and value.version.startswith("h:")
        assert (await store.fetch("STRIPE_KEY")).version == value.version
        request = doppler.fake.requests[-1]
        assert request.path == "/v3/configs/config/secret"
        assert request.args == {"name": ["STRIPE_KEY"]}
        assert request.headers["authorization"] == f"Bearer {DOPPLER_TOKEN}"
        assert DOPPLER_TOKEN not in repr(store.__dict__)
        await store.check()
        assert doppler.fake.requests[-1].path == "/v3/me"
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_doppler_explicit_project_etag_and_wrapped_answer(
        reactor: Any, doppler: SecretServer) -> None:
    """Explicit project/config are sent; the ETag is the version; a wrapped answer works."""
    fake: FakeDoppler = doppler.fake  # type: ignore[assignment]
    fake.personal_tokens.add("dp.pt." + "P" * 40)
    fake.etag = True
    fake.wrap = True
    store = doppler_store(reactor, doppler, token="dp.pt." + "P" * 40,
                          project="payments", config="prd")
    try:
        value = await store.fetch("STRIPE_KEY")
        assert value.value == STRIPE and value.version == 'W/"1"'
        assert fake.requests[-1].args == {"name": ["STRIPE_KEY"], "project": ["payments"],
                                          "config": ["prd"]}
        fake.set_secret("payments", "prd", "STRIPE_KEY", STRIPE + "-new")
        value = await store.fetch("STRIPE_KEY")
        assert value.value == STRIPE + "-new" and value.version == 'W/"2"'
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_doppler_errors(reactor: Any, doppler: SecretServer) -> None:
    """404 is SecretNotFound; 401, 403 and 5xx are StoreUnavailable naming the status."""
    fake: FakeDoppler = doppler.fake  # type: ignore[assignment]
    store = doppler_store(reactor, doppler)
    wrong = doppler_store(reactor, doppler, token="dp.st.wrong")
    other = doppler_store(reactor, doppler, project="other", config="prd")
    try:
        assert isinstance(await failure_of(store.fetch("NOPE")), SecretNotFound)
        error = await failure_of(wrong.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "refused our token (401)" in str(error)
        assert "dp.st.wrong" not in str(error)
        error = await failure_of(other.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "(403)" in str(error)
        assert isinstance(await failure_of(wrong.check()), StoreUnavailable)
        fake.fail_with = 503
        error = await failure_of(store.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "server error (503)" in str(error)
    finally:
        for s in (store, wrong, other):
            await s.close()


@pytest_twisted.ensureDeferred
async def test_doppler_timeout_and_stopped_server(reactor: Any,
                                                  doppler: SecretServer) -> None:
    """A hung server times out; a server that stopped listening is unavailable."""
    store = doppler_store(reactor, doppler, timeout=0.3)
    try:
        doppler.fake.hang = True
        started = reactor.seconds()
        error = await failure_of(store.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "no answer within 0.3s" in str(error)
        assert reactor.seconds() - started < 2
        await doppler.stop()
        error = await failure_of(store.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "no answer" in str(error)
        doppler.fake.hang = False
        doppler.start()  # same port again
        assert (await store.fetch("STRIPE_KEY")).value == STRIPE
    finally:
        await store.close()


class _Odd(Resource):
    """Answers a huge body, a redirect, or non-JSON."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "huge"
        self.hits: list[str] = []

    def render_GET(self, request: Any) -> bytes:
        self.hits.append(request.path.decode())
        if request.path == b"/stolen":
            return b"{}"
        if self.mode == "redirect":
            request.redirect(b"/stolen")
            return b""
        if self.mode == "html":
            return b"<html>oops</html>"
        return b"x" * (1024 * 1024)


@pytest_twisted.ensureDeferred
async def test_oversized_redirected_and_garbled_answers(reactor: Any) -> None:
    """Bodies beyond max_body fail; redirects are not followed (no token to
    the target); non-JSON answers are StoreUnavailable."""
    odd = _Odd()
    server = SecretServer(odd, reactor).start()
    store = DopplerStore(StoreHTTP(reactor, 2.0, max_body=64 * 1024),
                         Secret("${env:T}", DOPPLER_TOKEN), server.url)
    try:
        error = await failure_of(store.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "larger than 65536" in str(error)
        odd.mode = "redirect"
        error = await failure_of(store.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "redirect (302)" in str(error)
        assert "/stolen" not in odd.hits
        odd.mode = "html"
        error = await failure_of(store.fetch("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "not JSON" in str(error)
    finally:
        await store.close()
        await server.stop()


# -- Vault -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_vault_reads_path_and_key(reactor: Any, vault: SecretServer) -> None:
    """PATH#KEY reads one key of a KV v2 secret; no #KEY reads 'value'; the
    version is the KV version."""
    fake: FakeVault = vault.fake  # type: ignore[assignment]
    store = vault_store(reactor, vault)
    try:
        value = await store.fetch("payments/stripe#api_key")
        assert value.value == STRIPE and value.version == "1"
        request = fake.requests[-1]
        assert request.path == "/v1/secret/data/payments/stripe"
        assert request.headers["x-vault-token"] == VAULT_TOKEN
        assert "x-vault-namespace" not in request.headers
        assert (await store.fetch("payments/stripe")).value == "default-key-value"
        fake.put("payments/stripe", {"api_key": STRIPE + "-v2"})
        value = await store.fetch("payments/stripe#api_key")
        assert value.value == STRIPE + "-v2" and value.version == "2"
        await store.check()
        assert fake.requests[-1].path == "/v1/auth/token/lookup-self"
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_vault_namespace_mount_and_errors(reactor: Any, vault: SecretServer) -> None:
    """The namespace header and mount are used; 404 and a missing key are
    SecretNotFound; a bad token is StoreUnavailable."""
    fake: FakeVault = vault.fake  # type: ignore[assignment]
    fake.namespace = "team-a"
    fake.mount = "kv/apps"
    fake.put("svc", {"token": "svc-token-1234"})
    store = vault_store(reactor, vault, namespace="team-a", mount="kv/apps")
    plain = vault_store(reactor, vault)
    wrong = vault_store(reactor, vault, token="hvs.wrong", namespace="team-a", mount="kv/apps")
    try:
        assert (await store.fetch("svc#token")).value == "svc-token-1234"
        assert fake.requests[-1].headers["x-vault-namespace"] == "team-a"
        assert fake.requests[-1].path == "/v1/kv/apps/data/svc"
        error = await failure_of(store.fetch("missing/path#k"))
        assert isinstance(error, SecretNotFound)
        error = await failure_of(store.fetch("svc#nokey"))
        assert isinstance(error, SecretNotFound) and "no key 'nokey'" in str(error)
        error = await failure_of(wrong.fetch("svc#token"))
        assert isinstance(error, StoreUnavailable) and "(403)" in str(error)
        assert isinstance(await failure_of(plain.fetch("svc#token")), StoreUnavailable)
    finally:
        for s in (store, plain, wrong):
            await s.close()


@pytest_twisted.ensureDeferred
async def test_vault_names_cannot_escape_the_mount(reactor: Any, vault: SecretServer) -> None:
    """'..', '.', empty segments and '#' with no key are refused before any request;
    other characters are percent-encoded within one segment."""
    store = vault_store(reactor, vault)
    before = len(vault.fake.requests)
    try:
        for name in ("../../sys/seal#x", "a/./b#k", "a//b#k", "/abs#k", "path#", "a b#k"):
            assert isinstance(await failure_of(store.fetch(name)), SecretNotFound), name
        assert len(vault.fake.requests) == before
        assert store.url("we?ird%2f/x#k").endswith("/v1/secret/data/we%3Fird%252f/x")
        assert split_name("a/b#k#2") == (["a", "b"], "k#2")
    finally:
        await store.close()


# -- TLS ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls_verified_with_the_configured_ca(reactor: Any, tmp_path: Path) -> None:
    """Over HTTPS the store trusts only the configured CA: the system roots refuse
    the test CA's certificate."""
    ca = TestCA(tmp_path / "ca")
    fake = FakeVault()
    fake.tokens.add(VAULT_TOKEN)
    fake.put("p", {"value": "tls-secret-value"})
    server = SecretServer(fake, reactor, ca=ca).start()
    trusted = vault_store(reactor, server, ca_file=str(ca.cert_path))
    untrusted = vault_store(reactor, server)
    try:
        assert server.url.startswith("https://localhost:")
        assert (await trusted.fetch("p")).value == "tls-secret-value"
        before = len(fake.requests)
        error = await failure_of(untrusted.fetch("p"))
        assert isinstance(error, StoreUnavailable) and "certificate verify failed" in str(error)
        assert len(fake.requests) == before  # the token never reached the server
    finally:
        await trusted.close()
        await untrusted.close()
        await server.stop()


def test_ca_bundle_errors(tmp_path: Path) -> None:
    """A missing or empty CA bundle is a clear error."""
    from appliance.secretproxy.secrets.http import load_ca_bundle

    with pytest.raises(ValueError, match="cannot read CA bundle"):
        load_ca_bundle(str(tmp_path / "missing.pem"))
    (tmp_path / "empty.pem").write_text("nothing here\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        load_ca_bundle(str(tmp_path / "empty.pem"))


# -- environment ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_env_store() -> None:
    """prefix + NAME upper-cased; unset or invalid names are SecretNotFound."""
    environ = {"APP_STRIPE_KEY": STRIPE, "APP_lower": "lower-value", "APP_EMPTY": ""}
    store = EnvStore(prefix="APP_", environ=environ)
    value = await store.fetch("stripe_key")
    assert value.value == STRIPE and value.version and value.version.startswith("h:")
    assert store.variable("stripe_key") == "APP_STRIPE_KEY"
    for name in ("missing", "empty", "bad-name", "a b"):
        assert isinstance(await failure_of(store.fetch(name)), SecretNotFound), name
    exact = EnvStore(prefix="APP_", environ=environ, uppercase=False)
    assert (await exact.fetch("lower")).value == "lower-value"
    environ["APP_STRIPE_KEY"] = STRIPE + "-rotated"
    assert (await store.fetch("stripe_key")).version != value.version
    await store.check()
    await store.close()
