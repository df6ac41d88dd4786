"""The client's address of a connection, cheaply."""

from __future__ import annotations

from typing import Any


def peer_host(transport: Any, unknown: str = "?") -> str:
    """
    The client's IP address: from the raw address tuple a TCP transport
    keeps (C{transport.client}) when there is one, which costs no address
    object per connection; else from C{getPeer()} (TLS, memory transports);
    C{unknown} for an address without a host (a UNIX socket).
    """
    client = getattr(transport, "client", None)
    if type(client) is tuple and client and type(client[0]) is str:
        return client[0]
    return str(getattr(transport.getPeer(), "host", unknown))
