"""
Client-certificate identities from real certificates issued by the test CA,
including one taken from a live TLS connection through the host's
C{peer_identity}.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from appliance.auth import INVALID, MISSING, AuthRequest, MTLSAuth
from appliance.host.tls import peer_identity
from appliance.host.tls_identity import identity_of
from tests.harness.certs import TestCA


def request_for(ca: TestCA, name: str, **names: Any) -> AuthRequest:
    """A request whose peer identity comes from a freshly issued client certificate."""
    issued = ca.issue(name, client=True, server=False, **names)
    return AuthRequest(headers={}, peer_identity=identity_of(issued.certificate),
                       peer_address="127.0.0.1")


def test_spiffe_id_gives_namespace_and_service_account(tmp_path: Any) -> None:
    """spiffe://td/ns/NS/sa/SA names the workload; it wins over DNS names and the CN."""
    ca = TestCA(tmp_path)
    auth = MTLSAuth()
    result = auth.authenticate_now(request_for(
        ca, "w1", uris=("https://example.org/x", "spiffe://prod.example/ns/payments/sa/api"),
        dns=("api.payments.svc",)))
    identity = result.identity
    assert identity is not None and result.method == "mtls"
    assert identity.name == "spiffe://prod.example/ns/payments/sa/api"
    assert (identity.namespace, identity.service_account) == ("payments", "api")
    assert identity.attributes == {"source": "spiffe", "trust_domain": "prod.example"}
    other = auth.authenticate_now(request_for(ca, "w2", uris=("spiffe://prod.example/worker",)))
    assert other.identity is not None and other.identity.namespace is None


def test_dns_then_common_name(tmp_path: Any) -> None:
    """Without a SPIFFE ID the first DNS name names the caller, else the CN."""
    ca = TestCA(tmp_path)
    auth = MTLSAuth()
    by_dns = auth.authenticate_now(request_for(ca, "d", dns=("Batch.Example.ORG", "b2")))
    assert by_dns.identity is not None and by_dns.identity.name == "batch.example.org"
    by_cn = auth.authenticate_now(request_for(ca, "cn-only", common_name="legacy-client"))
    assert by_cn.identity is not None and by_cn.identity.name == "legacy-client"
    assert by_cn.identity.attributes["source"] == "cn"


def test_trust_domains_and_missing_certificate(tmp_path: Any) -> None:
    """With trust domains, other domains and non-SPIFFE certificates are invalid."""
    ca = TestCA(tmp_path)
    auth = MTLSAuth(trust_domains=("prod.example",))
    assert auth.authenticate_now(request_for(
        ca, "ok", uris=("spiffe://prod.example/ns/a/sa/b",))).ok
    for name, names in (("foreign", {"uris": ("spiffe://evil.example/ns/a/sa/b",)}),
                        ("dns", {"dns": ("a.example",)})):
        result = auth.authenticate_now(request_for(ca, name, **names))
        assert (result.failure, result.reason) == (INVALID, "no_usable_name")
    assert auth.authenticate_now(AuthRequest(headers={})).failure == MISSING


class _Holder(Protocol):
    def __init__(self, ready: Deferred[Any]) -> None:
        self.ready = ready

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self.ready.called:
            self.ready.callback(peer_identity(self.transport))


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class _Context:
    """A TLS context from cryptography objects, verifying the peer against the CA."""

    def __init__(self, ca: TestCA, issued: Any, server: bool) -> None:
        self._server = server
        context = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
        context.use_certificate(issued.certificate)
        context.use_privatekey(issued.private_key)
        context.load_verify_locations(str(ca.cert_path))
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                           lambda conn, cert, errno, depth, ok: bool(ok))
        self._context = context

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:  # noqa: N802
        return SSL.Connection(self._context, None)

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:  # noqa: N802
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


@pytest_twisted.ensureDeferred
async def test_identity_from_a_live_mtls_connection(reactor: Any, tmp_path: Any) -> None:
    """A real TLS handshake with a client certificate: peer_identity -> MTLSAuth identity."""
    ca = TestCA(tmp_path)
    server_cert = ca.issue("server", dns=("localhost",), ips=("127.0.0.1",))
    client_cert = ca.issue("client", client=True, server=False,
                           uris=("spiffe://prod.example/ns/jobs/sa/runner",))
    seen: Deferred[Any] = Deferred()
    port = await SSL4ServerEndpoint(reactor, 0, _Context(ca, server_cert, True),
                                    interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: _Holder(seen)))
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port,
                                  _Context(ca, client_cert, False))
    client = await endpoint.connect(Factory.forProtocol(Protocol))
    try:
        client.transport.write(b"hello")
        peer = await seen
        result = MTLSAuth().authenticate_now(AuthRequest(headers={}, peer_identity=peer))
        assert result.identity is not None
        assert result.identity.name == "spiffe://prod.example/ns/jobs/sa/runner"
        assert (result.identity.namespace, result.identity.service_account) == ("jobs", "runner")
    finally:
        client.transport.loseConnection()
        await port.stopListening()
