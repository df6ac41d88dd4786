"""
The Kubernetes TokenReview API: building the request, judging the answer
(sans-IO, plain functions), and a small HTTPS client that calls it with the
proxy's own service-account token.

C{POST /apis/authentication.k8s.io/v1/tokenreviews} with::

    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
     "spec": {"token": T, "audiences": [AUD, ...]}}

answers (201) with C{status.authenticated}, C{status.user} (C{username},
C{uid}, C{groups}, C{extra}), C{status.audiences} and C{status.error}.
A token is accepted only when it is authenticated, the answer's audiences
intersect ours (an API server that ignored the audiences answers none, or
its own) and the username is C{system:serviceaccount:<ns>:<sa>}.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from appliance.auth.model import Identity

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
MAX_RESPONSE = 64 * 1024
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# A namespace is a DNS label, a service account name a DNS subdomain.
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ACCOUNT = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")
# Facts from status.user.extra worth keeping, under a shorter name.
_EXTRA = {"authentication.kubernetes.io/pod-name": "pod_name",
          "authentication.kubernetes.io/pod-uid": "pod_uid",
          "authentication.kubernetes.io/node-name": "node_name"}


class ReviewUnavailable(Exception):
    """
    TokenReview could not give an answer; C{reason} is a fixed code
    (C{http_500}, C{bad_json}, C{own_token_unreadable}, ...).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@frozen
class Review:
    """
    The verdict on one token: an identity, or the reason code it was refused.
    """

    identity: Identity | None
    reason: str | None = None


def request_body(token: bytes, audiences: Sequence[str]) -> bytes:
    """The JSON TokenReview for C{token} (ASCII, already validated)."""
    return json.dumps({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token.decode("ascii"), "audiences": list(audiences)},
    }, separators=(",", ":")).encode("ascii")


def judge(body: bytes, audiences: Sequence[str]) -> Review:
    """
    Judge a TokenReview answer. Raises L{ReviewUnavailable} when the answer
    is not a TokenReview at all (the server misbehaves, not the token).
    """
    try:
        document = json.loads(body)
    except ValueError:
        raise ReviewUnavailable("bad_json") from None
    status = document.get("status") if isinstance(document, dict) else None
    if not isinstance(status, dict):
        raise ReviewUnavailable("no_status")
    if status.get("authenticated") is not True:
        return Review(None, classify_error(status.get("error")))
    granted = status.get("audiences")
    if not isinstance(granted, list) or not set(audiences).intersection(
            a for a in granted if isinstance(a, str)):
        return Review(None, "audience_mismatch")
    user = status.get("user")
    username = user.get("username") if isinstance(user, dict) else None
    if not isinstance(username, str) or not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return Review(None, "not_service_account")
    parts = username[len(SERVICE_ACCOUNT_PREFIX):].split(":")
    if (len(parts) != 2 or not _NAMESPACE.fullmatch(parts[0])
            or not _ACCOUNT.fullmatch(parts[1])):
        return Review(None, "bad_username")
    assert isinstance(user, dict)
    return Review(Identity(name=username, method="kubernetes", namespace=parts[0],
                           service_account=parts[1], attributes=_attributes(user)))


def _attributes(user: dict[str, Any]) -> dict[str, str]:
    attributes: dict[str, str] = {}
    uid = user.get("uid")
    if isinstance(uid, str) and uid:
        attributes["uid"] = uid
    groups = user.get("groups")
    if isinstance(groups, list):
        attributes["groups"] = ",".join(g for g in groups if isinstance(g, str))
    extra = user.get("extra")
    if isinstance(extra, dict):
        for key, short in _EXTRA.items():
            values = extra.get(key)
            if isinstance(values, list) and values and isinstance(values[0], str):
                attributes[short] = values[0]
    return attributes


def classify_error(error: object) -> str:
    """
    A fixed reason code for C{status.error}: its text is the API server's
    and may quote parts of the token, so it is never logged as such.
    """
    if not isinstance(error, str) or not error:
        return "not_authenticated"
    lowered = error.lower()
    for needle, code in (("expired", "expired"), ("audience", "audience_mismatch"),
                         ("signature", "bad_signature"), ("not found", "revoked"),
                         ("deleted", "revoked"), ("invalidated", "revoked"),
                         ("malformed", "malformed"), ("invalid", "invalid_token")):
        if needle in lowered:
            return code
    return "not_authenticated"


