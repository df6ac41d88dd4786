"""
Routing and injection: which configured upstream a request is for, and how
its secret is put into the outgoing request. Nothing here is taken from the
client but the choice of upstream among the configured ones.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote, quote_plus, unquote_to_bytes

from appliance.http.errors import HTTPError
from appliance.http.normalize import BadRequest, header_value_is_safe, normalize_upstream_host
from appliance.secretproxy.config import UpstreamConfig


class RouteTable:
    """Upstreams by exact (normalised) host name and by path prefix."""

    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        self.by_host: dict[str, UpstreamConfig] = {}
        for upstream in upstreams:
            for host in upstream.hosts:
                self.by_host[host] = upstream
        self.prefixes = sorted(((u.path_prefix, u) for u in upstreams if u.path_prefix),
                               key=lambda item: -len(item[0]))  # longest first
        self._header_cache: dict[bytes, str | None] = {}

    def by_header(self, value: bytes) -> UpstreamConfig | None:
        """The upstream an X-Upstream-Host value names exactly, or None."""
        host = self._header_cache.get(value)
        if host is None:
            try:
                host = normalize_upstream_host(value)
            except BadRequest:
                raise HTTPError(400, "bad upstream host header") from None
            if len(self._header_cache) < 4096:
                self._header_cache[value] = host
        return self.by_host.get(host)

    def by_path(self, path: str) -> tuple[UpstreamConfig, str] | None:
        """The upstream whose prefix starts C{path} (at a segment boundary), and the rest."""
        for prefix, upstream in self.prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                return upstream, path[len(prefix):] or "/"
        return None


def render_injection(upstream: UpstreamConfig, secret: str) -> tuple[bytes, bytes] | bytes:
    """
    The injected (header name, value), or for query injection the
    C{name=value} pair to append. Refuses values with CR, LF or NUL.
    """
    injection = upstream.injection
    if not header_value_is_safe(secret):
        raise HTTPError(502, "secret value is not usable in a request")
    if injection.kind == "query":
        return (quote(injection.query_param, safe="") + "=" + quote(secret, safe="")).encode(
            "ascii")
    if injection.kind == "basic":
        pair = f"{injection.basic_user}:{secret}".encode()
        value = b"Basic " + base64.b64encode(pair)
    else:
        value = injection.template.replace("{secret}", secret).encode("utf-8")
    if not header_value_is_safe(value):
        raise HTTPError(502, "rendered injection is not usable in a request")
    return injection.header, value


MIN_MASKED = 4
"""Secret spellings shorter than this are not masked (they would shred every header)."""


def echo_masks(upstream: UpstreamConfig, secret: str) -> tuple[bytes, ...]:
    """
    The spellings of C{secret} an upstream may echo back in a response head
    (a redirect to the request's own URL, a debug header): as is,
    percent-encoded as injected into a query, form-encoded, and, for basic
    injection, the base64 credentials.
    """
    raw = secret.encode("utf-8")
    masks = {raw, quote(secret, safe="").encode("ascii"), quote_plus(secret).encode("ascii")}
    if upstream.injection.kind == "basic":
        masks.add(base64.b64encode(f"{upstream.injection.basic_user}:{secret}".encode()))
    # Longest first, so that a spelling containing another is masked whole.
    return tuple(sorted((m for m in masks if len(m) >= MIN_MASKED), key=len, reverse=True))


def strip_query_param(query: bytes | None, name: str) -> bytes | None:
    """
    The query without any C{name=...} the client sent (the proxy owns it),
    however the name is spelled: the upstream decodes C{%6Bey} or C{k+y}
    like C{key}, so names are compared decoded.
    """
    if not query:
        return query
    key = name.encode("utf-8")
    kept = [part for part in query.split(b"&")
            if part and unquote_to_bytes(part.split(b"=", 1)[0].replace(b"+", b" ")) != key]
    return b"&".join(kept) if kept else None


def status_class(status: int) -> str:
    """2xx, 3xx, 4xx or 5xx (bounded metric label)."""
    return _CLASSES.get(status // 100, "other")


_CLASSES: dict[int, Any] = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
