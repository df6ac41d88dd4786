"""
A TokenReview-compatible HTTPS server for the authentication tests.

A real Kubernetes API server cannot run here (no cluster, no kube-apiserver
binary, no etcd), so this implements the public API the appliance uses, as
documented by Kubernetes for C{authentication.k8s.io/v1}:

 - C{POST /apis/authentication.k8s.io/v1/tokenreviews} over TLS (a
   certificate from the test CA), with the caller authenticated by its own
   bearer token (401 and a C{Status} object otherwise);
 - a C{TokenReview} body (C{apiVersion}, C{kind}, C{spec.token},
   C{spec.audiences}); C{spec.token} is required (400);
 - the answer is C{201 Created} with the review echoed (spec included, as
   the real server does) and C{status} filled: C{authenticated},
   C{user} (C{username} C{system:serviceaccount:NS:SA}, C{uid},
   C{groups}, C{extra} with the pod name), C{audiences} (the intersection
   of the requested and the token's audiences; the API server's own
   audience when none were requested) and C{error} for refused tokens.

Test controls: L{add_token}, C{ignore_audiences} (answer as an authenticator
that is not audience-aware: authenticated with the API server's own
audience whatever was asked), C{fail_with} (an HTTP status to answer every
review with), C{delay} (answer later) or C{hang} (never answer), L{stop}
(close the port and abort open connections), and C{reviews}, the number of
reviews that reached the handler.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from attrs import define, field
from twisted.web import http, resource, server

from appliance.auth import AuthRequest, KubernetesAuth, TokenReviewClient
from tests.harness.certs import TestCA

REVIEW_PATH = b"/apis/authentication.k8s.io/v1/tokenreviews"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "secretproxy"


@define
class TokenInfo:
    """What the server knows about one issued token."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...] = (AUDIENCE,)
    error: str | None = None
    username: str | None = None

    @property
    def user(self) -> str:
        """The username the API server reports."""
        if self.username is not None:
            return self.username
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def new_token(prefix: str = "tok") -> str:
    """A JWT-shaped random token (three base64url segments)."""
    return ".".join(secrets.token_urlsafe(n) for n in (24, 96, 48)) + "-" + prefix


@define(eq=False)
class TokenReviewServer:
    """A TokenReview API on 127.0.0.1 over TLS; see the module docstring."""

    reactor: Any
    ca: TestCA
    caller_token: str = field(factory=lambda: "proxy-" + secrets.token_urlsafe(32))
    tokens: dict[str, TokenInfo] = field(factory=dict)
    ignore_audiences: bool = False
    fail_with: int | None = None
    delay: float = 0.0
    hang: bool = False
    reviews: int = 0
    refused_callers: int = 0
    port: Any = None
    _transports: dict[Any, Any] = field(factory=dict)
    _pending: list[Any] = field(factory=list)

    def start(self) -> TokenReviewServer:
        """Listen on a free port with a certificate for localhost/127.0.0.1."""
        issued = self.ca.issue("apiserver-" + secrets.token_hex(4), dns=("localhost",),
                               ips=("127.0.0.1",))
        options = issued.server_context()
        root = resource.Resource()
        apis = root
        for segment in REVIEW_PATH.strip(b"/").split(b"/")[:-1]:
            child = resource.Resource()
            apis.putChild(segment, child)  # type: ignore[arg-type]
            apis = child
        apis.putChild(REVIEW_PATH.rsplit(b"/", 1)[1], _Reviews(self))  # type: ignore[arg-type]
        site = _TrackingSite(root, self._transports)
        site.displayTracebacks = False
        self.port = self.reactor.listenSSL(0, site, options, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        """The API server's base URL."""
        return f"https://127.0.0.1:{self.port.getHost().port}"

    def add_token(self, namespace: str = "payments", service_account: str = "api",
                  audiences: tuple[str, ...] = (AUDIENCE,), error: str | None = None,
                  username: str | None = None) -> str:
        """Issue a token for a service account and return it."""
        token = new_token()
        self.tokens[token] = TokenInfo(namespace, service_account, audiences, error, username)
        return token

    async def stop(self) -> None:
        """Stop listening, abort every open connection and pending answer."""
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()
        for transport in list(self._transports.values()):
            transport.abortConnection()
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()

    # -- the API -------------------------------------------------------------

    def answer(self, request: server.Request) -> bytes | int:
        """The response body for one POST, or NOT_DONE_YET."""
        if request.getHeader(b"authorization") != f"Bearer {self.caller_token}".encode():
            self.refused_callers += 1
            return _status(request, 401, "Unauthorized", "Unauthorized")
        try:
            assert request.content is not None
            review = json.loads(request.content.read())
            if (review.get("apiVersion") != "authentication.k8s.io/v1"
                    or review.get("kind") != "TokenReview"):
                return _status(request, 400, "BadRequest", "not a v1 TokenReview")
            spec = review.get("spec") or {}
        except (ValueError, AttributeError):
            return _status(request, 400, "BadRequest", "invalid JSON")
        if not spec.get("token"):
            return _status(request, 400, "BadRequest",
                           "token is required for TokenReview in authentication")
        self.reviews += 1
        if self.fail_with is not None:
            return _status(request, self.fail_with, "InternalError",
                           "etcdserver: request timed out")
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                           "metadata": {"creationTimestamp": None}, "spec": spec,
                           "status": self._status_for(spec)}).encode()
        request.setResponseCode(http.CREATED)
        request.setHeader(b"content-type", b"application/json")
        if self.hang:
            return server.NOT_DONE_YET
        if self.delay > 0:
            self._pending.append(self.reactor.callLater(self.delay, _finish, request, body))
            return server.NOT_DONE_YET
        return body

    def _status_for(self, spec: dict[str, Any]) -> dict[str, Any]:
        info = self.tokens.get(spec["token"])
        if info is None:
            return {"authenticated": False,
                    "error": "[invalid bearer token, square/go-jose: error in "
                             "cryptographic primitive, token lookup failed]"}
        if info.error is not None:
            return {"authenticated": False, "error": info.error}
        wanted = list(spec.get("audiences") or [API_AUDIENCE])
        granted = [a for a in wanted if a in info.audiences]
        if self.ignore_audiences:
            granted = [API_AUDIENCE]
        elif not granted:
            return {"authenticated": False,
                    "error": f"[invalid bearer token, token audiences {list(info.audiences)} "
                             f"is invalid for the target audiences {wanted}, unknown]"}
        return {"authenticated": True, "audiences": granted, "user": {
            "username": info.user,
            "uid": "uid-" + info.service_account,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{info.namespace}",
                       "system:authenticated"],
            "extra": {"authentication.kubernetes.io/pod-name": [info.service_account + "-0"],
                      "authentication.kubernetes.io/pod-uid": ["pod-uid-1"]}}}


