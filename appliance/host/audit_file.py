"""
The audit log's file side, touched only by its writer thread: open the file
(sealing a torn last line left by a crash), write runs of chained lines,
fsync and rotate. L{appliance.host.audit.AuditLog} inherits it.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import define
from prometheus_client import Counter, Histogram
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.host.audit_events import (
    AuditError,
    AuditOpenError,
    AuditWriteError,
    encode_fields,
)
from appliance.host.audit_records import (
    GENESIS,
    MAX_LINE_BYTES,
    RECOVERED_EVENT,
    RecordError,
    Tail,
    build_line,
    line_hash,
    parse_record,
    read_tail,
    rfc3339,
)

if TYPE_CHECKING:
    from appliance.host.audit import AuditConfig


class _OnError:
    """Stands in for a line's Deferred when the writer only has to report failures."""

    __slots__ = ("_on_error",)

    def __init__(self, on_error: Callable[[Failure], object]) -> None:
        self._on_error = on_error

    def callback(self, seq: int) -> None:
        """Written: nothing to report."""

    def errback(self, error: BaseException) -> None:
        """Not written: report it."""
        self._on_error(Failure(error))


@define(eq=False)
class _Line:
    """A chained line queued for the writer thread."""

    data: bytes
    seq: int
    digest: str
    deferred: Deferred[int] | _OnError


@define(eq=False)
class _Sync:
    """An fsync request (C{deferred} is None for the interval's own)."""

    deferred: Deferred[None] | None


