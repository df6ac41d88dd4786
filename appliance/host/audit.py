"""
The tamper-evident audit log every service writes its decisions to.

Append-only JSON lines chained by SHA-256 (format and verification in
L{appliance.host.audit_verify}). The caller's thread (the reactor) redacts,
serialises and hashes each event; one dedicated writer thread, fed by a
bounded queue, does every write, fsync and rotation (its file side is
L{appliance.host.audit_file}). See C{docs/audit.md}.
"""

from __future__ import annotations

import collections
import os
import threading
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
from appliance.host.audit_file import AuditFile, _Line, _OnError, _Sync
from appliance.host.audit_records import GENESIS, MAX_LINE_BYTES, build_line, line_hash, rfc3339
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


@define(eq=False)
class _Stop:
    """A stop request: write and fsync what is queued, close, exit the thread."""

    deferred: Deferred[None]


class AuditLog(AuditFile, Service):
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
        self._depth = 0
        self._next_seq = 0
        self._prev = GENESIS
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._sync_call: Any = None
        self._full_logged = False
        # Writer-thread state (see AuditFile).
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

    def record_encoded(self, fields: bytes, on_error: Callable[[Failure], object]) -> bool:
        """
        L{write_encoded} for a caller that only wants to hear of failures:
        no Deferred per line. C{on_error} gets the L{Failure}, at once if the
        line is refused, else from the writer thread's report (in the reactor).
        Returns whether the line was taken (False: refused at once).
        """
        refused = self._append(fields, _OnError(on_error))
        if refused is None:
            return True
        self._refuse(*refused).addErrback(on_error)
        return False

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
        """The line for C{fields} chained on the last one (L{build_line})."""
        return build_line(seq, rfc3339(now), self._prev, fields)

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

    def _fail(self, reason: str) -> None:
        """From the writer thread: fail the log until a restart, and say why."""
        with self._cond:
            if self._failure is None:
                self._failure = reason
        self._report("audit log failed: {reason}", reason=reason)


__all__ = [
    "AuditClosed", "AuditConfig", "AuditError", "AuditEventError", "AuditLog",
    "AuditOpenError", "AuditQueueFull", "AuditWriteError", "FSYNC_POLICIES",
    "MAX_EVENT_CHARS", "RESERVED_FIELDS", "credential_key", "encode_fields", "parse_audit",
]
