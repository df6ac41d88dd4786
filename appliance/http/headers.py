"""
Header rules for a proxy: hop-by-hop fields (and those named in
C{Connection}) never cross it; the response head is rebuilt in one piece.
"""

from __future__ import annotations

from appliance.http.head import Head

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})

# Framing and routing fields the engine sets itself on the way out.
ENGINE_OWNED_REQUEST = frozenset({b"host", b"content-length", b"expect", b"via",
                                  b"x-forwarded-for", b"x-forwarded-proto",
                                  b"x-forwarded-host"})
ENGINE_OWNED_RESPONSE = frozenset({b"content-length", b"via"})

VIA = b"1.1 appliance"


_WITH_HOP_BY_HOP: dict[frozenset[bytes], frozenset[bytes]] = {}


def dropped_fields(head: Head, extra: frozenset[bytes]) -> frozenset[bytes] | set[bytes]:
    """Names not to forward: hop-by-hop, those listed in Connection, and C{extra}."""
    fixed = _WITH_HOP_BY_HOP.get(extra)
    if fixed is None:  # a few fixed sets per service: remember their union
        fixed = HOP_BY_HOP | extra
        if len(_WITH_HOP_BY_HOP) < 64:
            _WITH_HOP_BY_HOP[extra] = fixed
    if b"connection" not in head.fields:
        return fixed
    return fixed | head.tokens(b"connection")


def forwardable(head: Head, extra: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The end-to-end fields of C{head} minus C{extra}, in order."""
    drop = dropped_fields(head, extra)
    return [(name, value) for name, value in head.headers if name not in drop]