class AuditFile:
    """
    The writer thread's work for L{appliance.host.audit.AuditLog}: the
    current file, its size, whether it needs an fsync, and where the chain
    on disk ends.
    """

    # Set up by AuditLog; the queue fields are shared with the reactor under _cond.
    config: AuditConfig
    log: Logger
    _clock: Any
    _cond: threading.Condition
    _items: collections.deque[Any]
    _depth: int
    _next_seq: int
    _prev: str
    _failure: str | None
    _lines: Counter
    _errors: Counter
    _fsync_seconds: Histogram
    _fail: Callable[[str], None]
    _report: Callable[..., None]
    _fd: int
    _size: int
    _dirty: bool
    _good: tuple[int, int, str]

    # -- writing ---------------------------------------------------------------

    def _process(self, batch: list[Any], results: list[tuple[Deferred[Any], Any]],
                 final: bool) -> None:
        pending: list[_Line] = []  # written, waiting for the batch's fsync
        broken: AuditError | None = None
        run: list[_Line] = []  # consecutive lines, written together
        for item in batch:
            if isinstance(item, _Line):
                if self._failure is not None:
                    self._lost(item, AuditWriteError(self._failure), results)
                elif broken is not None:
                    self._lost(item, broken, results)
                else:
                    run.append(item)
                continue
            if run:
                broken = self._write_run(run, pending, results)
                run = []
            if isinstance(item, _Sync):
                error = self._sync_if_dirty()
                self._ack(pending, results, error)
                if item.deferred is not None:
                    results.append((item.deferred, error))
        if run:
            self._write_run(run, pending, results)
        if self.config.fsync == "always" or final:
            self._ack(pending, results, self._sync_if_dirty())
        else:
            self._ack(pending, results, None)

    def _write_run(self, run: list[_Line], pending: list[_Line],
                   results: list[tuple[Deferred[Any], Any]]) -> AuditError | None:
        """
        Write consecutive lines in as few writes as rotation allows (one
        write per wake-up, not one per line: each system call hands the GIL
        back and forth with the reactor). On failure, undo and purge.
        """
        limit = self.config.rotate_size
        data = _joined(run)
        if self._size + len(data) <= limit:  # no rotation due: skip the per-line sizing
            return self._write_chunk(run, run, data, pending, results)
        start = 0
        while start < len(run):
            if self._size > 0 and self._size + len(run[start].data) + 1 > limit:
                try:
                    self._rotate()
                except OSError as error:
                    self._fail(f"rotating {self.config.path} failed: {error}; "
                               "restart needed")
                    broken = AuditWriteError(self._failure or "")
                    for item in run[start:]:
                        self._lost(item, broken, results)
                    return broken
            end, size = start, self._size
            while end < len(run) and (size == 0 or size + len(run[end].data) + 1 <= limit):
                size += len(run[end].data) + 1
                end += 1
            chunk = run[start:end]
            broken = self._write_chunk(chunk, run[start:], _joined(chunk), pending, results)
            if broken is not None:
                return broken
            start = end
        return None

    def _write_chunk(self, chunk: list[_Line], rest: list[_Line], data: bytes,
                     pending: list[_Line], results: list[tuple[Deferred[Any], Any]]
                     ) -> AuditError | None:
        """Write C{chunk} (as C{data}); on failure undo it and the C{rest} of the run."""
        try:
            self._write_all(self._fd, data)
        except OSError as error:
            return self._undo(rest, pending, results, error)
        self._size += len(data)
        self._dirty = True
        last = chunk[-1]
        self._good = (self._size, last.seq, last.digest)
        self._lines.inc(len(chunk))
        if self.config.fsync == "always":
            pending.extend(chunk)
        else:
            _written(chunk, results)
        return None

    def _undo(self, lost: list[_Line], pending: list[_Line],
              results: list[tuple[Deferred[Any], Any]], error: OSError) -> AuditError:
        """
        A write failed (disk full, I/O error): cut the file back to the last
        whole line before it and restart the chain from there, failing the
        C{lost} lines (the failed write's and those after it in the batch)
        and every line already chained on them.
        The next write tries again.
        """
        broken = AuditWriteError(f"writing {self.config.path} failed: {error.strerror or error}")
        offset, seq, digest = self._good
        try:
            os.ftruncate(self._fd, offset)
            self._size = offset
        except OSError as cut:
            self._fail(f"cannot cut {self.config.path} back after a failed write: {cut}; "
                       "restart needed")
        with self._cond:
            queued = [queued for queued in self._items if isinstance(queued, _Line)]
            for queued_line in queued:
                self._items.remove(queued_line)
            self._depth = 0
            self._next_seq, self._prev = seq + 1, digest
        for line in [*lost, *queued]:
            self._lost(line, broken, results)
        self._report("audit: {error}; {count} event(s) not recorded",
                     error=str(broken), count=len(lost) + len(queued))
        return broken

    def _lost(self, item: _Line, error: AuditError,
              results: list[tuple[Deferred[Any], Any]]) -> None:
        self._errors.labels("io").inc()
        results.append((item.deferred, error))

    def _ack(self, pending: list[_Line], results: list[tuple[Deferred[Any], Any]],
             error: AuditError | None) -> None:
        if error is not None:
            for line in pending:
                self._lost(line, error, results)
        else:
            _written(pending, results)
        pending.clear()

    def _sync_if_dirty(self) -> AuditError | None:
        if self._failure is not None:
            return AuditWriteError(self._failure)
        if not self._dirty:
            return None
        try:
            self._fsync(self._fd)
        except OSError as error:
            # After a failed fsync the kernel may have dropped the dirty pages:
            # nothing written since the last good fsync can be trusted.
            self._fail(f"fsync of {self.config.path} failed: {error.strerror or error}; "
                       "restart needed")
            return AuditWriteError(self._failure or "")
        self._dirty = False
        return None

    def _close(self) -> None:
        self._sync_if_dirty()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    # -- files -----------------------------------------------------------------

    def _open(self) -> None:
        """
        Find where the chain ends (the newest non-empty file) and open the
        current file for appending; seal a torn last line first.
        """
        path = self.config.path
        if os.path.lexists(_recovering_name(path)):  # a crash interrupted a recovery
            os.unlink(_recovering_name(path))
        names = [path] + [f"{path}.{n}" for n in range(1, max(self.config.keep, 1) + 1)]
        for index, name in enumerate(names):
            tail = read_tail(name)
            if tail is None:
                continue
            if tail.torn_bytes:
                seq, digest = self._recover(names, index, tail)
            else:
                seq, digest = _record_state(name, tail)
                if index > 0:
                    self.log.warn("audit: {path} is missing or empty; continuing the chain "
                                  "from {older}", path=path, older=name)
            break
        else:
            seq, digest = -1, GENESIS
        self._fd = self._open_append()
        self._size = os.fstat(self._fd).st_size
        self._good = (self._size, seq, digest)

    def _recover(self, names: list[str], index: int, tail: Tail) -> tuple[int, str]:
        """
        Seal a torn last line (a crash during a write): the file is kept as
        it is (rotated away if it is the current one) and a new current file
        starts with an C{audit.recovered} line naming the torn bytes' length
        and hash, chained on the last complete line.
        """
        name = names[index]
        if tail.last is not None or tail.too_long:
            seq, digest = _record_state(name, tail)
        else:
            seq, digest = -1, GENESIS
            for older in names[index + 1:]:
                before = read_tail(older)
                if before is None:
                    continue
                if before.torn_bytes:
                    raise AuditOpenError(f"{name} and {older} both end with a torn line; "
                                         "run 'appliance audit-verify' and move them aside")
                seq, digest = _record_state(older, before)
                break
        if index == 0:
            self._shift(max(self.config.keep, 1))
        fields = encode_fields({
            "event": RECOVERED_EVENT, "reason": "torn last line after a crash",
            "torn_bytes": tail.torn_bytes, "torn_sha256": tail.torn_sha256,
        })
        line = build_line(seq + 1, rfc3339(self._clock.seconds()), digest, fields)
        temporary = _recovering_name(self.config.path)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self._write_all(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.config.path)
        _fsync_directory(self.config.path)
        self.log.warn(
            "audit: {file} ended with a torn line ({count} bytes, sha256 {sha}); kept it "
            "and continued the chain in a new {path} (seq {seq})",
            file=names[1] if index == 0 else name, count=tail.torn_bytes,
            sha=tail.torn_sha256, path=self.config.path, seq=seq + 1)
        return seq + 1, line_hash(line)

    def _rotate(self) -> None:
        """Seal the current file (fsync, close, shift the old ones), open a new one."""
        if self._dirty:
            self._fsync(self._fd)
            self._dirty = False
        os.close(self._fd)
        self._fd = -1
        self._shift(self.config.keep)
        self._fd = self._open_append()
        self._size = 0
        self._good = (0, *self._good[1:])

    def _shift(self, keep: int) -> None:
        """audit.jsonl -> .1 -> .2 ...; files beyond C{keep} are deleted."""
        path = self.config.path
        extra = keep + 1
        while os.path.lexists(f"{path}.{extra}"):
            os.unlink(f"{path}.{extra}")
            extra += 1
        for number in range(keep - 1, 0, -1):
            if os.path.lexists(f"{path}.{number}"):
                os.replace(f"{path}.{number}", f"{path}.{number + 1}")
        if keep >= 1:
            os.replace(path, f"{path}.1")
        else:
            os.unlink(path)
        _fsync_directory(path)

    def _open_append(self) -> int:
        created = not os.path.exists(self.config.path)
        fd = os.open(self.config.path,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if created:
            _fsync_directory(self.config.path)
        return fd

    # Overridable for tests that simulate a slow or failing disk.

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _fsync(self, fd: int) -> None:
        started = time.perf_counter()
        os.fsync(fd)
        self._fsync_seconds.observe(time.perf_counter() - started)


def _joined(lines: list[_Line]) -> bytes:
    return b"\n".join([line.data for line in lines]) + b"\n"


def _written(lines: list[_Line], results: list[tuple[Any, Any]]) -> None:
    """Report written lines to their writers, but for those only told of failures."""
    results.extend([(line.deferred, line.seq) for line in lines
                     if line.deferred.__class__ is not _OnError])


def _record_state(path: str, tail: Tail) -> tuple[int, str]:
    """C{(seq, hash)} of an existing file's last line, or L{AuditOpenError}."""
    try:
        if tail.last is None:
            raise RecordError(f"line longer than {MAX_LINE_BYTES} bytes")
        record = parse_record(tail.last)
    except RecordError as error:
        raise AuditOpenError(
            f"{path}: the last line is not an audit record ({error}); run "
            "'appliance audit-verify' on the files and move them aside to start a new log"
        ) from None
    return record["seq"], line_hash(tail.last)


def _recovering_name(path: str) -> str:
    """Where a recovery line is prepared (hidden, so C{audit.jsonl*} skips it)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.recovering")


def _fsync_directory(path: str) -> None:
    """Make a create or rename in C{path}'s directory durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
