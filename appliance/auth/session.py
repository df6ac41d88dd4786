"""
Session secrets: a header whose value is a shared secret that names an
identity (a workload that cannot use Kubernetes tokens or mTLS).

Only keyed hashes are kept. At load, each secret is hashed with
HMAC-SHA-256 under a key drawn at random for this process; at request time
the presented value is hashed the same way and looked up.

Why this is constant-time with respect to the secrets: the only operation
whose duration depends on the presented value is HMAC over that value,
which does not look at any secret. The dictionary lookup and the final
L{hmac.compare_digest} compare the presented value's digest with stored
digests; an attacker who cannot know the process key cannot choose inputs
whose digests share a prefix with a stored digest, so the time those
comparisons take reveals nothing about a secret (and C{compare_digest}
itself does not stop at the first differing byte). Contrast with comparing
the header to the secret with C{==}, which returns sooner the earlier the
first wrong byte is, and so leaks the secret byte by byte.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed

from appliance.auth.metrics import AuthMetrics
from appliance.auth.model import (
    INVALID,
    MISSING,
    OK,
    AuthRequest,
    AuthResult,
    Identity,
)
from appliance.host.redact import remember_secret
from appliance.host.secret import Secret

MAX_SESSION_SECRET = 4096
"""Header values longer than this are invalid without being hashed."""

DEFAULT_HEADER = b"x-session-secret"


class SessionSecretAuth:
    """
    Authenticates by a session secret header; see the module docstring.
    """

    name = "session"

    def __init__(
        self,
        sessions: Iterable[tuple[Identity, Secret]],
        header: bytes = DEFAULT_HEADER,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        @param sessions: each identity with its secret; the secrets are
            hashed here and not kept.
        @param header: the lower-case header carrying the secret.
        @param registry: where the metrics go.
        @raise ValueError: when two identities share one secret.
        """
        self.header = header.lower()
        # HMAC keyed once: each digest copies the keyed state instead of
        # setting the key up again (1.5 us instead of 4-5 us per request).
        self._keyed = hmac.new(os.urandom(32), digestmod=hashlib.sha256)
        self._by_digest: dict[bytes, tuple[bytes, AuthResult]] = {}
        for identity, secret in sessions:
            remember_secret(secret.reveal())  # already done if it came from the config
            digest = self._digest(secret.reveal().encode("utf-8"))
            if digest in self._by_digest:
                raise ValueError(f"session {identity.name} uses the secret of another session")
            self._by_digest[digest] = (digest, AuthResult.success(identity))
        self.metrics = AuthMetrics.for_registry(registry)
        self._ok = self.metrics.counter(self.name, OK)
        self._invalid = self.metrics.counter(self.name, INVALID)
        self._missing = AuthResult.failed(MISSING, self.name, "no_header")
        self._too_long = AuthResult.failed(INVALID, self.name, "too_long")
        self._unknown = AuthResult.failed(INVALID, self.name, "unknown_secret")

    def __len__(self) -> int:
        """How many identities are configured."""
        return len(self._by_digest)

    def _digest(self, value: bytes) -> bytes:
        """HMAC-SHA-256 of C{value} under this process's random key."""
        mac = self._keyed.copy()
        mac.update(value)
        return mac.digest()

    def authenticate_now(self, request: AuthRequest) -> AuthResult:
        """Always answers at once: no I/O is involved."""
        value = request.headers.get(self.header)
        if value is None:
            return self._missing
        if len(value) > MAX_SESSION_SECRET:
            self._invalid.inc()
            return self._too_long
        digest = self._digest(value)
        found = self._by_digest.get(digest)
        # The lookup already matched equal digests; the explicit
        # constant-time confirmation keeps the guarantee independent of how
        # dict compares keys.
        if found is None or not hmac.compare_digest(found[0], digest):
            self._invalid.inc()
            return self._unknown
        self._ok.inc()
        return found[1]

    def authenticate(self, request: AuthRequest) -> Deferred[AuthResult]:
        """L{authenticate_now} wrapped in a fired Deferred."""
        return succeed(self.authenticate_now(request))

    def status(self) -> dict[str, object]:
        """JSON-ready facts for C{/status} (names only, never secrets)."""
        return {"header": self.header.decode("ascii", "replace"),
                "identities": sorted(result.identity.name
                                     for _, result in self._by_digest.values()
                                     if result.identity is not None)}
