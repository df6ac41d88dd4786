"""
The admin port: C{/metrics}, C{/healthz}, C{/readyz} and C{/status}.

C{/healthz} and C{/readyz} are always open (probes need no credentials and
they reveal nothing secret); C{/metrics} and C{/status} need the bearer
token when one is configured.
"""

from __future__ import annotations

import json
from typing import Any
from typing import Protocol as TypingProtocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from appliance.host.config import AdminConfig
from appliance.host.hosted import HostedService
from appliance.host.plugin import Readiness
from appliance.host.runtime import Runtime
from appliance.host.secret import Secret


class StatusSource(TypingProtocol):
    """What the admin port reports on (the root service)."""

    def readiness(self) -> Readiness: ...

    def status(self) -> dict[str, Any]: ...


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, token: Secret | None = None) -> None:
        super().__init__()
        self._token = token

    def render(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return _json({"error": "method not allowed"}, request)
        if self._token is not None and not _authorized(request, self._token):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="appliance-admin"')
            return _json({"error": "unauthorized"}, request)
        return self.respond(request)

    def respond(self, request: Request) -> bytes:
        raise NotImplementedError


class Healthz(_Leaf):
    """Alive: the reactor is turning."""

    def respond(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class Readyz(_Leaf):
    """Ready to take traffic: 200, or 503 with a JSON reason."""

    def __init__(self, source: StatusSource) -> None:
        super().__init__()
        self._source = source

    def respond(self, request: Request) -> bytes:
        readiness = self._source.readiness()
        if not readiness.ready:
            request.setResponseCode(503)
        return _json({"ready": readiness.ready, "reason": readiness.reason}, request)


class Status(_Leaf):
    """Per-service detail as JSON."""

    def __init__(self, source: StatusSource, token: Secret | None) -> None:
        super().__init__(token)
        self._source = source

    def respond(self, request: Request) -> bytes:
        return _json(self._source.status(), request)


class Metrics(_Leaf):
    """Prometheus text exposition of the shared registry."""

    def __init__(self, registry: CollectorRegistry, token: Secret | None) -> None:
        super().__init__(token)
        self._registry = registry

    def respond(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)


class _NotFound(_Leaf):
    def respond(self, request: Request) -> bytes:
        request.setResponseCode(404)
        return _json({"error": "not found",
                      "paths": ["/healthz", "/readyz", "/status", "/metrics"]}, request)


class _AdminRoot(Resource):
    def __init__(self, children: dict[bytes, Resource]) -> None:
        super().__init__()
        self._children = children
        self._missing = _NotFound()

    def getChild(self, path: bytes, request: Request) -> Resource:
        if request.postpath:
            return self._missing
        return self._children.get(path, self._missing)


class _TrackedChannel(HTTPChannel):
    """An HTTP channel that registers with the admin's connection tracker."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.tracker.add(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any) -> None:
        self.factory.tracker.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)

    def begin_drain(self) -> None:
        # Close once the current response is written (or now, if idle).
        if not self.requests:
            self.loseConnection()
        else:
            self.persistent = False


class AdminSite(Site):
    """A quiet Site: no access log, no tracebacks in responses."""

    protocol = _TrackedChannel
    displayTracebacks = False
    noisy = False

    def log(self, request: Request) -> None:
        """Probes and scrapes are not worth an access log line."""


class AdminService(HostedService):
    """
    The admin HTTP port; started first and stopped last so C{/readyz} can
    answer 503 while the services drain.
    """

    def __init__(self, config: AdminConfig, runtime: Runtime, source: StatusSource) -> None:
        super().__init__("admin", runtime)
        root = _AdminRoot({
            b"healthz": Healthz(),
            b"readyz": Readyz(source),
            b"status": Status(source, config.token),
            b"metrics": Metrics(runtime.metrics, config.token),
        })
        site = AdminSite(root, reactor=runtime.reactor)
        site.tracker = self.tracker  # type: ignore[attr-defined]
        site.timeOut = 30
        self.listen(config.listen, site, "https" if config.tls else "http", tls=config.tls)


def _authorized(request: Request, token: Secret) -> bool:
    header = request.getHeader(b"authorization") or b""
    scheme, _, credentials = header.partition(b" ")
    return scheme.lower() == b"bearer" and token.matches(credentials.strip())


def _json(document: Any, request: Request) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document, indent=None, sort_keys=True).encode("utf-8") + b"\n"
