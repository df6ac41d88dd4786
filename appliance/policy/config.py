"""
The policy keys of a service section (C{policy}, C{opa_*}) and its
C{[<service>.rule:<name>]} sections, read into frozen attrs objects.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen

from appliance.host.ini import INVALID, Section
from appliance.host.secret import Secret
from appliance.host.values import in_range, one_of, parse_duration, parse_int
from appliance.policy.rules import Rule, parse_rules

MODES = ("rules", "opa", "both")
"""C{rules}: builtin only (default); C{opa}: OPA only; C{both}: both must allow."""

OPA_KEYS = ("opa_url", "opa_path", "opa_timeout", "opa_token", "opa_cache_ttl",
            "opa_cache_size")

_OPA_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*")


@frozen
class OPAConfig:
    """
    Where and how to ask OPA.

    @ivar url: the OPA server's base URL (C{http://127.0.0.1:8181}).
    @ivar path: the document to query, C{/}-separated (C{secretproxy/allow}).
    @ivar timeout: the bound of one question, in seconds.
    @ivar token: the bearer token OPA wants, if any.
    @ivar cache_ttl: how long an answer is reused, in seconds (0: not cached,
        concurrent identical questions still share one request).
    @ivar cache_size: most answers kept.
    """

    url: str
    path: str
    timeout: float = 0.5
    token: Secret | None = None
    cache_ttl: float = 5.0
    cache_size: int = 10000

    @property
    def data_url(self) -> str:
        """The Data API URL of the decision document."""
        return f"{self.url}/v1/data/{self.path}"

    @property
    def health_url(self) -> str:
        """OPA's health endpoint."""
        return f"{self.url}/health"


@frozen
class PolicyConfig:
    """
    @ivar mode: one of L{MODES}.
    @ivar rules: the builtin table (empty with C{policy = opa}).
    @ivar opa: OPA's settings with C{opa} and C{both}, else None.
    """

    mode: str = "rules"
    rules: tuple[Rule, ...] = ()
    opa: OPAConfig | None = None


def parse_opa_url(text: str) -> str:
    """An C{http(s)://host[:port][/prefix]} URL without credentials, query or fragment."""
    url = text.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ValueError(f"expected a URL such as http://127.0.0.1:8181, got {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in opa_url; use opa_token")
    if parts.query or parts.fragment:
        raise ValueError(f"opa_url takes no query or fragment, got {text!r}")
    return url


def parse_opa_path(text: str) -> str:
    """A data path such as C{secretproxy/allow} (dots are accepted for slashes)."""
    path = text.strip().strip("/").replace(".", "/")
    if _OPA_PATH.fullmatch(path) is None:
        raise ValueError(
            f"expected a data path such as secretproxy/allow (identifiers separated by /), "
            f"got {text!r}"
        )
    return path


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_policy(section: Section) -> PolicyConfig:
    """
    Read the policy keys of C{section} and its rule sections; problems are
    recorded on the sections, and the result then holds L{INVALID} values.
    """
    mode = section.get("policy", one_of(*MODES), "rules")
    url = section.get("opa_url", parse_opa_url, None)
    path = section.get("opa_path", parse_opa_path, None)
    timeout = section.get("opa_timeout", in_range(parse_duration, 0.001, 60.0), 0.5)
    token = section.secret("opa_token", None)
    cache_ttl = section.get("opa_cache_ttl", in_range(parse_duration, 0.0, 3600.0), 5.0)
    cache_size: Any = section.get("opa_cache_size", in_range(parse_int, 1, 10_000_000), 10000)
    rules = parse_rules(section)
    if mode is INVALID:
        return PolicyConfig(INVALID, rules, None)
    if mode == "rules":
        for key in OPA_KEYS:
            if section.has(key):
                section.problem(key, "is only used with policy = opa or policy = both")
        return PolicyConfig("rules", rules, None)
    for key, value in (("opa_url", url), ("opa_path", path)):
        if value is None:
            section.problem(key, f"is required with policy = {mode}")
    if mode == "opa" and rules:
        section.problem("policy", "rule sections are not used with policy = opa "
                                  "(use policy = both to apply them too)")
    if isinstance(token, Secret) and isinstance(url, str) and url.startswith("http://") \
            and not _is_loopback(url):
        section.problem("opa_token", "a token is only sent over https:// "
                                     "(or http:// to a loopback address)")
    opa = OPAConfig(url=INVALID if url is None else url, path=INVALID if path is None else path,
                    timeout=timeout, token=token, cache_ttl=cache_ttl, cache_size=cache_size)
    return PolicyConfig(mode, rules, opa)
