"""
The tamper-evident audit log every service writes its decisions to.

Append-only JSON lines chained by SHA-256 (format and verification in
L{appliance.host.audit_verify}). The caller's thread (the reactor) redacts,
serialises and hashes each event; one dedicated writer thread, fed by a
bounded queue, does every write, fsync and rotation. See C{docs/audit.md}.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.host.audit_events import (
    MAX_EVENT_CHARS,
    RESERVED_FIELDS,
    AuditClosed,
    AuditError,
    AuditEventError,
    AuditOpenError,
    AuditQueueFull,
    AuditWriteError,
    credential_key,
    encode_fields,
)
from appliance.host.audit_verify import (
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
from appliance.host.ini import Section
from appliance.host.metrics import LATENCY_BUCKETS
from appliance.host.values import in_range, one_of, parse_duration, parse_int, parse_size

FSYNC_POLICIES = ("always", "interval", "never")

_BATCH = 512


WAKE_DELAY = 0.02
"""Seconds lines may wait in memory before the writer thread is woken."""


@frozen
class AuditConfig:
    """The C{[audit]} section."""

    path: str
    fsync: str = "interval"
    fsync_interval: float = 1.0
    rotate_size: int = 100 * 1024 * 1024
    keep: int = 10
    queue_size: int = 10000


def parse_audit(section: Section) -> AuditConfig | None:
    """
    Read the C{[audit]} section; None when the section is absent.

    Problems are recorded on C{section}; when any was recorded the returned
    object must not be used (the config loader refuses the whole config).
    """
    if not section.config.present(section.name):
        return None
    path = section.get("path", str)
    if isinstance(path, str):
        path = path.strip()
        if not os.path.isabs(path) or path.endswith("/"):
            section.problem("path", f"expected an absolute file path, got {path!r}")
    return AuditConfig(
        path=path,
        fsync=section.get("fsync", one_of(*FSYNC_POLICIES), "interval"),
        fsync_interval=section.get("fsync_interval", in_range(parse_duration, 0.001), 1.0),
        rotate_size=section.get("rotate_size", _whole(parse_size, 1024), 100 * 1024**2),
        keep=section.get("keep", _whole(parse_int, 0, 1000), 10),
        queue_size=section.get("queue_size", _whole(parse_int, 1, 10_000_000), 10000),
    )


def _whole(convert: Callable[[str], int], low: int, high: int | None = None,
           ) -> Callable[[str], int]:
    checked = in_range(convert, low, high)
    return lambda text: int(checked(text))


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
    data: bytes
    seq: int
    digest: str
    deferred: Deferred[int] | _OnError


@define(eq=False)
class _Sync:
    deferred: Deferred[None] | None


@define(eq=False)
class _Stop:
    deferred: Deferred[None]


class AuditLog(Service):
    """
    The audit log service: C{write(event)} returns a Deferred firing with the
    line's seq once it is written (and fsynced under C{fsync = always}).

    One instance per metrics registry (the metric names are fixed).
    """

    log = Logger()

    def __init__(self, config: AuditConfig, reactor: Any, registry: CollectorRegistry,
                 clock: Any = None) -> None:
        self.setName("audit")
        self.config = config
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        # The reactor side takes the RLock itself (a C-level enter, where the
        # Condition's is a Python call); the writer thread waits on the Condition.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._items: collections.deque[_Line | _Sync | _Stop] = collections.deque()
        self._wake_scheduled = False
        self._date: tuple[int | None, bytes] = (None, b"")  # see _line()
        self._depth = 0
        self._next_seq = 0
        self._prev = GENESIS
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._sync_call: Any = None
        self._full_logged = False
        # Writer-thread state.
        self._fd = -1
        self._size = 0
        self._dirty = False
        self._good = (0, -1, GENESIS)  # offset after, seq and hash of the last line on disk
        self._lines = Counter("appliance_audit_lines", "Audit lines written.",
                              registry=registry)
        self._errors = Counter("appliance_audit_write_errors",
                               "Audit events not recorded, by reason.", ["reason"],
                               registry=registry)
        for reason in ("queue_full", "invalid", "io", "closed"):
            self._errors.labels(reason)
        Gauge("appliance_audit_queue_depth", "Audit lines waiting for the writer thread.",
              registry=registry).set_function(lambda: self._depth)
        self._fsync_seconds = Histogram("appliance_audit_fsync_seconds",
                                        "Time spent in fsync of the audit file.",
                                        buckets=LATENCY_BUCKETS, registry=registry)

    # -- reactor side --------------------------------------------------------

    def startService(self) -> None:
        """Open (and if needed recover) the file, then start the writer thread."""
        self._open()
        self._stopped, self._failure, self._dirty = None, None, False
        self._next_seq, self._prev = self._good[1] + 1, self._good[2]
        Service.startService(self)
        self._thread = threading.Thread(target=self._run, name="appliance-audit-writer",
                                        daemon=True)
        self._thread.start()

    def write(self, event: Mapping[str, Any]) -> Deferred[int]:
        """
        Record C{event}; fails at once with L{AuditQueueFull},
        L{AuditEventError}, L{AuditWriteError} or L{AuditClosed}.
        """
        if not self.running:
            return self._refuse(AuditClosed("the audit log is not running"), "closed")
        try:
            fields = encode_fields(event)
        except AuditEventError as error:
            return self._refuse(error, "invalid")
        return self.write_encoded(fields)

    def write_encoded(self, fields: bytes) -> Deferred[int]:
        """
        Record fields already serialised by L{encode_fields} (callers that
        log the same kind of event many times cache that work).
        """
        deferred: Deferred[int] = Deferred()
        refused = self._append(fields, deferred)
        if refused is not None:
            return self._refuse(*refused)
        return deferred

    def record_encoded(self, fields: bytes, on_error: Callable[[Failure], object]) -> None:
        """
        L{write_encoded} for a caller that only wants to hear of failures:
        no Deferred per line. C{on_error} gets the L{Failure}, at once if the
        line is refused, else from the writer thread's report (in the reactor).
        """
        refused = self._append(fields, _OnError(on_error))
        if refused is not None:
            self._refuse(*refused).addErrback(on_error)

    def _append(self, fields: bytes, waiter: Deferred[int] | _OnError
                ) -> tuple[AuditError, str] | None:
        """Chain and queue one line for C{waiter}; or why it was refused."""
        if not self.running:
            return AuditClosed("the audit log is not running"), "closed"
        now = self._clock.seconds()
        with self._lock:
            if self._failure is not None:
                return AuditWriteError(self._failure), "io"
            if self._depth >= self.config.queue_size:
                return AuditQueueFull(
                    f"audit queue full ({self._depth} lines waiting): the disk is not "
                    "keeping up; event not recorded"), "queue_full"
            line = self._line(self._next_seq, now, fields)
            if len(line) > MAX_LINE_BYTES:
                return AuditEventError(
                    f"event too large ({len(line)} bytes, at most {MAX_LINE_BYTES})"), "invalid"
            digest = line_hash(line)
            self._items.append(_Line(line, self._next_seq, digest, waiter))
            self._depth += 1
            self._next_seq += 1
            self._prev = digest
            if not self._wake_scheduled:
                # Wake the writer thread at most every WAKE_DELAY: each
                # wake-up makes it compete with the reactor for the GIL,
                # which cost far more than the writing itself.
                self._wake_scheduled = True
                self._reactor.callLater(WAKE_DELAY, self._wake)
        self._full_logged = False
        if self.config.fsync == "interval" and self._sync_call is None:
            self._sync_call = self._clock.callLater(self.config.fsync_interval,
                                                    self._sync_due)
        return None

    def _line(self, seq: int, now: float, fields: bytes) -> bytes:
        """
        C{build_line(seq, rfc3339(now), prev, fields)}, byte for byte, in one
        format with the date part formatted once a second: the two calls were
        a third of the cost of a line.
        """
        if not fields:
            return build_line(seq, rfc3339(now), self._prev, fields)
        whole = int(now // 1)
        if whole != self._date[0]:
            self._date = (whole, rfc3339(whole)[:-len(".000000Z")].encode("ascii"))
        micros = round((now - whole) * 1_000_000)
        return b'{"seq":%d,"time":"%s.%06dZ","prev":"%s",%s}' % (
            seq, self._date[1], micros if micros < 999_999 else 999_999,
            self._prev.encode("ascii"), fields)

    def _wake(self) -> None:
        with self._cond:
            self._wake_scheduled = False
            self._cond.notify()

    def flush(self) -> Deferred[None]:
        """Fires once every line queued so far is written and fsynced."""
        if self._thread is None or self._stopped is not None:
            return fail(AuditClosed("the audit log is not running"))
        deferred: Deferred[None] = Deferred()
        self._enqueue(_Sync(deferred))
        return deferred

    def stopService(self) -> Deferred[None]:
        """
        Fires once everything queued is written and fsynced, the file is
        closed and the writer thread has exited. Safe to call twice.
        """
        if self._stopped is None:
            Service.stopService(self)
            self._stopped = Deferred()
            if self._sync_call is not None and self._sync_call.active():
                self._sync_call.cancel()
            self._sync_call = None
            if self._thread is None:
                self._stopped.callback(None)
            else:
                self._enqueue(_Stop(self._stopped))
        return self._stopped

    def status(self) -> dict[str, Any]:
        """What C{/status} shows about the audit log."""
        return {"path": self.config.path, "fsync": self.config.fsync,
                "next_seq": self._next_seq, "queue_depth": self._depth,
                "failed": self._failure}

    @property
    def head(self) -> tuple[int, str]:
        """C{(seq, hash)} of the last line accepted; export it to anchor the chain."""
        return self._next_seq - 1, self._prev

    def _refuse(self, error: AuditError, reason: str) -> Deferred[Any]:
        self._errors.labels(reason).inc()
        if reason == "queue_full" and not self._full_logged:
            self._full_logged = True
            self.log.error("audit: {error}", error=str(error))
        return fail(error)

    def _sync_due(self) -> None:
        self._sync_call = None
        if self._stopped is None:
            self._enqueue(_Sync(None))

    def _enqueue(self, item: _Sync | _Stop) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def _deliver(self, results: list[tuple[Deferred[Any], Any]]) -> None:
        for deferred, outcome in results:
            if isinstance(outcome, BaseException):
                deferred.errback(outcome)
            else:
                deferred.callback(outcome)

    def _writer_exited(self, results: list[tuple[Deferred[Any], Any]],
                       stopped: Deferred[None]) -> None:
        self._deliver(results)
        if self._thread is not None:
            self._thread.join()
        stopped.callback(None)

    def _report(self, message: str, **fields: Any) -> None:
        """Log from the writer thread, via the reactor."""
        self._reactor.callFromThread(self.log.error, message, **fields)

    # -- writer thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                batch: list[_Line | _Sync | _Stop] = []
                while self._items and len(batch) < _BATCH:
                    item = self._items.popleft()
                    batch.append(item)
                    if isinstance(item, _Line):
                        self._depth -= 1
            results: list[tuple[Deferred[Any], Any]] = []
            stop = next((item for item in batch if isinstance(item, _Stop)), None)
            try:
                self._process(batch, results, final=stop is not None)
            except Exception as error:  # a bug: fail safe rather than die silently
                self._fail(f"audit writer error: {error!r}")
                done = {id(d) for d, _ in results}
                results += [(item.deferred, AuditWriteError(self._failure or ""))
                            for item in batch
                            if not isinstance(item, _Stop) and item.deferred is not None
                            and id(item.deferred) not in done]
            if stop is not None:
                self._close()
                self._reactor.callFromThread(self._writer_exited, results, stop.deferred)
                return
            if results:
                self._reactor.callFromThread(self._deliver, results)

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

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = reason
        self._report("audit log failed: {reason}", reason=reason)

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


__all__ = [
    "AuditClosed", "AuditConfig", "AuditError", "AuditEventError", "AuditLog",
    "AuditOpenError", "AuditQueueFull", "AuditWriteError", "FSYNC_POLICIES",
    "MAX_EVENT_CHARS", "RESERVED_FIELDS", "credential_key", "encode_fields", "parse_audit",
]
