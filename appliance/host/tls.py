"""
Shared TLS: server contexts that can be swapped while connections live,
the host-side TLS wrapper for listeners, and client connection creators for
upstreams.

A listener never holds an C{SSL.Context} itself: each new connection asks
its L{ServerContext} for the current one, so a reload (SIGHUP or a changed
file) affects new connections only and live ones keep theirs.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from appliance.host.log_throttle import LogThrottle
from appliance.host.tls_config import (
    AllowedClient,
    ClientTLSConfig,
    ServerMaterial,
    ServerTLSConfig,
    load_server_material,
)
from appliance.host.tls_identity import PeerIdentity, identity_of

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


def build_server_context(config: ServerTLSConfig, material: ServerMaterial) -> SSL.Context:
    """An OpenSSL server context from validated material."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(_VERSIONS[config.min_version])
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | SSL.OP_NO_RENEGOTIATION)
    context.use_certificate(material.chain[0])
    for intermediate in material.chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(material.key)  # type: ignore[arg-type]
    context.check_privatekey()
    # Needed for session resumption when client certificates are requested.
    context.set_session_id(b"appliance-" + config.name.encode()[:20])
    if config.client_auth != "none":
        store = context.get_cert_store()
        assert store is not None
        for ca in material.client_cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
        context.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject()
                                    for ca in material.client_cas])
        mode = SSL.VERIFY_PEER
        if config.client_auth == "require":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode, _allowlist_check(config.allowed_clients))
    if config.alpn:
        offered = [protocol.encode() for protocol in config.alpn]

        def select(connection: SSL.Connection, protocols: list[bytes]) -> bytes:
            for protocol in offered:
                if protocol in protocols:
                    return protocol
            return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

        context.set_alpn_select_callback(select)
    return context


def _allowlist_check(allowed: tuple[AllowedClient, ...]) -> Any:
    def verify(connection: SSL.Connection, certificate: crypto.X509, errno: int,
               depth: int, ok: int) -> bool:
        if not ok:
            _note_refusal(connection, "verify")
            return False
        if depth != 0 or not allowed:
            return True
        identity = identity_of(certificate.to_cryptography())
        if identity.allowed_by(allowed):
            return True
        _note_refusal(connection, "not_allowed")
        return False

    return verify


def _note_refusal(connection: SSL.Connection, reason: str) -> None:
    protocol = connection.get_app_data()
    if isinstance(protocol, HostTLSProtocol):
        protocol.refusal = reason


@implementer(IOpenSSLServerConnectionCreator)
class ServerContext:
    """
    A named server TLS context whose certificate can be replaced at run time.
    """

    log = Logger()

    def __init__(self, config: ServerTLSConfig, material: ServerMaterial) -> None:
        self.name = config.name
        self.config = config
        self.material = material
        self._context = build_server_context(config, material)
        self.reloads = 0

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection on the current context, linked to its protocol."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(protocol)
        return connection

    def replace(self, config: ServerTLSConfig, material: ServerMaterial) -> None:
        """Use new material for new connections; live ones keep theirs."""
        context = build_server_context(config, material)
        self.config, self.material, self._context = config, material, context
        self.reloads += 1
        self.log.info("tls:{context}: new certificate in use, valid until {until}",
                      context=self.name, until=material.not_after.isoformat())

    def reload_from_disk(self) -> None:
        """Re-read the files (blocking: call from a thread) and swap."""
        material = load_server_material(self.config)
        self.replace(self.config, material)


