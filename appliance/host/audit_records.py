"""
The audit log's line format: building, hashing and parsing one line, and
reading lines and a file's end in bounded memory. Shared by the writer
(L{appliance.host.audit}, L{appliance.host.audit_file}) and the verifier
(L{appliance.host.audit_verify}).

Each line is one compact JSON object that starts with C{seq}, C{time} and
C{prev} (the hex SHA-256 of the previous line's exact bytes, without its
newline). See C{docs/audit.md}.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from typing import Any, BinaryIO

from attrs import frozen

GENESIS = "0" * 64
"""The C{prev} of the very first line (seq 0)."""

MAX_LINE_BYTES = 1024 * 1024
"""Longest line the writer produces and the verifier accepts (newline excluded)."""

RECOVERED_EVENT = "audit.recovered"
"""The C{event} of the line that seals a torn last line after a crash."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 64 * 1024


def line_hash(line: bytes) -> str:
    """The hex SHA-256 of one line's exact bytes, without its newline."""
    return hashlib.sha256(line).hexdigest()


_second_cache: list[Any] = [None, ""]


def rfc3339(seconds: float) -> str:
    """C{2025-05-01T12:00:00.123456Z} for a POSIX timestamp."""
    whole = int(seconds // 1)
    if _second_cache[0] != whole:  # formatting the date once a second is enough
        _second_cache[0] = whole
        _second_cache[1] = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    micros = min(999_999, int(round((seconds - whole) * 1_000_000)))
    return f"{_second_cache[1]}.{micros:06d}Z"


def build_line(seq: int, when: str, prev: str, fields: bytes) -> bytes:
    """
    One line without its newline: the chain envelope, then the event's
    serialised fields (L{appliance.host.audit.encode_fields}).
    """
    if fields:
        return b'{"seq":%d,"time":"%s","prev":"%s",%s}' % (
            seq, when.encode(), prev.encode(), fields)
    return b'{"seq":%d,"time":"%s","prev":"%s"}' % (seq, when.encode(), prev.encode())


class RecordError(ValueError):
    """A line that is not an audit record; the message says why."""


def parse_record(line: bytes) -> dict[str, Any]:
    """
    Decode one line and check its envelope (C{seq}, C{time}, C{prev}).

    Raises L{RecordError} with a reason fit for an operator.
    """
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise RecordError(f"bad JSON ({_short(error)})") from None
    if not isinstance(record, dict):
        raise RecordError("not an audit record: not a JSON object")
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise RecordError("not an audit record: seq is missing or not a non-negative integer")
    if not isinstance(record.get("time"), str):
        raise RecordError("not an audit record: time is missing")
    prev = record.get("prev")
    if not isinstance(prev, str) or _HEX64.match(prev) is None:
        raise RecordError("not an audit record: prev is not a hex SHA-256")
    return record


def _short(error: BaseException) -> str:
    text = str(error) if not isinstance(error, RecursionError) else "nested too deeply"
    return text if len(text) <= 80 else text[:77] + "..."


@frozen
class Tail:
    """
    The end of an existing file: its last complete line (None when there is
    none, or when it is longer than L{MAX_LINE_BYTES}: C{too_long}) and the
    bytes after the last newline (a torn write), by length and hash.
    """

    last: bytes | None
    too_long: bool
    torn_bytes: int
    torn_sha256: str


def read_tail(path: str) -> Tail | None:
    """
    Read the end of C{path} from the back, in bounded memory; None when the
    file is missing or empty.
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        end = _rfind_newline(handle, size, size)
        digest = hashlib.sha256()
        handle.seek(end + 1)
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        last, too_long = None, False
        if end >= 0:
            start = _rfind_newline(handle, end, MAX_LINE_BYTES + 1) + 1
            if start < 0:
                too_long = True
            else:
                handle.seek(start)
                last = handle.read(end - start)
        return Tail(last, too_long, size - end - 1, digest.hexdigest())


def _rfind_newline(handle: BinaryIO, before: int, limit: int) -> int:
    """
    The offset of the last newline before C{before}, -1 when there is none
    down to the start of the file, -2 when none within C{limit} bytes.
    """
    position = before
    while position > 0:
        if before - position >= limit:
            return -2
        start = max(0, position - _CHUNK)
        handle.seek(start)
        found = handle.read(position - start).rfind(b"\n")
        if found >= 0:
            return start + found
        position = start
    return -1


def read_line(handle: BinaryIO) -> tuple[bytes | None, str, int, bool] | None:
    """
    Read one line in bounded memory: C{(data, sha256, length, complete)}.

    C{data} is None when the line is longer than L{MAX_LINE_BYTES} (its hash
    and length are still computed); C{complete} is false for a last line with
    no newline. Returns None at end of file.
    """
    chunk = handle.readline(MAX_LINE_BYTES + 1)
    if not chunk:
        return None
    if chunk.endswith(b"\n"):
        data = chunk[:-1]
        return data, line_hash(data), len(data), True
    if len(chunk) <= MAX_LINE_BYTES:
        return chunk, line_hash(chunk), len(chunk), False
    digest = hashlib.sha256(chunk)
    length = len(chunk)
    while True:
        more = handle.readline(_CHUNK)
        if not more:
            return None, digest.hexdigest(), length, False
        if more.endswith(b"\n"):
            more = more[:-1]
            digest.update(more)
            return None, digest.hexdigest(), length + len(more), True
        digest.update(more)
        length += len(more)
