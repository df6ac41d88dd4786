"""
The C{[secretproxy]} section and its C{[secretproxy.upstream:NAME]} table.
Authentication (C{[secretproxy.session:*]}), policy rules
(C{[secretproxy.rule:*]}) and the secret store are read by their packages.
"""

from __future__ import annotations

import ipaddress
import re

from attrs import frozen

from appliance.auth import AuthConfig, parse_auth
from appliance.host.ini import INVALID, Section
from appliance.host.values import (
    in_range,
    one_of,
    parse_bool,
    parse_duration,
    parse_endpoint,
    parse_int,
    parse_list,
    parse_size,
)
from appliance.http.egress import CATEGORIES
from appliance.http.normalize import BadRequest, normalize_upstream_host
from appliance.policy import PolicyConfig, parse_policy
from appliance.resilience import Rate, parse_rate
from appliance.secretproxy.secrets import StoreConfig, parse_store

AUTH_METHODS = ("session", "kubernetes", "mtls")
_PLACEHOLDER = "{secret}"
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PREFIX = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


@frozen
class Injection:
    """How the secret goes into the request."""

    kind: str  # header, basic, query
    header: bytes
    template: str
    basic_user: str
    query_param: str


@frozen
class UpstreamConfig:
    """One C{[secretproxy.upstream:NAME]} section."""

    name: str
    hosts: tuple[str, ...]
    path_prefix: str | None
    scheme: str
    host: str
    port: int
    address: str | None
    tls_client: str | None
    secret: str
    injection: Injection
    auth: tuple[str, ...]
    allow: frozenset[str]
    max_concurrent: int
    max_queue: int
    queue_timeout: float
    connect_timeout: float
    response_timeout: float
    total_timeout: float
    retries: int
    rate_limit: Rate | None
    gzip: bool

    @property
    def authority(self) -> bytes:
        """The Host header value sent upstream (the configured name, never the client's)."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode("ascii")


@frozen
class SecretProxyConfig:
    """Everything the secret proxy is configured with."""

    listen: str
    tls: str | None
    route_header: bytes
    max_head: int
    max_body: int
    header_timeout: float
    idle_timeout: float
    body_timeout: float
    max_connections: int
    max_connections_per_client: int
    access_log: bool
    on_audit_failure: str
    pool_idle: int
    pool_idle_timeout: float
    rate_limit: Rate | None
    identity_rate_limit: Rate | None
    limits_backend: str
    on_redis_error: str
    resolve_ttl: float
    upstreams: tuple[UpstreamConfig, ...]
    auth: AuthConfig
    policy: PolicyConfig
    store: StoreConfig


def parse(section: Section) -> SecretProxyConfig:
    """Validate C{[secretproxy]} and everything under it."""
    upstreams = tuple(_upstream(name, child) for name, child in section.children("upstream"))
    if not upstreams:
        section.problem(None, "needs at least one [secretproxy.upstream:NAME] section")
    _check_unique(section, upstreams)
    return SecretProxyConfig(
        listen=section.get("listen", parse_endpoint, "tcp:9473:interface=127.0.0.1"),
        tls=section.reference("tls", "tls", None),
        route_header=section.get("route_header", _header_name, b"x-upstream-host"),
        max_head=section.get("max_head", in_range(parse_size, 1024, 1024**2), 16 * 1024),
        max_body=section.get("max_body", in_range(parse_size, 0), 10 * 1024**2),
        header_timeout=section.get("header_timeout", in_range(parse_duration, 0.01), 10.0),
        idle_timeout=section.get("idle_timeout", in_range(parse_duration, 0.01), 60.0),
        body_timeout=section.get("body_timeout", in_range(parse_duration, 0.01), 30.0),
        max_connections=section.get("max_connections", in_range(parse_int, 1), 10_000),
        max_connections_per_client=section.get("max_connections_per_client",
                                               in_range(parse_int, 0), 0),
        access_log=section.get("access_log", parse_bool, False),
        on_audit_failure=section.get("on_audit_failure", one_of("deny", "allow"), "deny"),
        pool_idle=section.get("pool_idle", in_range(parse_int, 0, 10_000), 64),
        pool_idle_timeout=section.get("pool_idle_timeout", in_range(parse_duration, 0.01),
                                      30.0),
        rate_limit=section.get("rate_limit", parse_rate, None),
        identity_rate_limit=section.get("identity_rate_limit", parse_rate, None),
        limits_backend=section.get("limits", one_of("auto", "memory", "redis"), "auto"),
        on_redis_error=section.get("on_redis_error", one_of("allow", "deny", "local"),
                                   "local"),
        resolve_ttl=section.get("resolve_ttl", in_range(parse_duration, 1, 3600), 30.0),
        upstreams=upstreams,
        auth=parse_auth(section),
        policy=parse_policy(section),
        store=parse_store(section),
    )


def _upstream(name: str, section: Section) -> UpstreamConfig:
    scheme = section.get("scheme", one_of("https", "http"), "https")
    hosts_raw = section.get("hosts", parse_list, ())
    hosts = []
    for value in hosts_raw if hosts_raw is not INVALID else ():
        try:
            hosts.append(normalize_upstream_host(value, scheme if scheme is not INVALID
                                                 else "https"))
        except BadRequest as error:
            section.problem("hosts", f"{value!r} is not a host name: {error.reason}")
    prefix = section.get("path_prefix", _path_prefix, None)
    if not hosts and prefix is None and hosts_raw is not INVALID:
        section.problem(None, "needs hosts (matched against the route header) or path_prefix")
    host = section.get("host", str, hosts[0].rsplit(":", 1)[0] if hosts else INVALID)
    default_port = 443 if scheme == "https" else 80
    auth = section.get("auth", parse_list, ("session",))
    for method in auth if auth is not INVALID else ():
        if method not in AUTH_METHODS:
            section.problem("auth", f"unknown method {method!r}; expected "
                            + ", ".join(AUTH_METHODS))
    if auth is not INVALID and not auth:
        section.problem("auth", "needs at least one method: every caller is authenticated")
    allow = section.get("allow", parse_list, ())
    for category in allow if allow is not INVALID else ():
        if category not in CATEGORIES:
            section.problem("allow", f"unknown category {category!r}; expected "
                            + ", ".join(sorted(CATEGORIES)))
    return UpstreamConfig(
        name=name,
        hosts=tuple(hosts),
        path_prefix=prefix,
        scheme=scheme,
        host=host.strip().lower() if isinstance(host, str) else host,
        port=section.get("port", in_range(parse_int, 1, 65535), default_port),
        address=section.get("address", _address, None),
        tls_client=section.reference("tls_client", "tls-client", None),
        secret=section.get("secret", _secret_name),
        injection=_injection(section),
        auth=tuple(auth) if auth is not INVALID else (),
        allow=frozenset(allow) if allow is not INVALID else frozenset(),
        max_concurrent=section.get("max_concurrent", in_range(parse_int, 1), 256),
        max_queue=section.get("max_queue", in_range(parse_int, 0), 256),
        queue_timeout=section.get("queue_timeout", in_range(parse_duration, 0.001), 2.0),
        connect_timeout=section.get("connect_timeout", in_range(parse_duration, 0.01), 5.0),
        response_timeout=section.get("response_timeout", in_range(parse_duration, 0.01), 30.0),
        total_timeout=section.get("total_timeout", in_range(parse_duration, 0.01), 120.0),
        retries=section.get("retries", in_range(parse_int, 0, 5), 1),
        rate_limit=section.get("rate_limit", parse_rate, None),
        gzip=section.get("gzip", parse_bool, True),
    )


def _injection(section: Section) -> Injection:
    kind = section.get("inject", one_of("header", "basic", "query"), "header")
    header = section.get("header", _header_name, b"authorization")
    template = section.get("template", str, "Bearer {secret}")
    if kind == "header" and isinstance(template, str) and template.count(_PLACEHOLDER) != 1:
        section.problem("template", "must contain {secret} exactly once")
    if isinstance(template, str) and any(c in template for c in "\r\n\x00"):
        section.problem("template", "must not contain CR, LF or NUL")
    basic_user = section.get("basic_user", str, "")
    query_param = section.get("query_param", str, "api_key")
    if kind == "query" and isinstance(query_param, str) and not re.match(
            r"^[A-Za-z0-9._~-]+$", query_param):
        section.problem("query_param", "expected a plain parameter name")
    return Injection(kind=kind, header=header if kind == "header" else b"authorization",
                     template=template, basic_user=basic_user, query_param=query_param)


def _check_unique(section: Section, upstreams: tuple[UpstreamConfig, ...]) -> None:
    seen_hosts: dict[str, str] = {}
    seen_prefixes: dict[str, str] = {}
    for upstream in upstreams:
        for host in upstream.hosts:
            if host in seen_hosts:
                section.problem(None, f"host {host} is claimed by upstreams "
                                f"{seen_hosts[host]} and {upstream.name}")
            seen_hosts[host] = upstream.name
        if isinstance(upstream.path_prefix, str):
            if upstream.path_prefix in seen_prefixes:
                section.problem(None, f"path_prefix {upstream.path_prefix} is claimed twice")
            seen_prefixes[upstream.path_prefix] = upstream.name


def _header_name(text: str) -> bytes:
    value = text.strip()
    if not _HEADER_NAME.match(value):
        raise ValueError(f"expected an HTTP header name, got {text!r}")
    return value.lower().encode("ascii")


def _path_prefix(text: str) -> str:
    value = text.strip().rstrip("/")
    if not value or not _PREFIX.match(value) or "//" in value or "/." in value:
        raise ValueError(f"expected a path prefix such as /stripe, got {text!r}")
    return value


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"expected an IP address, got {text!r}") from None


def _secret_name(text: str) -> str:
    value = text.strip()
    if not value or len(value) > 256 or any(c in value for c in "\r\n\x00"):
        raise ValueError(f"expected the name of a secret in the store, got {text!r}")
    return value
