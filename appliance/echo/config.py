"""The C{[echo]} section."""

from __future__ import annotations

from attrs import frozen

from appliance.host.ini import Section
from appliance.host.values import in_range, parse_duration, parse_endpoint, parse_int, parse_size


@frozen
class EchoConfig:
    """
    @ivar listen: endpoint string to accept connections on.
    @ivar tls: name of the C{[tls:NAME]} context to serve TLS with, if any.
    @ivar max_line_length: longest line accepted, in bytes.
    @ivar delay: how long each line is held before it is echoed (simulated
        work, handy to exercise load balancers and drains).
    @ivar idle_timeout: close a connection silent this long.
    @ivar max_connections: connections beyond this are refused with C{ERR busy}.
    """

    listen: str
    tls: str | None
    max_line_length: int
    delay: float
    idle_timeout: float
    max_connections: int


def parse(section: Section) -> EchoConfig:
    """Validate C{[echo]}."""
    return EchoConfig(
        listen=section.get("listen", parse_endpoint, "tcp:9471:interface=127.0.0.1"),
        tls=section.reference("tls", "tls", None),
        max_line_length=section.get("max_line_length", in_range(parse_size, 1, 16 * 1024**2),
                                    64 * 1024),
        delay=section.get("delay", in_range(parse_duration, 0, 3600), 0.0),
        idle_timeout=section.get("idle_timeout", in_range(parse_duration, 0.001), 300.0),
        max_connections=section.get("max_connections", in_range(parse_int, 1), 1000),
    )
