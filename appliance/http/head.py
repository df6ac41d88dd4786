"""
HTTP/1.1 message heads, sans-IO and strict.

Strictness is the defence against request smuggling: a request is refused
(400) when its framing could be read two ways — conflicting or duplicate
Content-Length, Content-Length with Transfer-Encoding, any coding but a lone
C{chunked}, signed or non-decimal lengths, obs-fold, whitespace before a
colon, bare CR or LF, duplicate Host.
"""

from __future__ import annotations

import re

from attrs import define

from appliance.http.errors import HTTPError

TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
MAX_CONTENT_LENGTH_DIGITS = 18
SINGLETON = frozenset({b"host", b"content-length", b"transfer-encoding", b"authorization",
                       b"proxy-authorization", b"content-type", b"expect"})


@define(slots=True)
class Head:
    """
    A parsed message head.

    @ivar headers: every field as (lower-case name, value) in arrival order.
    @ivar fields: name -> value (the last one, for names that appear once).
    @ivar repeated: names that appeared more than once.
    """

    version: bytes
    headers: list[tuple[bytes, bytes]]
    fields: dict[bytes, bytes]
    repeated: set[bytes]
    content_length: int | None
    chunked: bool

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The value of a header (lower-case name)."""
        return self.fields.get(name, default)

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated, lower-cased tokens of every C{name} field."""
        found: set[bytes] = set()
        for field_name, value in self.headers:
            if field_name == name:
                found.update(part.strip().lower() for part in value.split(b",") if part.strip())
        return found


@define(slots=True)
class RequestHead(Head):
    """A request head."""

    method: bytes = b""
    target: bytes = b""

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept after this exchange."""
        connection = self.tokens(b"connection") if b"connection" in self.fields else set()
        if self.version == b"HTTP/1.1":
            return b"close" not in connection
        return b"keep-alive" in connection


@define(slots=True)
class ResponseHead(Head):
    """A response head."""

    status: int = 0
    reason: bytes = b""


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line ending the head, or -1."""
    index = buffer.find(b"\r\n\r\n", start)
    return -1 if index < 0 else index + 4


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a complete request head (ending with the blank line)."""
    first = data.find(b"\r\n")
    parts = data[:first].split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not TOKEN.match(method):
        raise HTTPError(400, "malformed method")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HTTPError(505, "HTTP version not supported")
        raise HTTPError(400, "malformed request line")
    if not target or _CTL.search(target):
        raise HTTPError(400, "malformed request target")
    headers, fields, repeated = _parse_block(data[first + 2:-2])
    content_length, chunked = _framing(fields, repeated, version)
    if version == b"HTTP/1.1" and b"host" not in fields:
        raise HTTPError(400, "missing Host header")
    return RequestHead(version=version, headers=headers, fields=fields, repeated=repeated,
                       content_length=content_length, chunked=chunked, method=method,
                       target=target)


def parse_response_head(data: bytes) -> ResponseHead:
    """Parse a complete response head from an upstream (errors are 502s)."""
    first = data.find(b"\r\n")
    parts = data[:first].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HTTPError(502, "malformed upstream status line")
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        raise HTTPError(502, "malformed upstream status code")
    try:
        headers, fields, repeated = _parse_block(data[first + 2:-2])
        content_length, chunked = _framing(fields, repeated, parts[0])
    except HTTPError as error:
        raise HTTPError(502, f"upstream {error.reason}") from None
    return ResponseHead(version=parts[0], headers=headers, fields=fields, repeated=repeated,
                        content_length=content_length, chunked=chunked, status=int(code),
                        reason=parts[2] if len(parts) > 2 else b"")


# Anything a header block must not hold: control characters other than the
# CRLF line ends, a bare CR or LF, or a line starting with whitespace
# (obs-fold). One pass over the whole block instead of one per field.
_BAD_BLOCK = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n|\n[ \t]")
_FIELD_LINE = re.compile(rb"([^:\r\n]*):([^\r\n]*)\r\n")


def _parse_block(block: bytes
                 ) -> tuple[list[tuple[bytes, bytes]], dict[bytes, bytes], set[bytes]]:
    """The header lines (each ending in CRLF) as a list, a dict and repeated names."""
    headers: list[tuple[bytes, bytes]] = []
    fields: dict[bytes, bytes] = {}
    repeated: set[bytes] = set()
    if not block:
        return headers, fields, repeated
    if block[0] in (0x20, 0x09):
        raise HTTPError(400, "obsolete line folding")
    bad = _BAD_BLOCK.search(block)
    if bad is not None:
        if bad.group().startswith(b"\n"):
            raise HTTPError(400, "obsolete line folding")
        raise HTTPError(400, "control character in a header value")
    pairs = _FIELD_LINE.findall(block)
    if len(pairs) != block.count(b"\r\n"):
        raise HTTPError(400, "malformed header line")
    token = TOKEN.match
    for name, value in pairs:
        if token(name) is None:
            raise HTTPError(400, "malformed header name")
        name = name.lower()
        value = value.strip(b" \t")
        if name in fields:
            repeated.add(name)
            if name in SINGLETON:
                raise HTTPError(400, f"duplicate {name.decode()} header")
        fields[name] = value
        headers.append((name, value))
    return headers, fields, repeated


def _framing(fields: dict[bytes, bytes], repeated: set[bytes],
             version: bytes) -> tuple[int | None, bool]:
    encoding = fields.get(b"transfer-encoding")
    length = fields.get(b"content-length")
    if encoding is not None:
        if length is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if version == b"HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding in HTTP/1.0")
        if encoding.lower() != b"chunked":
            raise HTTPError(400, "unsupported Transfer-Encoding")
        return None, True
    if length is not None:
        if not length.isdigit() or len(length) > MAX_CONTENT_LENGTH_DIGITS:
            raise HTTPError(400, "malformed Content-Length")
        return int(length), False
    return None, False
