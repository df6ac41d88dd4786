"""
Client certificates: the identity the host's TLS layer verified.

The TLS context (C{[tls:NAME]} with C{client_ca}, and optionally
C{allowed_clients}) already checked the chain and the allowlist during the
handshake; this method only names the caller. The name is the first SPIFFE
ID among the certificate's URIs, else its first DNS name, else its CN. A
SPIFFE ID of the form C{spiffe://<trust-domain>/ns/<ns>/sa/<sa>} (the
Istio / SPIRE Kubernetes convention) also gives the namespace and service
account.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed

from appliance.auth.metrics import AuthMetrics
from appliance.auth.model import INVALID, MISSING, OK, AuthRequest, AuthResult, Identity
from appliance.host.tls_identity import PeerIdentity

_SPIFFE = re.compile(r"spiffe://([a-z0-9._-]+)(/[^?#]*)?")
_WORKLOAD = re.compile(r"/ns/([a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)"
                       r"/sa/([a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?)")


def identity_from_peer(peer: PeerIdentity, trust_domains: Iterable[str] = ()) -> Identity | None:
    """
    The identity of a verified certificate, or None when it names nobody
    or its SPIFFE ID is outside C{trust_domains} (when given).
    """
    domains = frozenset(trust_domains)
    for uri in peer.uris:
        match = _SPIFFE.fullmatch(uri)
        if match is None:
            continue
        domain = match.group(1)
        if domains and domain not in domains:
            return None
        workload = _WORKLOAD.fullmatch(match.group(2) or "")
        return Identity(name=uri, method="mtls",
                        namespace=workload.group(1) if workload else None,
                        service_account=workload.group(2) if workload else None,
                        attributes={"source": "spiffe", "trust_domain": domain})
    if domains:
        return None
    if peer.dns:
        return Identity(name=peer.dns[0], method="mtls", attributes={"source": "dns"})
    if peer.common_name:
        return Identity(name=peer.common_name, method="mtls", attributes={"source": "cn"})
    return None


class MTLSAuth:
    """
    Authenticates by the verified client certificate; see the module
    docstring. Results are remembered per certificate identity (a handful
    of distinct workloads), so a request costs a dictionary lookup.
    """

    name = "mtls"
    max_remembered = 10_000

    def __init__(self, trust_domains: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        """
        @param trust_domains: SPIFFE trust domains accepted; when given,
            certificates without a SPIFFE ID in one of them are refused.
        @param registry: where the metrics go.
        """
        self.trust_domains = tuple(trust_domains)
        self.metrics = AuthMetrics.for_registry(registry)
        self._ok = self.metrics.counter(self.name, OK)
        self._invalid = self.metrics.counter(self.name, INVALID)
        self._missing = AuthResult.failed(MISSING, self.name, "no_certificate")
        self._nameless = AuthResult.failed(INVALID, self.name, "no_usable_name")
        self._known: dict[PeerIdentity, AuthResult] = {}

    def authenticate_now(self, request: AuthRequest) -> AuthResult:
        """Always answers at once: the handshake already did the work."""
        peer = request.peer_identity
        if peer is None:
            return self._missing
        result = self._known.get(peer)
        if result is None:
            identity = identity_from_peer(peer, self.trust_domains)
            result = self._nameless if identity is None else AuthResult.success(identity)
            if len(self._known) >= self.max_remembered:
                self._known.clear()
            self._known[peer] = result
        (self._ok if result.ok else self._invalid).inc()
        return result

    def authenticate(self, request: AuthRequest) -> Deferred[AuthResult]:
        """L{authenticate_now} wrapped in a fired Deferred."""
        return succeed(self.authenticate_now(request))

    def status(self) -> dict[str, object]:
        """JSON-ready facts for C{/status}."""
        return {"trust_domains": list(self.trust_domains)}