class OwnToken:
    """
    The proxy's own service-account token, read from a file and read again
    whenever the file changes (projected tokens rotate: the kubelet swaps a
    symlink, so the inode changes) or after the API server refused it.
    """

    def __init__(self, path: str) -> None:
        """@param path: the token file."""
        self.path = path
        self._seen: tuple[int, int, int, int] | None = None
        self._token: bytes | None = None

    def get(self) -> bytes:
        """The current token; raises L{ReviewUnavailable} if unreadable."""
        try:
            info = os.stat(self.path)
            seen = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
            if seen != self._seen or self._token is None:
                with open(self.path, "rb") as handle:
                    token = handle.read().strip()
                if not token or not token.isascii() or b"\n" in token or b"\r" in token:
                    raise ReviewUnavailable("own_token_invalid")
                self._token, self._seen = token, seen
        except OSError:
            raise ReviewUnavailable("own_token_unreadable") from None
        return self._token

    def forget(self) -> None:
        """Read the file again next time (the API server refused the token)."""
        self._seen = None


@implementer(IPolicyForHTTPS)
class _TrustPolicy:
    def __init__(self, trust_root: Any) -> None:
        self._trust_root = trust_root

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802 - Twisted API
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust_root)


@implementer(IBodyProducer)
class _Body:
    """A request body that is already in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data) if data else UNKNOWN_LENGTH

    def startProducing(self, consumer: Any) -> Deferred[None]:  # noqa: N802 - Twisted API
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted API
        """Nothing to pause: the body is written at once."""

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted API
        """Nothing to resume."""

    def stopProducing(self) -> None:  # noqa: N802 - Twisted API
        """Nothing to stop."""


class _Collect(Protocol):
    """Collects a response body up to a limit, aborting beyond it."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        self._size += len(data)
        if self._size > self._limit:
            assert self.transport is not None
            self.transport.stopProducing()
            if not self._done.called:
                self._done.errback(ReviewUnavailable("response_too_large"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if self._done.called:
            return
        from twisted.web.client import ResponseDone

        if reason is not None and reason.check(ResponseDone):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(ReviewUnavailable("response_truncated"))


class TokenReviewClient:
    """
    Calls TokenReview over HTTPS, verified against a CA file, with the
    proxy's own token; keeps a small pool of persistent connections.
    L{close} the client when the service stops.
    """

    log = Logger()

    def __init__(self, reactor: Any, api: str, ca_file: str, token_file: str,
                 audiences: Sequence[str], connect_timeout: float = 2.0) -> None:
        """
        @param reactor: provides TCP, SSL and time.
        @param api: the API server's base URL (https://host[:port]).
        @param ca_file: PEM bundle the API server's certificate must chain to.
        @param token_file: the proxy's own service-account token.
        @param audiences: the audiences a reviewed token must be meant for.
        @raise ValueError: when the CA file cannot be read.
        """
        from twisted.internet.ssl import Certificate, trustRootFromCertificates
        from twisted.web.client import Agent, HTTPConnectionPool

        parts = urlsplit(api)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"expected an https:// API server URL, got {api!r}")
        self.url = (api.rstrip("/") + REVIEW_PATH).encode("ascii")
        self.audiences = tuple(audiences)
        self.own_token = OwnToken(token_file)
        try:
            with open(ca_file, "rb") as handle:
                pem = handle.read()
            roots = [Certificate.loadPEM(block) for block in _pem_blocks(pem)]
        except Exception as error:
            raise ValueError(f"cannot load the CA file {ca_file}: {error}") from None
        if not roots:
            raise ValueError(f"the CA file {ca_file} holds no certificate")
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._pool.cachedConnectionTimeout = 60
        self._agent = Agent(reactor, contextFactory=_TrustPolicy(trustRootFromCertificates(roots)),
                            connectTimeout=connect_timeout, pool=self._pool)

    def review(self, token: bytes) -> Deferred[Review]:
        """
        Ask about C{token}; fails with L{ReviewUnavailable} (or a network
        error) when no verdict was had. The caller bounds it with a timeout.
        """
        try:
            own = self.own_token.get()
        except ReviewUnavailable as error:
            self.log.error("cannot use the service-account token file {path}: {reason}",
                           path=self.own_token.path, reason=error.reason)
            raise
        headers = Headers({b"authorization": [b"Bearer " + own],
                           b"content-type": [b"application/json"],
                           b"accept": [b"application/json"]})
        body: Any = _Body(request_body(token, self.audiences))
        d: Deferred[Any] = self._agent.request(b"POST", self.url, headers, body)
        d.addCallback(self._received)
        return d

    def _received(self, response: Any) -> Deferred[Review]:
        code = response.code
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(done, MAX_RESPONSE))
        if code not in (200, 201):
            if code in (401, 403):
                self.own_token.forget()

            def refuse(_: object) -> Review:
                raise ReviewUnavailable(f"http_{code}")

            return done.addBoth(refuse)
        return done.addCallback(judge, self.audiences)

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        return self._pool.closeCachedConnections()


def _pem_blocks(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for piece in pem.split(end)[:-1]:
        start = piece.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(piece[start:] + end + b"\n")
    return blocks
