"""
Authentication shared by the services that front upstreams (secretproxy,
later the gateway): who is calling, established by a session secret, a
Kubernetes service-account token (TokenReview) or a client certificate.

A service reads its settings with L{parse_auth}, builds the methods once
with L{build_authenticators} and chains them per upstream with
L{Authenticator}. On the hot path, L{Authenticator.authenticate_now}
answers known callers synchronously; see C{docs/auth.md}.
"""

from appliance.auth.chain import Authenticator
from appliance.auth.config import (
    AuthConfig,
    KubernetesConfig,
    SessionConfig,
    build_authenticators,
    parse_auth,
)
from appliance.auth.kubernetes import MAX_TOKEN, KubernetesAuth
from appliance.auth.metrics import AuthMetrics
from appliance.auth.model import (
    INVALID,
    MISSING,
    NOTHING_PRESENTED,
    UNAVAILABLE,
    AuthMethod,
    AuthRequest,
    AuthResult,
    Identity,
)
from appliance.auth.mtls import MTLSAuth, identity_from_peer
from appliance.auth.session import MAX_SESSION_SECRET, SessionSecretAuth
from appliance.auth.tokenreview import Review, ReviewUnavailable, TokenReviewClient

__all__ = [
    "INVALID",
    "MAX_SESSION_SECRET",
    "MAX_TOKEN",
    "MISSING",
    "NOTHING_PRESENTED",
    "UNAVAILABLE",
    "AuthConfig",
    "AuthMethod",
    "AuthMetrics",
    "AuthRequest",
    "AuthResult",
    "Authenticator",
    "Identity",
    "KubernetesAuth",
    "KubernetesConfig",
    "MTLSAuth",
    "Review",
    "ReviewUnavailable",
    "SessionConfig",
    "SessionSecretAuth",
    "TokenReviewClient",
    "build_authenticators",
    "identity_from_peer",
    "parse_auth",
]
