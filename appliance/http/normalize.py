"""
Normalise request paths and upstream host names once, before any decision.

The invariant this module exists for: B{the path policy decides on is the
path the upstream receives}. L{normalize_path} decodes the request path
exactly once, resolves every ambiguity (encoded slashes and dots,
backslashes, C{;params}, dot segments, duplicate slashes) and returns
both the decoded text (C{path}, for policy) and its canonical re-encoding
(C{wire}, for the upstream). Decoding C{wire} once gives C{path} again,
and normalising C{wire} gives the same result, so the upstream cannot
read the request differently from the policy (C{/public/..%2Fadmin}
is decided and forwarded as C{/admin}).

L{normalize_upstream_host} puts an C{X-Upstream-Host} value into the
canonical form the caller's configured names are in, so that it can be
matched I{exactly} against a table: never by prefix or suffix.

Everything here is sans-IO and O(n) in the input: precomputed tables and
C-level scans (C{bytes.split}, C{bytes.translate}, one character-class
regex, no backtracking).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType
from typing import NamedTuple

from appliance.http.errors import HTTPError

MAX_PATH_LENGTH = 8 * 1024
"""Default longest raw path (and re-encoded path) accepted, in bytes."""

DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"https": 443, "http": 80})
"""The port each scheme implies; an explicit default port is dropped."""


class BadRequest(HTTPError):
    """
    A request target or header value refused with 400; C{reason} is a short
    fixed phrase for logs and metrics (never the offending input).
    """

    def __init__(self, reason: str) -> None:
        """@param reason: a fixed phrase such as C{"double encoding"}."""
        super().__init__(400, reason)


class NormalizedPath(NamedTuple):
    """
    A normalised request path.

    @ivar path: the decoded path, for policy (always starts with C{/}).
    @ivar wire: C{path} re-encoded for the upstream: every byte of its
        UTF-8 form outside RFC 3986 C{pchar} and C{/} as upper-case C{%XX}.
    """

    path: str
    wire: bytes

    def target(self, query: bytes | None = None) -> bytes:
        """The request-target to send upstream: C{wire}, then C{?query} if any."""
        return self.wire if query is None else self.wire + b"?" + query


_new_path = tuple.__new__  # NormalizedPath(...) minus its Python-level __new__

# -- tables ------------------------------------------------------------------

_HEX_DIGITS = b"0123456789abcdefABCDEF"
_UNHEX: dict[bytes, bytes] = {
    bytes((high, low)): bytes((int(bytes((high, low)), 16),))
    for high in _HEX_DIGITS for low in _HEX_DIGITS
}

# RFC 3986: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"; plus "/".
_WIRE_SAFE = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
              b"-._~!$&'()*+,;=:@/")
_PLAIN = _WIRE_SAFE.replace(b";", b"")
_ENCODE: tuple[bytes, ...] = tuple(
    bytes((byte,)) if byte in _WIRE_SAFE else b"%%%02X" % byte for byte in range(256)
)

# After decoding: C0 controls, DEL, a "%" (double encoding), C1 controls in UTF-8.
_FORBIDDEN_DECODED = re.compile(rb"[\x00-\x1f\x7f%]|\xc2[\x80-\x9f]")
# Never valid in a query on the wire: C0 controls (CR, LF, NUL...), space, DEL.
_QUERY_CONTROLS = bytes(range(0x21)) + b"\x7f"


# -- paths -------------------------------------------------------------------

def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """
    Split an origin-form request-target at its first C{?}.

    @return: the path bytes and the query bytes (C{None} without a C{?},
        C{b""} for a bare C{?}), both untouched.
    """
    path, question, query = target.partition(b"?")
    return path, (query if question else None)


def sanitize_query(query: bytes) -> bytes:
    """
    The query unchanged, byte for byte, if it is safe to forward.

    Refuses CR, LF, NUL and the other C0 controls, space and DEL: none is
    valid in a request-target, and CR/LF would split the upstream request.

    @raise BadRequest: C{"control character in query"}.
    """
    if len(query.translate(None, _QUERY_CONTROLS)) != len(query):
        raise BadRequest("control character in query")
    return query


def normalize_path(raw: bytes | bytearray, max_length: int = MAX_PATH_LENGTH) -> NormalizedPath:
    """
    Normalise the path part (no query) of an origin-form request-target.

    In order: percent-decode every escape once (C{%2F}, C{%5C} and C{%2E}
    included); refuse controls, a C{%} left after decoding (double
    encoding) and non-UTF-8; treat C{\\} as C{/}; cut C{;params} from every
    segment; remove dot segments (C{..} above the root stays at the root)
    and empty segments; keep a trailing slash.

    @param raw: the path bytes, as from L{split_target}.
    @param max_length: longest accepted C{raw} and C{wire}, in bytes.
    @raise BadRequest: with one of the reasons C{"asterisk-form target"},
        C{"absolute-form target"}, C{"not origin-form"}, C{"path too long"},
        C{"query in path"}, C{"fragment in path"},
        C{"invalid percent escape"}, C{"control character"},
        C{"double encoding"}, C{"invalid utf-8"}.
    """
    if type(raw) is not bytes:
        raw = bytes(raw)  # a bytearray
    if len(raw) > max_length:
        raise BadRequest("path too long")
    if not raw.startswith(b"/"):
        raise BadRequest(_not_origin_form(raw))
    if not raw.translate(None, _PLAIN):
        # Only pchar (no "%" or ";"): canonical unless a segment is empty or dots.
        text = raw.decode("ascii")
        if "//" not in text and "/." not in text:
            return _new_path(NormalizedPath, (text, raw))
    # bytes.find, not "in": on bytes, "in" takes a slower buffer-protocol route.
    if raw.find(b"?") >= 0:
        raise BadRequest("query in path")
    if raw.find(b"#") >= 0:
        raise BadRequest("fragment in path")

    decoded = _percent_decode(raw) if raw.find(b"%") >= 0 else raw
    bad = _FORBIDDEN_DECODED.search(decoded)
    if bad is not None:
        raise BadRequest("double encoding" if bad.group() == b"%" else "control character")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid utf-8") from None

    if "\\" in text:
        text = text.replace("\\", "/")
    if ";" in text or "//" in text or "/." in text:
        text = _remove_dot_segments(text)

    encoded = text.encode("utf-8")
    if encoded.translate(None, _WIRE_SAFE):
        encoded = b"".join([_ENCODE[byte] for byte in encoded])
        if len(encoded) > max_length:
            raise BadRequest("path too long")
    return _new_path(NormalizedPath, (text, encoded))


def normalize_target(target: bytes, max_length: int = MAX_PATH_LENGTH
                     ) -> tuple[NormalizedPath, bytes | None]:
    """
    L{split_target}, L{normalize_path} and L{sanitize_query} in one call.

    @return: the normalised path and the untouched query (or C{None}).
    @raise BadRequest: as the three functions do.
    """
    path, query = split_target(target)
    normalized = normalize_path(path, max_length)
    if query is not None:
        sanitize_query(query)
    return normalized, query


def _not_origin_form(raw: bytes) -> str:
    if raw == b"*":
        return "asterisk-form target"
    if b"://" in raw:
        return "absolute-form target"
    return "not origin-form"


def _percent_decode(raw: bytes) -> bytes:
    """Decode every C{%XX} once; any other C{%} is an error."""
    parts = raw.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        byte = _UNHEX.get(part[:2])
        if byte is None:
            raise BadRequest("invalid percent escape")
        out.append(byte)
        out.append(part[2:])
    return b"".join(out)


def _remove_dot_segments(text: str) -> str:
    """
    Cut C{;params}, drop empty and C{.} segments, apply C{..} (never above
    the root); a trailing slash, C{.} or C{..} leaves a trailing slash.
    """
    segments = text.split("/")
    kept: list[str] = []
    segment = ""
    for segment in segments[1:]:
        if ";" in segment:
            segment = segment[:segment.index(";")]
        if segment == "..":
            if kept:
                kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    if not kept:
        return "/"
    trailing = segment in ("", ".", "..")
    return "/" + "/".join(kept) + ("/" if trailing else "")


# -- header values -----------------------------------------------------------

def header_value_is_safe(value: bytes | str) -> bool:
    """
    Whether C{value} may be written into a header: no CR, LF or NUL.

    For rendered injection templates and secret values, checked before
    they reach the wire.
    """
    if isinstance(value, str):
        return not ("\r" in value or "\n" in value or "\0" in value)
    return not (b"\r" in value or b"\n" in value or b"\0" in value)


# -- upstream host names -----------------------------------------------------

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]")
_HOST_REASONS = {
    "@": "userinfo in host", "#": "fragment in host", "%": "percent in host",
    "/": "path in host", "?": "query in host", "\\": "backslash in host",
    ",": "more than one host",
}
HOST_MEMO_SIZE = 1024
_host_memo: dict[tuple[str | bytes, str], str] = {}
_MAX_NAME = 253
_MAX_LABEL = 63
_MAX_HOST_VALUE = _MAX_NAME + 1 + 6  # a trailing dot, ":65535"
_HEX_LOWER = frozenset("0123456789abcdef")


def normalize_upstream_host(value: str | bytes | bytearray, scheme: str = "https",
                            default_ports: Mapping[str, int] = DEFAULT_PORTS) -> str:
    """
    The canonical form of an C{X-Upstream-Host} value: C{host} or C{host:port}.

    Lower-cases, strips one trailing dot, drops the port when it is the
    default for C{scheme}, and writes an IPv6 literal as C{[compressed]}.
    Refuses userinfo, C{#}, C{%}, C{/}, C{?}, C{\\}, whitespace, controls,
    commas (a second host), non-ASCII (send IDNA as C{xn--}), empty or
    over-long labels, labels starting or ending with C{-}, anything but
    letters, digits and C{-} in a name, a numeric last label that is not a
    canonical dotted-quad IPv4 (C{127.1}, C{0x7f.1}, C{017.0.0.1}), an
    unbracketed IPv6 literal, and ports that are empty, non-decimal, have a
    leading zero, or lie outside 1-65535.

    Normalise the configured names with this same function at config load,
    then match the result exactly (a dict lookup), never by prefix/suffix.

    Accepted values are remembered (at most C{HOST_MEMO_SIZE}, then the
    memo starts afresh), so a repeated value costs one dict lookup.

    @param scheme: the scheme whose default port is dropped.
    @raise BadRequest: the value is not one safe host.
    @raise ValueError: C{scheme} has no entry in C{default_ports}.
    """
    if default_ports is not DEFAULT_PORTS or isinstance(value, bytearray):
        return _normalize_upstream_host(value, scheme, default_ports)
    key = (value, scheme)
    canonical = _host_memo.get(key)
    if canonical is None:
        canonical = _normalize_upstream_host(value, scheme, default_ports)
        if len(_host_memo) >= HOST_MEMO_SIZE:
            _host_memo.clear()
        _host_memo[key] = canonical
    return canonical


def _normalize_upstream_host(value: str | bytes | bytearray, scheme: str,
                             default_ports: Mapping[str, int]) -> str:
    default_port = default_ports.get(scheme)
    if default_port is None:
        raise ValueError(f"no default port for scheme {scheme!r}")
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("non-ascii host") from None
    if not value:
        raise BadRequest("empty host")
    if len(value) > _MAX_HOST_VALUE:
        raise BadRequest("host too long")
    if not _HOST_CHARS.issuperset(value):
        raise BadRequest(_bad_character(value))

    port_text: str | None
    if value[0] == "[":
        host, port_text = _bracketed(value)
    else:
        if "[" in value or "]" in value:
            raise BadRequest("misplaced bracket in host")
        host, colon, port_text = value.partition(":")
        if not colon:
            port_text = None
        elif ":" in port_text:
            raise BadRequest("unbracketed IPv6 literal")
        host = _name(host)
    if port_text is None:
        return host
    port = _port(port_text)
    return host if port == default_port else f"{host}:{port}"


def _bad_character(value: str) -> str:
    for char in value:
        if char in _HOST_CHARS:
            continue
        reason = _HOST_REASONS.get(char)
        if reason is not None:
            return reason
        if char.isspace() or char < " " or char == "\x7f":
            return "whitespace or control in host"
        if char > "\x7f":
            return "non-ascii host"
        return "invalid character in host"
    raise AssertionError("no bad character")  # pragma: no cover


def _bracketed(value: str) -> tuple[str, str | None]:
    close = value.find("]")
    if close < 0:
        raise BadRequest("unclosed bracket in host")
    inner, rest = value[1:close], value[close + 1:]
    if "[" in inner or "[" in rest or "]" in rest or (rest and rest[0] != ":"):
        raise BadRequest("misplaced bracket in host")
    try:
        address = IPv6Address(inner)
    except ValueError:
        raise BadRequest("invalid IPv6 literal") from None
    return f"[{address.compressed}]", (rest[1:] if rest else None)


def _name(host: str) -> str:
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise BadRequest("empty host")
    if len(host) > _MAX_NAME:
        raise BadRequest("host too long")
    host = host.lower()
    labels = host.split(".")
    for label in labels:
        if not label:
            raise BadRequest("empty label in host")
        if len(label) > _MAX_LABEL:
            raise BadRequest("label too long in host")
        if label[0] == "-" or label[-1] == "-":
            raise BadRequest("hyphen at label edge in host")
    last = labels[-1]
    if last.isdigit() or (last[:2] == "0x" and _HEX_LOWER.issuperset(last[2:])):
        # A numeric last label makes resolvers read the name as an IPv4
        # address, in forms (127.1, 0x7f.1, 017.0.0.1) only some accept.
        try:
            address = IPv4Address(host)
        except ValueError:
            raise BadRequest("ambiguous numeric host") from None
        host = str(address)
    return host


def _port(text: str) -> int:
    if not text:
        raise BadRequest("empty port")
    if not text.isdigit() or len(text) > 5:
        raise BadRequest("invalid port")
    port = int(text)
    if not 0 < port <= 65535:
        raise BadRequest("port out of range")
    if text[0] == "0":
        raise BadRequest("port with leading zero")
    return port
