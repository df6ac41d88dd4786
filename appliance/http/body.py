"""
Message body framing, sans-IO: fixed length, chunked, or until close.

Each decoder takes raw bytes and returns (body data, leftover bytes after
the body) and says when the body is complete; the chunked decoder refuses
anything but strict hexadecimal sizes and exact CRLFs.
"""

from __future__ import annotations

from appliance.http.errors import HTTPError

MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 16 * 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")


class BodyDecoder:
    """Interface of the decoders: L{feed} and L{done}."""

    done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Consume C{data}; return (body bytes, bytes beyond the body)."""
        raise NotImplementedError


class NoBody(BodyDecoder):
    """A message without a body."""

    done = True

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        return b"", data


NO_BODY = NoBody()
"""The one L{NoBody} needed: it keeps no state."""


class LengthDecoder(BodyDecoder):
    """A body of exactly C{length} bytes."""

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        remaining = self.remaining
        if len(data) < remaining:
            self.remaining = remaining - len(data)
            return data, b""
        self.remaining = 0
        self.done = True
        return data[:remaining], data[remaining:]


class UntilCloseDecoder(BodyDecoder):
    """A response body that ends when the connection closes."""

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        return data, b""


class ChunkedDecoder(BodyDecoder):
    """
    Strict chunked decoding. Chunk extensions are ignored (bounded by the
    line limit); trailers are read and dropped (bounded).
    """

    def __init__(self, error_status: int = 400) -> None:
        self._buffer = b""
        self._state = "size"
        self._remaining = 0
        self._trailer_bytes = 0
        self._error = error_status

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        out: list[bytes] = []
        position = 0
        end = len(buffer)
        while position < end and not self.done:
            state = self._state
            if state == "data":
                take = min(self._remaining, end - position)
                out.append(buffer[position:position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data-crlf"
            elif state == "data-crlf":
                if end - position < 2:
                    break
                if buffer[position:position + 2] != b"\r\n":
                    raise HTTPError(self._error, "malformed chunk terminator")
                position += 2
                self._state = "size"
            else:
                newline = buffer.find(b"\r\n", position)
                if newline < 0:
                    if end - position > MAX_CHUNK_LINE:
                        raise HTTPError(self._error, "chunk line too long")
                    break
                line = buffer[position:newline]
                position = newline + 2
                if state == "size":
                    self._size_line(line)
                else:
                    self._trailer_line(line)
        self._buffer = buffer[position:] if not self.done else b""
        leftover = buffer[position:] if self.done else b""
        return b"".join(out), leftover

    def _size_line(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:
            raise HTTPError(self._error, "chunk line too long")
        size = line.split(b";", 1)[0].rstrip(b" \t")
        if not size or len(size) > 12 or not _HEX.issuperset(size):
            raise HTTPError(self._error, "malformed chunk size")
        if b"\r" in line or b"\n" in line:
            raise HTTPError(self._error, "malformed chunk line")
        self._remaining = int(size, 16)
        self._state = "data" if self._remaining else "trailer"

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self.done = True
            return
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > MAX_TRAILER_BYTES:
            raise HTTPError(self._error, "trailers too large")
        if b":" not in line or line[0] in (0x20, 0x09):
            raise HTTPError(self._error, "malformed trailer")


def chunk(data: bytes) -> bytes:
    """One chunk in chunked encoding (empty data is skipped: it would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