class _Reviews(resource.Resource):
    isLeaf = True

    def __init__(self, owner: TokenReviewServer) -> None:
        super().__init__()
        self.owner = owner

    def render_POST(self, request: server.Request) -> bytes | int:  # noqa: N802
        return self.owner.answer(request)


class _TrackingSite(server.Site):
    """A Site that remembers the transport of every open connection."""

    def __init__(self, root: resource.Resource, transports: dict[Any, Any]) -> None:
        super().__init__(root)
        self._live = transports

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        channel = super().buildProtocol(addr)
        live = self._live
        made, lost = channel.makeConnection, channel.connectionLost

        def make_connection(transport: Any) -> None:
            live[channel] = transport
            made(transport)

        def connection_lost(reason: Any) -> None:
            live.pop(channel, None)
            lost(reason)

        channel.makeConnection = make_connection
        channel.connectionLost = connection_lost
        return channel


def _status(request: server.Request, code: int, reason: str, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "message": message, "reason": reason,
                       "code": code}).encode()


def _finish(request: server.Request, body: bytes) -> None:
    if not request.finished and not request._disconnected:
        request.write(body)
        request.finish()


# -- helpers for the tests ----------------------------------------------------


def write_token_file(path: Path, token: str) -> Path:
    """Write the proxy's own token the way the kubelet does: a new file moved in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(token + "\n")
    os.replace(temporary, path)
    return path


def kubernetes_auth(server: TokenReviewServer, tmp_path: Path, clock: Any = None,
                    ca_file: Path | None = None, **options: Any) -> KubernetesAuth:
    """A KubernetesAuth talking to C{server} with its caller token in a file."""
    token_file = write_token_file(tmp_path / "sa-token", server.caller_token)
    client = TokenReviewClient(server.reactor, server.url,
                               str(ca_file or server.ca.cert_path), str(token_file),
                               options.pop("audiences", (AUDIENCE,)),
                               connect_timeout=options.get("timeout", 2.0))
    return KubernetesAuth(client, clock if clock is not None else server.reactor, **options)


def bearer(token: str, header: bytes = b"authorization") -> AuthRequest:
    """A request carrying C{token} as a bearer token."""
    return AuthRequest(headers={header: b"Bearer " + token.encode()},
                       peer_address="127.0.0.1")


@pytest_twisted.async_yield_fixture
async def tokenreview(reactor: Any, test_ca: TestCA) -> AsyncIterator[TokenReviewServer]:
    """A running TokenReview server, stopped after the test (import it into a test module)."""
    server = TokenReviewServer(reactor, test_ca).start()
    yield server
    await server.stop()
