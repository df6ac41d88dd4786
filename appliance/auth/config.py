"""
Authentication settings read from a service's section, and the wiring that
turns them into methods a service assembles into per-upstream chains.

Keys (all optional)::

    session_header          = x-session-secret
    kubernetes_api          = https://kubernetes.default.svc   (turns TokenReview on)
    kubernetes_ca           = /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
    kubernetes_token_file   = /var/run/secrets/kubernetes.io/serviceaccount/token
    kubernetes_audiences    = secretproxy                       (required with the API)
    kubernetes_header       = authorization
    kubernetes_timeout      = 2s
    kubernetes_cache_ttl    = 60s
    kubernetes_negative_ttl = 5s
    kubernetes_cache_entries = 10000
    mtls_trust_domains      = prod.example                      (SPIFFE trust domains)

and one C{[<service>.session:<identity>]} section per session secret, with
C{secret = ${env:NAME}} or C{file:/path} and optional C{namespace} and
C{service_account}.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen
from prometheus_client import CollectorRegistry

from appliance.auth.kubernetes import KubernetesAuth
from appliance.auth.model import AuthMethod, Identity
from appliance.auth.mtls import MTLSAuth
from appliance.auth.session import SessionSecretAuth
from appliance.auth.tokenreview import TokenReviewClient
from appliance.host.ini import INVALID, Section
from appliance.host.secret import Secret
from appliance.host.values import in_range, parse_duration, parse_int, parse_list

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MIN_SESSION_SECRET = 16
_HEADER = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,252}")
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ACCOUNT = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_KUBERNETES_KEYS = ("kubernetes_ca", "kubernetes_token_file", "kubernetes_audiences",
                    "kubernetes_header", "kubernetes_timeout", "kubernetes_cache_ttl",
                    "kubernetes_negative_ttl", "kubernetes_cache_entries")


@frozen
class SessionConfig:
    """One C{[<service>.session:<identity>]} section."""

    identity: str
    secret: Secret = field(repr=False)
    namespace: str | None = None
    service_account: str | None = None


@frozen
class KubernetesConfig:
    """How to reach TokenReview and how long to trust its answers."""

    api: str
    ca: str
    token_file: str
    audiences: tuple[str, ...]
    header: bytes = b"authorization"
    timeout: float = 2.0
    cache_ttl: float = 60.0
    negative_ttl: float = 5.0
    cache_entries: int = 10_000


@frozen
class AuthConfig:
    """Everything a service's authentication is configured with."""

    service: str
    session_header: bytes = b"x-session-secret"
    sessions: tuple[SessionConfig, ...] = ()
    kubernetes: KubernetesConfig | None = None
    mtls_trust_domains: tuple[str, ...] = ()


def parse_auth(section: Section) -> AuthConfig:
    """
    Read the authentication keys of a service section and its session
    sections; problems are recorded in the section, never raised.
    """
    session_header = section.get("session_header", _header, b"x-session-secret")
    return AuthConfig(
        service=section.name,
        session_header=session_header,
        sessions=_sessions(section),
        kubernetes=_kubernetes(section, session_header),
        mtls_trust_domains=section.get("mtls_trust_domains", _trust_domains, ()),
    )


def _header(text: str) -> bytes:
    name = text.strip().lower()
    if not _HEADER.fullmatch(name):
        raise ValueError(f"expected an HTTP header name, got {text!r}")
    return name.encode("ascii")


def _pattern(regex: re.Pattern[str], what: str) -> Any:
    def convert(text: str) -> str:
        value = text.strip()
        if not regex.fullmatch(value):
            raise ValueError(f"expected {what}, got {text!r}")
        return value
    return convert


def _trust_domains(text: str) -> tuple[str, ...]:
    domains = parse_list(text.lower())
    for domain in domains:
        if not _TRUST_DOMAIN.fullmatch(domain):
            raise ValueError(f"expected SPIFFE trust domains such as prod.example, got {domain!r}")
    return domains


def _https_url(text: str) -> str:
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path or parts.query:
        raise ValueError(f"expected an https:// URL of the API server, got {text!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"expected an https:// URL of the API server, got {text!r}") from None
    return url


def _path(section: Section, key: str, default: str) -> str:
    value = section.get(key, str, None)
    if value is None or value is INVALID:
        return default
    path = value.strip()
    raw = section.raw.values.get(key)
    if raw is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(os.path.dirname(raw.file), path))
    return path