class HostTLSProtocol(BufferingTLSTransport):
    """
    TLS with a handshake deadline and one log line per refused handshake,
    naming the reason but nothing the peer sent.
    """

    refusal: str | None = None
    _deadline: Any = None
    factory: HostTLSFactory

    def makeConnection(self, transport: Any) -> None:
        # (TLSMemoryBIOProtocol calls connectionMade twice; makeConnection once.)
        factory = self.factory
        self._deadline = factory.clock.callLater(factory.server.config.handshake_timeout,
                                                 self._handshake_timed_out)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._handshakeDone and self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
            self._deadline = None

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        self.refusal = "timeout"
        self.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if not self._handshakeDone:
            # A TLS-level failure is kept in _reason; the transport's reason is EOF.
            self.factory.refused(self, self._classify(self._reason or reason))
        super().connectionLost(reason)

    def _classify(self, reason: Any) -> str:
        if self.refusal is not None:
            return self.refusal
        if reason is not None and reason.check(SSL.Error):
            return "protocol"
        return "closed"


class HostTLSFactory(TLSMemoryBIOFactory):
    """Wraps a listener's factory in TLS from a shared L{ServerContext}."""

    protocol = HostTLSProtocol
    noisy = False
    log = Logger()

    def __init__(self, server: ServerContext, wrapped: IProtocolFactory, clock: Any,
                 on_refused: Any = None) -> None:
        super().__init__(server, False, wrapped, clock=clock)
        self.server = server
        self.clock = clock
        self._on_refused = on_refused
        # A scanner or a misconfigured client fails handshakes per connection:
        # the first of each kind is logged with its peer, the rest summarised.
        self.warnings = LogThrottle(self.log, clock)

    def stopFactory(self) -> None:  # noqa: N802 (Twisted naming)
        """The listener stopped: write what the throttle still holds."""
        self.warnings.flush()
        super().stopFactory()

    def refused(self, protocol: HostTLSProtocol, reason: str) -> None:
        """Count and log one refused (or abandoned) handshake."""
        if self._on_refused is not None:
            self._on_refused(self.server.name, reason)
        if reason == "closed":
            return  # the peer left before finishing the handshake: not worth a line
        peer = protocol.transport.getPeer() if protocol.transport is not None else None
        self.warnings.warn((self.server.name, reason),
                           "tls:{context}: handshake refused from {peer}: {reason}",
                           context=self.server.name, peer=getattr(peer, "host", "?"),
                           reason=_REASONS.get(reason, reason))


_REASONS = {
    "verify": "client certificate not signed by the configured CA",
    "not_allowed": "client certificate identity not on the allowlist",
    "timeout": "handshake not finished in time",
    "protocol": "TLS protocol error (not TLS, no shared version or cipher, or no certificate)",
}


def peer_identity(transport: Any) -> PeerIdentity | None:
    """The verified client certificate identity of a TLS transport, if any."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    certificate = get()
    if certificate is None:
        return None
    return identity_of(certificate.to_cryptography())


class ClientContexts:
    """
    Connection creators for upstreams, verifying the server's hostname with
    service_identity against the system CAs or a configured CA bundle.
    """

    def __init__(self, config: ClientTLSConfig | None = None) -> None:
        self.config = config
        self._cache: dict[str, Any] = {}

    def for_host(self, hostname: str) -> Any:
        """An C{IOpenSSLClientConnectionCreator} for C{hostname}."""
        creator = self._cache.get(hostname)
        if creator is None:
            creator = self._cache[hostname] = self._build(hostname)
        return creator

    def _build(self, hostname: str) -> Any:
        config = self.config
        trust: Any = tssl.platformTrust()
        client_certificate = None
        minimum = tssl.TLSVersion.TLSv1_2
        if config is not None:
            if config.ca_certificates:
                trust = tssl.trustRootFromCertificates([
                    tssl.Certificate(crypto.X509.from_cryptography(ca))
                    for ca in config.ca_certificates])
            if config.certificate and config.key:
                with open(config.certificate, "rb") as cert, open(config.key, "rb") as key:
                    client_certificate = tssl.PrivateCertificate.loadPEM(
                        cert.read() + b"\n" + key.read())
            if config.min_version == "1.3":
                minimum = tssl.TLSVersion.TLSv1_3
        return tssl.optionsForClientTLS(hostname, trustRoot=trust,
                                        clientCertificate=client_certificate,
                                        extraCertificateOptions={"raiseMinimumTo": minimum})
