"""
What authentication works with and produces: the request as an
authenticator sees it (no HTTP library involved), the identity of a caller
and the outcome of a check, plus the interface every method implements.

Outcomes carry internal reason codes only. A caller (the proxy) maps them to
answers: C{missing} and C{invalid} to a bare 401, C{unavailable} (a backend
such as TokenReview could not be asked) to 503. Nothing here ever holds a
presented credential.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from attrs import field, frozen
from twisted.internet.defer import Deferred

from appliance.host.tls_identity import PeerIdentity

if TYPE_CHECKING:
    from appliance.auth.metrics import AuthMetrics

MISSING = "missing"
"""No credential for the method (or for any method of a chain)."""

INVALID = "invalid"
"""A credential was presented and is wrong, malformed, expired or unknown."""

UNAVAILABLE = "unavailable"
"""The credential could not be checked (backend down, slow, breaker open)."""

OK = "ok"
"""The metric label of a success (never a failure code)."""

FAILURES = (MISSING, INVALID, UNAVAILABLE)

METHODS = ("session", "kubernetes", "mtls")


def _frozen_mapping(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


@frozen
class Identity:
    """
    Who the caller is, as established by one method.

    @ivar name: the identity's name: the session label, the Kubernetes
        username (C{system:serviceaccount:NS:SA}) or the certificate's
        SPIFFE ID, DNS name or CN.
    @ivar method: C{session}, C{kubernetes} or C{mtls}.
    @ivar namespace: the Kubernetes namespace, when known.
    @ivar service_account: the Kubernetes service account, when known.
    @ivar attributes: further facts (read-only), e.g. C{uid}, C{groups}.
    """

    name: str
    method: str
    namespace: str | None = None
    service_account: str | None = None
    attributes: Mapping[str, str] = field(factory=dict, converter=_frozen_mapping,
                                          hash=False)

    def to_json(self) -> dict[str, object]:
        """The identity as JSON-ready fields (what a shared cache stores)."""
        return {"name": self.name, "method": self.method, "namespace": self.namespace,
                "service_account": self.service_account,
                "attributes": dict(self.attributes)}


@frozen
class AuthRequest:
    """
    What an authenticator sees of a request.

    @ivar headers: lower-case header names to their single value; the caller
        already refused requests repeating any header an authenticator reads.
    @ivar peer_identity: the verified client certificate, if TLS asked for one.
    @ivar peer_address: the client address, for logs only.
    """

    headers: Mapping[bytes, bytes]
    peer_identity: PeerIdentity | None = None
    peer_address: str = ""


@frozen
class AuthResult:
    """
    The outcome of authenticating one request: an identity, or a failure.

    @ivar identity: who the caller is (None on failure).
    @ivar failure: None on success, else C{missing}, C{invalid} or
        C{unavailable}.
    @ivar method: the method that decided (None when no credential was
        presented at all).
    @ivar reason: a finer internal reason code for logs (C{too_long},
        C{audience_mismatch}, C{breaker_open}, ...); never anything the
        client sent.
    """

    identity: Identity | None
    failure: str | None
    method: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the caller was authenticated."""
        return self.identity is not None

    @classmethod
    def success(cls, identity: Identity) -> AuthResult:
        """A success for C{identity}."""
        return cls(identity, None, identity.method, None)

    @classmethod
    def failed(cls, failure: str, method: str | None, reason: str | None = None) -> AuthResult:
        """A failure with its code, deciding method and reason code."""
        return cls(None, failure, method, reason)


NOTHING_PRESENTED = AuthResult.failed(MISSING, None, "no_credential")
"""The result of a chain when no method found its credential."""


@runtime_checkable
class AuthMethod(Protocol):
    """
    One way of authenticating; L{Authenticator} chains several.

    Both calls return a result with C{failure == "missing"} when the
    method's credential is absent, so that a chain can try the next method.
    Each method counts its own decided outcomes in the metrics; a
    C{missing} result is counted by the chain.
    """

    name: str
    metrics: AuthMetrics

    def authenticate_now(self, request: AuthRequest) -> AuthResult | None:
        """
        The result if it can be had without I/O (a cached answer, a local
        check), else None: then call L{authenticate}.
        """

    def authenticate(self, request: AuthRequest) -> Deferred[AuthResult]:
        """The result, fetching whatever is needed; never fails."""

    def status(self) -> Mapping[str, object]:
        """JSON-ready facts for C{/status} (never a credential)."""
