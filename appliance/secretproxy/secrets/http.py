"""
The HTTP client of the remote stores: treq over one persistent connection
pool, TLS verified (system roots or a CA bundle), a deadline over the whole
exchange (connect, headers and body), bounded answers, and no redirects
(a redirect would carry the store token to another host).

Every failure becomes L{StoreUnavailable} with a message naming the store
and what went wrong; tokens travel only in request headers, never in URLs
or messages.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from cryptography import x509
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from appliance.resilience import Deadline, DeadlineExceeded
from appliance.secretproxy.secrets.base import StoreUnavailable

MAX_BODY = 256 * 1024
"""Largest store answer read (bytes); larger ones fail."""


@frozen
class HTTPAnswer:
    """A store's answer: status, headers and the whole (bounded) body."""

    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header C{name}, or None."""
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self, what: str) -> Any:
        """
        The body as JSON.

        @raise StoreUnavailable: when it is not JSON.
        """
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise StoreUnavailable(f"{what}: answer {self.code} is not JSON") from None


def load_ca_bundle(path: str) -> Any:
    """
    A trust root from a PEM bundle (one or more CA certificates).

    @raise ValueError: when the file cannot be read or holds no certificate.
    """
    try:
        with open(path, "rb") as handle:
            certificates = x509.load_pem_x509_certificates(handle.read())
    except OSError as error:
        raise ValueError(f"cannot read CA bundle {path}: {error.strerror}") from None
    except ValueError:
        raise ValueError(f"CA bundle {path} holds no PEM certificate") from None
    from OpenSSL import crypto

    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates])


class StoreHTTP:
    """
    GET requests to one store, with a persistent pool; call L{close} at
    shutdown.
    """

    def __init__(self, reactor: Any, timeout: float, ca_file: str | None = None,
                 max_body: int = MAX_BODY, per_host: int = 4) -> None:
        """
        @param reactor: the reactor (TCP, TLS, time).
        @param timeout: seconds for a whole exchange, connection included.
        @param ca_file: a PEM CA bundle to trust instead of the system roots.
        @param max_body: largest answer accepted, in bytes.
        @param per_host: idle persistent connections kept per host.
        """
        from treq.client import HTTPClient

        self.timeout = timeout
        self.max_body = max_body
        self._reactor = reactor
        trust = load_ca_bundle(ca_file) if ca_file else None
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = per_host
        self._pool.cachedConnectionTimeout = 60
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
                      connectTimeout=timeout, pool=self._pool)
        self._client = HTTPClient(agent)  # type: ignore[arg-type]

    def get(self, url: str, headers: dict[str, str], what: str,
            params: dict[str, str] | None = None) -> Deferred[HTTPAnswer]:
        """
        GET C{url}; the answer whatever its status (redirects are not
        followed).

        @param what: names the store in error messages.
        @raise StoreUnavailable: no answer in time, a connection or TLS
            failure, or a body larger than C{max_body}.
        """
        deadline = Deadline(self._reactor, self.timeout)
        d = deadline.bound(ensureDeferred(self._get(url, headers, what, params)))
        return d.addErrback(self._timed_out, what)

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections."""
        return self._pool.closeCachedConnections()

    async def _get(self, url: str, headers: dict[str, str], what: str,
                   params: dict[str, str] | None) -> HTTPAnswer:
        try:
            response = await self._client.get(
                url, params=params, headers=Headers({k: [v] for k, v in headers.items()}),
                allow_redirects=False,
                unbuffered=True, reactor=self._reactor)
        except StoreUnavailable:
            raise
        except Exception as error:
            if _is_cancel(error):
                raise CancelledError() from None
            raise StoreUnavailable(f"{what}: no answer: {describe(error)}") from None
        finished: Deferred[bytes] = Deferred(lambda d: collector.abort())
        collector = _Collect(self.max_body, response.length, finished, what)
        response.deliverBody(collector)
        body = await finished
        return HTTPAnswer(code=response.code, headers=response.headers, body=body)

    def _timed_out(self, failure: Failure, what: str) -> Failure:
        if failure.check(DeadlineExceeded):
            raise StoreUnavailable(f"{what}: no answer within {self.timeout:g}s")
        return failure


class _Collect(Protocol):
    """Collects a body up to a limit; aborts the connection beyond it."""

    def __init__(self, limit: int, declared: Any, finished: Deferred[bytes],
                 what: str) -> None:
        self._limit = limit
        self._declared = declared
        self._finished = finished
        self._what = what
        self._chunks: list[bytes] = []
        self._size = 0
        self._overflow = False

    def connectionMade(self) -> None:
        if self._declared is not UNKNOWN_LENGTH and self._declared > self._limit:
            self._overflow = True
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self._overflow:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._overflow = True
            self._chunks.clear()
            self.abort()
            return
        self._chunks.append(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._finished.called:
            return
        if self._overflow:
            self._finished.errback(StoreUnavailable(
                f"{self._what}: answer larger than {self._limit} bytes"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(StoreUnavailable(
                f"{self._what}: answer cut short: {describe(reason.value)}"))


def describe(error: BaseException) -> str:
    """A short, token-free description of a network error."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        first = reasons[0]
        inner = first.value if isinstance(first, Failure) else first
        return describe(inner)
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text[:200]}"


def _is_cancel(error: BaseException) -> bool:
    if isinstance(error, CancelledError):
        return True
    reasons = getattr(error, "reasons", None) or ()
    return any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


def status_error(answer: HTTPAnswer, what: str) -> StoreUnavailable:
    """The L{StoreUnavailable} for an unexpected HTTP status."""
    code = answer.code
    if code in (401, 403):
        return StoreUnavailable(f"{what}: refused our token ({code})")
    if code == 429:
        return StoreUnavailable(f"{what}: rate limited us (429)",
                                retry_after=_retry_after(answer))
    if 300 <= code < 400:
        return StoreUnavailable(f"{what}: answered a redirect ({code}), not followed")
    if code >= 500:
        return StoreUnavailable(f"{what}: server error ({code})",
                                retry_after=_retry_after(answer))
    return StoreUnavailable(f"{what}: unexpected answer ({code})")


def _retry_after(answer: HTTPAnswer) -> float | None:
    text = answer.header("Retry-After")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None
