"""
Doppler- and Vault-compatible HTTP servers for the secret store tests.

The real services cannot run here: Doppler is a hosted service only, and
no Vault binary is installed (nor downloadable) on the test machines. These
servers implement, on twisted.web, the parts of the two public APIs the
stores use, as documented by the vendors:

 - Doppler API v3: C{GET /v3/configs/config/secret?name=NAME[&project=P&config=C]}
   with C{Authorization: Bearer TOKEN}; a service token implies its project
   and config, other tokens need both parameters. The answer is
   C{{"name": ..., "value": {"raw": ..., "computed": ..., "note": ""}, "success": true}}
   (C{wrap=True}: the same object under C{"secret"}); 404 with
   C{{"messages": [...], "success": false}} for an unknown secret; 401 for
   an unknown token. C{GET /v3/me} describes the token.
 - Vault KV v2: C{GET /v1/{mount}/data/{path}} with C{X-Vault-Token} (and
   C{X-Vault-Namespace} when the server was given one), answering
   C{{"data": {"data": {...}, "metadata": {"version": N, ...}}}}; 404 with
   C{{"errors": []}} for an unknown path; 403 C{{"errors": ["permission denied"]}}
   for a bad token. C{GET /v1/auth/token/lookup-self} checks the token.

Both record every request (L{Recorded}), can be told to fail (C{fail_with}
a status, C{hang} until stopped), can stop and start listening again on the
same port, and can change a secret's value and version. TLS is optional
(a certificate from L{tests.harness.certs.TestCA}).
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.harness.certs import TestCA


@define
class Recorded:
    """One request as the server saw it (header names lower-cased)."""

    method: str
    path: str
    args: dict[str, list[str]]
    headers: dict[str, str]


class _Fake(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Recorded] = []
        self.fail_with: int | None = None
        self.hang = False
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.requests.append(Recorded(
            method="GET", path=request.path.decode(),
            args={k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
            headers={k.decode().lower(): v[0].decode()
                     for k, v in request.requestHeaders.getAllRawHeaders()}))
        if self.hang:
            self.held.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        if self.fail_with is not None:
            return self.reply(request, self.fail_with, {"errors": ["injected failure"]})
        code, body, headers = self.answer(request)
        for name, value in headers.items():
            request.setHeader(name, value)
        return self.reply(request, code, body)

    def answer(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        raise NotImplementedError

    @staticmethod
    def reply(request: Request, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader("Content-Type", "application/json")
        return json.dumps(body).encode()


class FakeDoppler(_Fake):
    """
    The Doppler API subset; see the module docstring.

    @ivar configs: C{(project, config) -> {name: value}}.
    @ivar service_tokens: C{token -> (project, config)}.
    @ivar personal_tokens: tokens that need explicit project and config.
    @ivar etag: send an C{ETag} header (a per-secret version counter).
    @ivar wrap: answer with the secret object under C{"secret"}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.configs: dict[tuple[str, str], dict[str, str]] = {}
        self.versions: dict[tuple[str, str, str], int] = {}
        self.service_tokens: dict[str, tuple[str, str]] = {}
        self.personal_tokens: set[str] = set()
        self.etag = False
        self.wrap = False

    def set_secret(self, project: str, config: str, name: str, value: str) -> None:
        """Create or change a secret (its ETag version increases)."""
        self.configs.setdefault((project, config), {})[name] = value
        key = (project, config, name)
        self.versions[key] = self.versions.get(key, 0) + 1

    def answer(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        auth = request.getHeader("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        if token in self.service_tokens:
            project, config = self.service_tokens[token]
            if args.get("project", project) != project or args.get("config", config) != config:
                return 403, _doppler_error("This token does not have access"), {}
        elif token in self.personal_tokens:
            if "project" not in args or "config" not in args:
                return 400, _doppler_error("You must specify a project and config"), {}
            project, config = args["project"], args["config"]
        else:
            return 401, _doppler_error("Invalid Auth token"), {}
        path = request.path.decode()
        if path == "/v3/me":
            return 200, {"slug": "token", "name": "test token", "type": "service_token"}, {}
        if path != "/v3/configs/config/secret":
            return 404, _doppler_error("Not found"), {}
        name = args.get("name")
        if not name:
            return 400, _doppler_error("Missing name"), {}
        value = self.configs.get((project, config), {}).get(name)
        if value is None:
            return 404, _doppler_error("Could not find requested secret"), {}
        secret = {"name": name, "value": {"raw": value, "computed": value, "note": ""}}
        body = {"secret": secret, "success": True} if self.wrap else {**secret, "success": True}
        headers = {}
        if self.etag:
            headers["ETag"] = f'W/"{self.versions[(project, config, name)]}"'
        return 200, body, headers


class FakeVault(_Fake):
    """
    The Vault KV v2 subset; see the module docstring.

    @ivar mount: where the KV v2 engine is mounted.
    @ivar tokens: accepted tokens.
    @ivar namespace: the namespace requests must name (None: none).
    @ivar secrets: C{path -> (data, version)}.
    """

    def __init__(self, mount: str = "secret") -> None:
        super().__init__()
        self.mount = mount
        self.tokens: set[str] = set()
        self.namespace: str | None = None
        self.secrets: dict[str, tuple[dict[str, Any], int]] = {}

    def put(self, path: str, data: dict[str, Any]) -> int:
        """Write a new version of C{path}; returns the version."""
        version = self.secrets.get(path, ({}, 0))[1] + 1
        self.secrets[path] = (dict(data), version)
        return version

    def answer(self, request: Request) -> tuple[int, Any, dict[str, str]]:
        if (request.getHeader("X-Vault-Token") not in self.tokens
                or request.getHeader("X-Vault-Namespace") != self.namespace):
            return 403, {"errors": ["permission denied"]}, {}
        path = request.path.decode()
        if path == "/v1/auth/token/lookup-self":
            return 200, {"data": {"policies": ["default"], "ttl": 3600}}, {}
        prefix = f"/v1/{self.mount}/data/"
        if not path.startswith(prefix):
            return 404, {"errors": []}, {}
        from urllib.parse import unquote

        secret = self.secrets.get(unquote(path[len(prefix):]))
        if secret is None:
            return 404, {"errors": []}, {}
        data, version = secret
        metadata = {"created_time": "2026-11-02T10:00:00.000000Z", "custom_metadata": None,
                    "deletion_time": "", "destroyed": False, "version": version}
        return 200, {"request_id": "test", "lease_id": "", "renewable": False,
                     "lease_duration": 0, "data": {"data": data, "metadata": metadata},
                     "wrap_info": None, "warnings": None, "auth": None}, {}


def _doppler_error(message: str) -> dict[str, Any]:
    return {"messages": [message], "success": False}


@define(eq=False)
class SecretServer:
    """Serves a fake on 127.0.0.1 (plain HTTP, or HTTPS with a TestCA certificate)."""

    fake: Any
    reactor: Any
    ca: TestCA | None = None
    port: int = 0
    _listening: Any = None
    _factory: WrappingFactory | None = None
    _cert: Any = field(default=None)

    @property
    def url(self) -> str:
        """The base URL (https://localhost:PORT with TLS)."""
        if self.ca is not None:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SecretServer:
        """Listen (again, on the same port once one was chosen)."""
        self._factory = WrappingFactory(Site(self.fake))
        if self.ca is not None:
            if self._cert is None:
                issued = self.ca.issue(f"secret-server-{id(self)}", dns=("localhost",),
                                       ips=("127.0.0.1",))
                self._cert = issued.server_context()
            self._listening = self.reactor.listenSSL(self.port, self._factory, self._cert,
                                                     interface="127.0.0.1")
        else:
            self._listening = self.reactor.listenTCP(self.port, self._factory,
                                                     interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self

    async def stop(self) -> None:
        """Stop listening, abort open connections and held requests."""
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None
        if isinstance(self.fake, _Fake):
            self.fake.held = []
        if self._factory is not None:
            for protocol in list(self._factory.protocols):
                protocol.transport.abortConnection()
        # Let the aborted connections finish (their timers are cancelled then).
        await deferLater(self.reactor, 0, lambda: None)
