"""Property tests for the HTTP head parser and body decoders: any bytes give a
parsed message or a typed HTTPError, never another exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.http.body import LAST_CHUNK, ChunkedDecoder, LengthDecoder, chunk
from appliance.http.errors import HTTPError
from appliance.http.head import (
    _parse_block,
    _parse_block_strictly,
    find_head_end,
    parse_request_head,
    parse_response_head,
)

FIELD_BYTES = st.binary(max_size=30) | st.sampled_from(
    [b"Content-Length: 5", b"Transfer-Encoding: chunked", b"Host: x", b" folded",
     b"X: \x00", b"Bad Name: 1", b"a:b", b"Connection: close", b"\r", b"\n"])


@settings(max_examples=400)
@given(st.lists(FIELD_BYTES, max_size=8), st.sampled_from([b"GET / HTTP/1.1",
                                                          b"HTTP/1.1 200 OK", b"junk"]))
def test_heads_parse_or_raise_http_errors(lines: list[bytes], first: bytes) -> None:
    """Random header blocks: a head or HTTPError, for requests and responses."""
    data = first + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    end = find_head_end(data)
    if end < 0:
        return
    for parse in (parse_request_head, parse_response_head):
        try:
            head = parse(data[:end])
        except HTTPError as error:
            assert 400 <= error.status < 600
        else:
            assert all(name == name.lower() for name, _ in head.headers)


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_chunked_decoder_takes_any_bytes(data: bytes) -> None:
    """Random input to the chunked decoder: data or HTTPError."""
    decoder = ChunkedDecoder()
    try:
        out, rest = decoder.feed(data)
    except HTTPError as error:
        assert error.status == 400
    else:
        assert len(out) <= len(data)


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=6),
       st.integers(min_value=1, max_value=7))
def test_chunked_round_trip_in_any_pieces(pieces: list[bytes], step: int) -> None:
    """Encoded chunks decode to the same bytes however the input is split."""
    encoded = b"".join(chunk(p) for p in pieces) + LAST_CHUNK + b"NEXT"
    decoder = ChunkedDecoder()
    out, rest = b"", b""
    for index in range(0, len(encoded), step):
        data, rest = decoder.feed(encoded[index:index + step])
        out += data
        if decoder.done:
            rest += encoded[index + step:]
            break
    assert out == b"".join(pieces) and decoder.done and rest == b"NEXT"


@given(st.integers(min_value=0, max_value=100), st.binary(max_size=150))
def test_length_decoder_stops_at_the_length(length: int, data: bytes) -> None:
    """A fixed-length body never takes more than its length."""
    decoder = LengthDecoder(length)
    body, rest = decoder.feed(data)
    assert body + rest == data and len(body) == min(length, len(data))
    assert decoder.done == (len(data) >= length)


FIELD_LINES = st.lists(FIELD_BYTES | st.sampled_from(
    [b"Host: y", b"X-A:  spaced  value \t", b"x-a: again", b"Name:", b"Na\tme: v", b":v",
     b"K: v\x7f", b"K: caf\xc3\xa9", b"K: a:b", b"K:\tv"]), max_size=8)


def _outcome(parse: object, block: bytes) -> object:
    """What C{parse} returns for C{block}, or the (status, reason) it refuses with."""
    try:
        return parse(block)  # type: ignore[operator]
    except HTTPError as error:
        return (error.status, error.reason)


@settings(max_examples=600)
@given(FIELD_LINES)
def test_fast_block_parse_agrees_with_the_strict_one(lines: list[bytes]) -> None:
    """The one-regex parse accepts, refuses and returns exactly what the field-by-field one does."""
    block = b"".join(line + b"\r\n" for line in lines)
    if not block:
        return
    fast, strict = _outcome(_parse_block, block), _outcome(_parse_block_strictly, block)
    if isinstance(fast, tuple) and len(fast) == 3:
        fast = (fast[0], fast[1], set(fast[2]))
    assert fast == strict


@given(FIELD_LINES)
def test_tokens_match_every_field_of_the_name(lines: list[bytes]) -> None:
    """Head.tokens reads every field of a name, repeated or not."""
    data = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    try:
        head = parse_response_head(data)
    except HTTPError:
        return
    for name in {name for name, _ in head.headers}:
        expected = {part.strip().lower() for field, value in head.headers if field == name
                    for part in value.split(b",") if part.strip()}
        assert head.tokens(name) == expected
