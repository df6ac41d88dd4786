"""
Verification of the audit log's hash chain: L{verify} streams through a set
of files, oldest first, and reports the first line that breaks the chain.
The line format itself is L{appliance.host.audit_records}. See
C{docs/audit.md}.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from attrs import frozen

from appliance.host.audit_records import (
    GENESIS,
    MAX_LINE_BYTES,
    RECOVERED_EVENT,
    RecordError,
    parse_record,
    read_line,
)


@frozen
class VerifyResult:
    """
    The outcome of L{verify}.

    When C{ok} is false, C{file} and C{line} (1-based) name the first bad
    line and C{reason} says what is wrong; C{unreadable} means a file could
    not be read at all (C{line} is then None).
    """

    ok: bool
    lines: int
    files: int
    file: str | None = None
    line: int | None = None
    reason: str | None = None
    unreadable: bool = False
    notes: tuple[str, ...] = ()

    @property
    def exit_status(self) -> int:
        """0 intact, 1 tampered or damaged, 2 unreadable input."""
        if self.ok:
            return 0
        return 2 if self.unreadable else 1

    def describe(self) -> str:
        """C{OK: N lines in M files, chain intact} or C{FILE:LINE: reason}."""
        if self.ok:
            return f"OK: {self.lines} lines in {self.files} files, chain intact"
        if self.line is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file}:{self.line}: {self.reason}"


@frozen
class _Item:
    """One line read from a file: complete, torn (no newline at EOF) or too long."""

    file: str
    number: int
    data: bytes | None  # None when longer than MAX_LINE_BYTES
    digest: str
    length: int
    complete: bool
    first: bool


class _Unreadable(Exception):
    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"cannot read: {error.strerror or error}")
        self.path = path


class _Bad(Exception):
    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(reason)
        self.file, self.line, self.reason = file, line, reason


def _items(path: str) -> Iterator[_Item]:
    try:
        with open(path, "rb") as handle:
            number = 0
            while True:
                read = read_line(handle)
                if read is None:
                    return
                number += 1
                data, digest, length, complete = read
                yield _Item(path, number, data, digest, length, complete, number == 1)
    except OSError as error:
        raise _Unreadable(path, error) from None


def _order(paths: Sequence[str]) -> tuple[list[str], int]:
    """
    Sort the files by their first line's seq; a file holding only a torn
    fragment goes just before the file whose recovery line seals it.
    Returns the files with content, and how many files were given.
    """
    firsts: dict[str, _Item | None] = {}
    for path in paths:
        firsts[path] = next(_items(path), None)
    keys: dict[str, float] = {}
    seals: dict[tuple[str, int], int] = {}
    for path, item in firsts.items():
        if item is None:
            continue
        if item.complete and item.data is not None:
            try:
                record = parse_record(item.data)
            except RecordError as error:
                raise _Bad(path, 1, str(error)) from None
            keys[path] = record["seq"]
            if record.get("event") == RECOVERED_EVENT:
                seals[(str(record.get("torn_sha256")), _as_int(record.get("torn_bytes")))] = (
                    record["seq"])
        elif item.data is None:
            raise _Bad(path, 1, f"line longer than {MAX_LINE_BYTES} bytes")
    for path, item in firsts.items():
        if item is not None and not item.complete and path not in keys:
            sealed_by = seals.get((item.digest, item.length))
            if sealed_by is None:
                raise _Bad(path, 1, _TORN)
            keys[path] = sealed_by - 0.5
    ordered = sorted(keys, key=lambda path: keys[path])
    return ordered, len(firsts)


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


_TORN = "truncated line: no newline at the end (torn write or truncation)"


class _Peekable:
    def __init__(self, iterator: Iterator[_Item]) -> None:
        self._iterator = iterator
        self._next: list[_Item] = []

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> _Item:
        if self._next:
            return self._next.pop()
        return next(self._iterator)

    def peek(self) -> _Item | None:
        if not self._next:
            try:
                self._next.append(next(self._iterator))
            except StopIteration:
                return None
        return self._next[0]


def _all_items(paths: list[str]) -> Iterator[_Item]:
    for path in paths:
        yield from _items(path)


def _peek_record(stream: _Peekable) -> dict[str, Any] | None:
    item = stream.peek()
    if item is None or not item.complete or item.data is None:
        return None
    try:
        return parse_record(item.data)
    except RecordError:
        return None


class _Chain:
    """The verifier's state: the last good line and a torn tail awaiting its seal."""

    def __init__(self) -> None:
        self.seq: int | None = None
        self.hash = GENESIS
        self.where: tuple[str, int] = ("", 0)
        self.torn: _Item | None = None
        self.count = 0
        self.notes: list[str] = []

    def check(self, item: _Item, stream: _Peekable) -> None:
        if self.torn is not None:
            self._check_seal(item)
        if not item.complete:
            self.torn = item
            return
        if item.data is None:
            raise _Bad(item.file, item.number, f"line longer than {MAX_LINE_BYTES} bytes")
        try:
            record = parse_record(item.data)
        except RecordError as error:
            raise _Bad(item.file, item.number, str(error)) from None
        seq, prev = record["seq"], record["prev"]
        if self.seq is None:
            if seq == 0 and prev != GENESIS:
                raise _Bad(item.file, item.number,
                           "hash mismatch: seq 0 must have the genesis prev (64 zeros)")
            following = _peek_record(stream)
            if following is not None and following["seq"] < seq:
                raise _Bad(item.file, item.number,
                           f"reordered: seq {seq} appears before seq {following['seq']}")
        else:
            self._check_link(item, seq, prev, stream)
        self.seq, self.hash, self.where = seq, item.digest, (item.file, item.number)
        self.count += 1

    def _check_seal(self, item: _Item) -> None:
        """The line after a torn tail must be the recovery line that seals it."""
        torn = self.torn
        assert torn is not None
        record: dict[str, Any] = {}
        if item.complete and item.data is not None:
            try:
                record = parse_record(item.data)
            except RecordError:
                pass
        if not (item.first and record.get("event") == RECOVERED_EVENT
                and record.get("torn_sha256") == torn.digest
                and record.get("torn_bytes") == torn.length):
            raise _Bad(torn.file, torn.number, _TORN)
        self.notes.append(f"{torn.file}:{torn.number}: torn line from a crash, sealed by "
                          f"{item.file}:{item.number}")
        self.torn = None

    def _check_link(self, item: _Item, seq: int, prev: str, stream: _Peekable) -> None:
        assert self.seq is not None
        expected = self.seq + 1
        file, number = item.file, item.number
        last_file = self.where[0]
        if seq == expected:
            if prev == self.hash:
                return
            following = _peek_record(stream)
            if following is not None and following["prev"] != item.digest:
                raise _Bad(file, number, "hash mismatch: line edited (its prev does not "
                           "match the line before and the next line records another hash)")
            raise _Bad(*self.where, "hash mismatch: line edited (the next line records "
                       "another hash for it)")
        if item.first and file != last_file:
            raise _Bad(file, number, f"broken link between files: starts at seq {seq} but "
                       f"{last_file} ends at seq {self.seq} (a file or lines are missing, "
                       "or the files overlap)")
        if seq > expected:
            following = _peek_record(stream)
            if following is not None and following["seq"] == expected:
                raise _Bad(file, number, f"reordered: seq {seq} appears before seq {expected}")
            raise _Bad(file, number, f"seq gap: seq {seq} follows seq {self.seq} "
                       f"({seq - expected} line(s) removed before this one)")
        raise _Bad(file, number, f"reordered: seq {seq} follows seq {self.seq} "
                   "(seq goes backwards)")


def verify(paths: Sequence[str]) -> VerifyResult:
    """
    Check the hash chain across C{paths} (any order; sorted by first seq).

    Streams every file in bounded memory and stops at the first bad line.
    The first line's C{prev} is only checked when its seq is 0 (older files
    may have been rotated away); deleting lines at the very end of the newest
    file cannot be detected from the files alone.
    """
    chain = _Chain()
    count = len(paths)
    try:
        ordered, count = _order(paths)
        stream = _Peekable(_all_items(ordered))
        for item in stream:
            chain.check(item, stream)
        if chain.torn is not None:
            raise _Bad(chain.torn.file, chain.torn.number, _TORN)
    except _Unreadable as error:
        return VerifyResult(False, chain.count, count, error.path, None, str(error),
                            unreadable=True)
    except _Bad as bad:
        return VerifyResult(False, chain.count, count, bad.file, bad.line, bad.reason)
    return VerifyResult(True, chain.count, count, notes=tuple(chain.notes))


__all__ = ["VerifyResult", "verify"]
