"""
An OPA-compatible HTTP server for the policy tests.

The real OPA cannot run here (no opa binary, no network to fetch one), so
this server implements the part of OPA's public REST API the policy client
uses, as OPA documents it (https://www.openpolicyagent.org/docs/latest/rest-api/):

 - C{POST /v1/data/{path}} with a JSON body C{{"input": ...}}: C{200} with
   C{{"result": <value>}}, or C{200 {}} when the document is undefined (an
   unknown path, or the rule gave no value); a body that is not JSON is a
   C{400} with OPA's error object (C{code} C{invalid_parameter});
 - C{GET /health}: C{200 {}} while the server is up.

The "policy" is a Python function of the input document returning the
result value (None: undefined). Test controls: C{mode} (C{"ok"}; C{"slow"}:
hold answers until L{release}; C{"fail"}: C{500} with OPA's
C{internal_error} object; C{"garbage"}: C{200} with a body that is not
JSON), L{stop} (close the port and abort every connection: the server is
down) and L{start} again on the same port; C{requests} (the input documents
of data queries that reached the handler), C{health_checks} and
C{authorizations} (the C{Authorization} headers seen).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.protocols.policies import WrappingFactory
from twisted.web import resource, server

DATA_PREFIX = b"/v1/data/"


def example_policy(input: dict[str, Any]) -> Any:
    """Alice may GET; bob gets an object answer with a reason; carol is undefined."""
    if input.get("identity") == "alice":
        return input.get("method") == "GET"
    if input.get("identity") == "bob":
        return {"allow": False, "reason": "bob is suspended"}
    return None


class FakeOPA:
    """The server; see the module docstring."""

    def __init__(self, reactor: Any, policy: Callable[[dict[str, Any]], Any] = example_policy,
                 package: str = "secretproxy/allow") -> None:
        self.reactor = reactor
        self.policy = policy
        self.package = package
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.health_checks = 0
        self.authorizations: list[str | None] = []
        self.port_number = 0
        self._port: Any = None
        self._held: list[server.Request] = []
        self._factory: Any = None

    @property
    def url(self) -> str:
        """The base URL (what C{opa_url} holds)."""
        return f"http://127.0.0.1:{self.port_number}"

    def start(self) -> FakeOPA:
        """Listen on 127.0.0.1 (the previous port again after L{stop})."""
        self._factory = WrappingFactory(server.Site(_Root(self)))
        self._port = self.reactor.listenTCP(self.port_number, self._factory,
                                            interface="127.0.0.1")
        self.port_number = self._port.getHost().port
        return self

    async def stop(self) -> None:
        """Stop listening and abort every open connection and held answer."""
        self._held.clear()
        for connection in list(self._factory.protocols):
            connection.transport.abortConnection()
        port, self._port = self._port, None
        if port is not None:
            await port.stopListening()

    def release(self) -> None:
        """Answer the requests held in C{slow} mode."""
        held, self._held = self._held, []
        for request in held:
            _finish(request, 200, self._answer(request))

    def render_data(self, request: server.Request) -> bytes | int:
        """A Data API query."""
        self.authorizations.append(_header(request, b"authorization"))
        try:
            document = json.loads(request.content.read())  # type: ignore[union-attr, attr-defined]
            if not isinstance(document, dict):
                raise ValueError("not an object")
        except ValueError:
            return _json(request, 400, {"code": "invalid_parameter",
                                        "message": "body contains malformed input document"})
        request.opa_document = document  # type: ignore[attr-defined]
        self.requests.append(document.get("input") or {})
        if self.mode == "fail":
            return _json(request, 500, {"code": "internal_error", "message": "boom"})
        if self.mode == "garbage":
            request.setHeader(b"content-type", b"application/json")
            return b"<html>this is not JSON"
        if self.mode == "slow":
            self._held.append(request)
            request.notifyFinish().addErrback(lambda _: self._forget(request))
            return server.NOT_DONE_YET
        return _json(request, 200, self._answer(request))

    def _forget(self, request: server.Request) -> None:
        if request in self._held:
            self._held.remove(request)

    def _answer(self, request: server.Request) -> dict[str, Any]:
        path = request.path[len(DATA_PREFIX):].decode()
        if path != self.package:
            return {}
        result = self.policy(request.opa_document.get("input") or {})  # type: ignore[attr-defined]
        return {} if result is None else {"result": result}

    def render_health(self, request: server.Request) -> bytes:
        """OPA's liveness/readiness endpoint."""
        self.health_checks += 1
        if self.mode == "fail":
            return _json(request, 500, {"code": "internal_error", "message": "boom"})
        return _json(request, 200, {})


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, owner: FakeOPA) -> None:
        super().__init__()
        self.owner = owner

    def render_POST(self, request: server.Request) -> bytes | int:  # noqa: N802
        if request.path.startswith(DATA_PREFIX):
            return self.owner.render_data(request)
        return _json(request, 404, {"code": "resource_not_found", "message": "not found"})

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        if request.path == b"/health":
            return self.owner.render_health(request)
        return _json(request, 404, {"code": "resource_not_found", "message": "not found"})


def _header(request: server.Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode() if isinstance(value, bytes) else value


def _json(request: server.Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


def _finish(request: server.Request, code: int, body: dict[str, Any]) -> None:
    if request.finished or request._disconnected:
        return
    request.write(_json(request, code, body))
    request.finish()