def _sessions(section: Section) -> tuple[SessionConfig, ...]:
    sessions: list[SessionConfig] = []
    owners: dict[str, str] = {}
    for label, child in section.children("session"):
        secret = child.secret("secret")
        namespace = child.get("namespace", _pattern(_NAMESPACE, "a Kubernetes namespace"), None)
        account = child.get("service_account",
                            _pattern(_ACCOUNT, "a Kubernetes service account name"), None)
        if not _IDENTITY.fullmatch(label):
            child.problem(None, "an identity name is letters, digits and . _ : @ / -")
            continue
        if not isinstance(secret, Secret):
            continue
        value = secret.reveal()
        if len(value.encode("utf-8")) < MIN_SESSION_SECRET:
            child.problem("secret", f"a session secret needs at least {MIN_SESSION_SECRET} "
                          "bytes (32 random bytes recommended)")
            continue
        if value in owners:
            child.problem("secret", f"the same secret as [{section.name}.session:"
                          f"{owners[value]}]; every identity needs its own")
            continue
        owners[value] = label
        if INVALID in (namespace, account):
            continue
        sessions.append(SessionConfig(label, secret, namespace, account))
    return tuple(sessions)


def _kubernetes(section: Section, session_header: bytes) -> KubernetesConfig | None:
    api = section.get("kubernetes_api", _https_url, None)
    ca = _path(section, "kubernetes_ca", f"{SERVICE_ACCOUNT_DIR}/ca.crt")
    token_file = _path(section, "kubernetes_token_file", f"{SERVICE_ACCOUNT_DIR}/token")
    audiences = section.get("kubernetes_audiences", parse_list, ())
    header = section.get("kubernetes_header", _header, b"authorization")
    timeout = section.get("kubernetes_timeout", in_range(parse_duration, 0.01, 60), 2.0)
    cache_ttl = section.get("kubernetes_cache_ttl", in_range(parse_duration, 0, 3600), 60.0)
    negative_ttl = section.get("kubernetes_negative_ttl", in_range(parse_duration, 0, 3600),
                               5.0)
    entries = section.get("kubernetes_cache_entries", in_range(parse_int, 1, 10_000_000),
                          10_000)
    if api is None:
        for key in _KUBERNETES_KEYS:
            if section.has(key):
                section.problem(key, "has no effect without kubernetes_api")
        return None
    if not audiences and audiences is not INVALID:
        section.problem("kubernetes_audiences", "is required with kubernetes_api: without "
                        "an audience, tokens meant for the API server itself (or any "
                        "other service) would be accepted")
    if header == session_header:
        section.problem("kubernetes_header", "is the same header as session_header")
    if not _readable_ca(ca):
        section.problem("kubernetes_ca", f"cannot read a PEM certificate from {ca}")
    if INVALID in (api, audiences, header, timeout, cache_ttl, negative_ttl, entries):
        return None
    return KubernetesConfig(api=api, ca=ca, token_file=token_file, audiences=audiences,
                            header=header, timeout=timeout, cache_ttl=cache_ttl,
                            negative_ttl=negative_ttl, cache_entries=int(entries))


def _readable_ca(path: str) -> bool:
    from cryptography import x509

    try:
        with open(path, "rb") as handle:
            return bool(x509.load_pem_x509_certificates(handle.read()))
    except (OSError, ValueError):
        return False


def build_authenticators(config: AuthConfig, clock: Any, reactor: Any,
                         registry: CollectorRegistry | None, redis: Any) -> dict[str, AuthMethod]:
    """
    Build the configured methods by name (C{session} when session sections
    exist, C{kubernetes} when C{kubernetes_api} is set, C{mtls} always), for
    the service to chain per upstream with L{Authenticator}. Close the
    C{kubernetes} method (C{close()}) when the service stops.

    @param redis: the shared L{RedisLink}, or None; TokenReview answers are
        shared through it when given.
    """
    methods: dict[str, AuthMethod] = {
        "mtls": MTLSAuth(config.mtls_trust_domains, registry=registry)}
    if config.sessions:
        methods["session"] = SessionSecretAuth(
            ((Identity(name=s.identity, method="session", namespace=s.namespace,
                       service_account=s.service_account), s.secret)
             for s in config.sessions),
            header=config.session_header, registry=registry)
    k8s = config.kubernetes
    if k8s is not None:
        client = TokenReviewClient(reactor, k8s.api, k8s.ca, k8s.token_file, k8s.audiences,
                                   connect_timeout=k8s.timeout)
        methods["kubernetes"] = KubernetesAuth(
            client, clock, header=k8s.header, timeout=k8s.timeout, cache_ttl=k8s.cache_ttl,
            negative_ttl=k8s.negative_ttl, max_entries=k8s.cache_entries, redis=redis,
            registry=registry, instance=f"auth_{config.service}_kubernetes")
    return methods
