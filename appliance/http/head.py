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
_COMMON_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH",
                             b"OPTIONS"})  # tokens all: no regex needed
SINGLETON = frozenset({b"host", b"content-length", b"transfer-encoding", b"authorization",
                       b"proxy-authorization", b"content-type", b"expect"})


@define(slots=True)
class Head:
    """
    A parsed message head.

    @ivar headers: every field as (lower-case name, value) in arrival order.
    @ivar fields: name -> value (the last one, for names that appear once).
    @ivar repeated: names that appeared more than once (often a shared empty
        frozenset: never add to it).
    """

    version: bytes
    headers: list[tuple[bytes, bytes]]
    fields: dict[bytes, bytes]
    repeated: set[bytes] | frozenset[bytes]
    content_length: int | None
    chunked: bool

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The value of a header (lower-case name)."""
        return self.fields.get(name, default)

    def tokens(self, name: bytes) -> set[bytes] | frozenset[bytes]:
        """The comma-separated, lower-cased tokens of every C{name} field (read only)."""
        if name not in self.repeated:
            value = self.fields.get(name)
            return _NO_TOKENS if value is None else _tokens_of(value)
        found: set[bytes] = set()
        for field_name, value in self.headers:
            if field_name == name:
                found.update(_tokens_of(value))
        return found


@define(slots=True)
class RequestHead(Head):
    """A request head."""

    method: bytes = b""
    target: bytes = b""

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept after this exchange."""
        connection = self.tokens(b"connection")
        if self.version == b"HTTP/1.1":
            return b"close" not in connection
        return b"keep-alive" in connection


@define(slots=True)
class ResponseHead(Head):
    """A response head."""

    status: int = 0
    reason: bytes = b""


_NO_TOKENS: frozenset[bytes] = frozenset()
_TOKENS: dict[bytes, frozenset[bytes]] = {}
_TOKENS_MAX = 256


def _tokens_of(value: bytes) -> frozenset[bytes]:
    """The tokens of one field value; the few values seen often are remembered."""
    found = _TOKENS.get(value)
    if found is None:
        found = frozenset(part.strip().lower() for part in value.split(b",") if part.strip())
        if len(_TOKENS) < _TOKENS_MAX:
            _TOKENS[value] = found
    return found


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
    if method not in _COMMON_METHODS and not TOKEN.match(method):
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
    return RequestHead(version, headers, fields, repeated, content_length, chunked, method,
                       target)


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
    return ResponseHead(parts[0], headers, fields, repeated, content_length, chunked,
                        int(code), parts[2] if len(parts) > 2 else b"")


# Anything a header block must not hold: control characters other than the
# CRLF line ends, a bare CR or LF, or a line starting with whitespace
# (obs-fold). Only searched for when the fast pass below refuses a block,
# to name the problem.
_BAD_BLOCK = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n|\n[ \t]")
_FIELD_LINE = re.compile(rb"([^:\r\n]*):([^\r\n]*)\r\n")

# One strict field line: it starts the block or follows a CRLF, its name is
# a token, and its value (captured without the optional whitespace around
# it) holds no control character but tab. A block is well-formed exactly
# when every CRLF ends one such match: one C-level pass instead of a
# Python-level check per field (the per-field checks were a tenth of a
# request's cost).
_VALUE_CHAR = rb"[^\x00-\x08\x0a-\x1f\x7f \t]"
_STRICT_FIELD = re.compile(
    rb"(?:^|(?<=\r\n))([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*+"
    rb"((?:" + _VALUE_CHAR + rb"++(?:[ \t]++" + _VALUE_CHAR + rb"++)*+)?)[ \t]*+\r\n")
_NO_REPEATS: frozenset[bytes] = frozenset()
_LOWER: dict[bytes, bytes] = {}
_LOWER_MAX = 1024


def _lower(name: bytes) -> bytes:
    lowered = name.lower()
    if len(_LOWER) < _LOWER_MAX:
        _LOWER[name] = lowered
    return lowered


def _parse_block(block: bytes) -> tuple[list[tuple[bytes, bytes]], dict[bytes, bytes],
                                        set[bytes] | frozenset[bytes]]:
    """The header lines (each ending in CRLF) as a list, a dict and repeated names."""
    if not block:
        return [], {}, set()
    pairs = _STRICT_FIELD.findall(block)
    if len(pairs) != block.count(b"\r\n"):
        return _parse_block_strictly(block)  # refused: find out why
    lower = _LOWER.get
    headers = [(lower(name) or _lower(name), value) for name, value in pairs]
    fields = dict(headers)
    if len(fields) != len(headers):
        return _with_repeats(headers)
    return headers, fields, _NO_REPEATS


def _parse_block_strictly(block: bytes
                          ) -> tuple[list[tuple[bytes, bytes]], dict[bytes, bytes], set[bytes]]:
    """The field-by-field parse: it names what is wrong with a block."""
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
    headers: list[tuple[bytes, bytes]] = []
    fields: dict[bytes, bytes] = {}
    repeated: set[bytes] = set()
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


def _with_repeats(headers: list[tuple[bytes, bytes]]
                  ) -> tuple[list[tuple[bytes, bytes]], dict[bytes, bytes], set[bytes]]:
    """The dict and repeated names; a repeated singleton field is refused."""
    fields: dict[bytes, bytes] = {}
    repeated: set[bytes] = set()
    for name, value in headers:
        if name in fields:
            repeated.add(name)
            if name in SINGLETON:
                raise HTTPError(400, f"duplicate {name.decode()} header")
        fields[name] = value
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
