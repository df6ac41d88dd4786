"""
What the secret proxy holds per configured upstream while it runs: the
config, its authenticator, resolver and bulkhead, and the parts of the
upstream request that do not change from request to request (the Host
line, the rendered injection, the interned connection targets).
"""

from __future__ import annotations

from typing import Any

from attrs import define, field

from appliance.http.upstream import UpstreamTarget
from appliance.secretproxy.config import UpstreamConfig
from appliance.secretproxy.routes import echo_masks, render_injection

MAX_TARGETS = 64  # connection targets kept per upstream


@define(slots=True, eq=False)
class UpstreamRuntime:
    """
    What the pipeline holds per upstream: config and its live helpers, and
    the parts of the upstream request head that do not change per request.
    """

    config: UpstreamConfig
    authenticator: Any
    resolver: Any
    bulkhead: Any
    drop: frozenset[bytes]
    client_tls: Any
    host_line: bytes = field(init=False)
    _injection: tuple[str, tuple[bytes | None, bytes | None], tuple[bytes, ...]] | None = \
        field(init=False, default=None)
    _targets: dict[str, UpstreamTarget] = field(init=False, factory=dict)
    _address: tuple[Any, str] = field(init=False, default=(None, ""))

    def __attrs_post_init__(self) -> None:
        self.host_line = b"Host: " + self.config.authority

    def injection(self, secret: str) -> tuple[bytes | None, bytes | None]:
        """
        L{render_injection} of C{secret} as (the query's C{name=value}, None)
        or (None, the header line). The current value's rendering is kept
        (only that one: a rotated-out secret is not held on to); a refused
        value raises every time.
        """
        cached = self._injection
        if cached is not None and cached[0] == secret:
            return cached[1]
        rendered = render_injection(self.config, secret)
        if type(rendered) is tuple:
            found: tuple[bytes | None, bytes | None] = (None, rendered[0] + b": " + rendered[1])
        else:
            found = (rendered, None)  # type: ignore[assignment]
        self._injection = (secret, found, echo_masks(self.config, secret))
        return found

    def masks(self, secret: str) -> tuple[bytes, ...]:
        """L{echo_masks} of C{secret} (of the current value: computed with its injection)."""
        cached = self._injection
        if cached is not None and cached[0] == secret:
            return cached[2]
        return echo_masks(self.config, secret)

    def target(self, address: str) -> UpstreamTarget:
        """The (interned) connection target for one vetted address."""
        found = self._targets.get(address)
        if found is None:
            config = self.config
            found = UpstreamTarget(address, config.port,
                                   config.host if config.scheme == "https" else None)
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            self._targets[address] = found
        return found

    def address_text(self, address: Any) -> str:
        """C{str(address)}, remembered for the last address seen (str() is slow)."""
        last, text = self._address
        if address is not last:
            text = str(address)
            self._address = (address, text)  # holding it: its id cannot be reused
        return text
