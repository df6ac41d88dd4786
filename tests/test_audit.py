"""
Tests for the audit log writer: the chain across writes, restarts and
rotation, fsync policies, the bounded queue, failures, redaction and metrics.

The writer thread is real; the clock is a L{Clock} where time matters.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from appliance.host.audit import (
    AuditClosed,
    AuditConfig,
    AuditEventError,
    AuditLog,
    AuditOpenError,
    AuditQueueFull,
    AuditWriteError,
    credential_key,
    encode_fields,
)
from appliance.host.audit_events import _OPAQUE_RUN
from appliance.host.audit_records import (
    GENESIS,
    RECOVERED_EVENT,
    build_line,
    line_hash,
    rfc3339,
)
from appliance.host.audit_verify import verify
from appliance.host.redact import MASK, redact, remember_secret


def lines_of(path: Path) -> list[bytes]:
    """The lines of an audit file, without newlines."""
    return path.read_bytes().splitlines()


def records_of(path: Path) -> list[dict[str, Any]]:
    """The decoded records of an audit file."""
    return [json.loads(line) for line in lines_of(path)]


def all_files(path: Path) -> list[str]:
    """The current file and its rotated ones, in any order."""
    return [str(p) for p in path.parent.glob(path.name + "*") if p.is_file()]


def sample(log: AuditLog, registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric's current value (0 when absent)."""
    return registry.get_sample_value(name, labels or None) or 0.0


def start_log(reactor: Any, path: Path, registry: CollectorRegistry | None = None,
              clock: Any = None, cls: type[AuditLog] = AuditLog, **options: Any) -> AuditLog:
    """A started audit log at C{path}."""
    log = cls(AuditConfig(str(path), **options), reactor,
              registry if registry is not None else CollectorRegistry(), clock=clock)
    log.startService()
    return log


async def write_many(log: AuditLog, count: int, start: int = 0) -> list[int]:
    """Write C{count} events at once and wait for all of them."""
    return list(await defer.gatherResults(
        [log.write({"event": "test", "n": start + n}) for n in range(count)]))


async def failure_of(d: defer.Deferred[Any]) -> BaseException:
    """The exception a Deferred fails with (the test fails if it succeeds)."""
    try:
        await d
    except Exception as error:
        return error
    raise AssertionError("expected a failure")


@pytest_twisted.ensureDeferred
async def test_round_trip_writes_then_verifies(reactor: Any, tmp_path: Path) -> None:
    """Each write fires with its seq, lines chain from the genesis value, verify says OK."""
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path)
    assert await write_many(log, 20) == list(range(20))
    await log.stopService()
    raw = lines_of(path)
    records = [json.loads(line) for line in raw]
    assert [r["seq"] for r in records] == list(range(20))
    assert records[0]["prev"] == GENESIS
    assert all(records[i + 1]["prev"] == line_hash(raw[i]) for i in range(19))
    assert [r["n"] for r in records] == list(range(20))
    result = verify([str(path)])
    assert result.ok and result.describe() == "OK: 20 lines in 1 files, chain intact"


@pytest_twisted.ensureDeferred
async def test_exact_line_format(reactor: Any, tmp_path: Path) -> None:
    """The envelope comes first, then the fields sorted by name, compact and ASCII."""
    clock = Clock()
    clock.advance(1700000000.25)
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, clock=clock)
    await log.write({"upstream": "api.example", "decision": "allow", "identity": "svc-a",
                     "method": "GET", "reason": "rule 3", "duration": 0.0042,
                     "note": "caf\u00e9"})
    await log.stopService()
    assert path.read_bytes() == (
        b'{"seq":0,"time":"2023-11-14T22:13:20.250000Z","prev":"' + GENESIS.encode()
        + b'","decision":"allow","duration":0.0042,"identity":"svc-a","method":"GET",'
        b'"note":"caf\\u00e9","reason":"rule 3","upstream":"api.example"}\n')


@pytest_twisted.ensureDeferred
async def test_restart_continues_the_chain(reactor: Any, tmp_path: Path) -> None:
    """A new log on the same file continues seq and prev from its last line."""
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path)
    await write_many(log, 3)
    await log.stopService()
    log = start_log(reactor, path)
    assert log.head == (2, line_hash(lines_of(path)[-1]))
    assert await write_many(log, 2) == [3, 4]
    await log.stopService()
    assert [r["seq"] for r in records_of(path)] == [0, 1, 2, 3, 4]
    assert verify([str(path)]).ok


@pytest_twisted.ensureDeferred
async def test_rotation_keeps_the_chain_and_keep_files(reactor: Any, tmp_path: Path) -> None:
    """Rotation by size keeps `keep` old files, deletes older ones, and the chain holds."""
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, rotate_size=1000, keep=2)
    for batch in range(6):
        await write_many(log, 10, start=batch * 10)
    await log.stopService()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 1000
    newest = records_of(path)
    older = records_of(tmp_path / "audit.jsonl.1")
    assert newest[0]["seq"] == older[-1]["seq"] + 1
    assert newest[0]["prev"] == line_hash(lines_of(tmp_path / "audit.jsonl.1")[-1])
    assert newest[-1]["seq"] == 59
    result = verify(all_files(path))
    assert result.ok, result.describe()
    assert result.files == 3 and result.lines == 59 - records_of(
        tmp_path / "audit.jsonl.2")[0]["seq"] + 1


@pytest_twisted.ensureDeferred
async def test_rotation_after_restart_and_smaller_keep(reactor: Any, tmp_path: Path) -> None:
    """Files beyond a reduced `keep` go at the next rotation; the chain spans restarts."""
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, rotate_size=600, keep=5)
    await write_many(log, 40)
    await log.stopService()
    assert (tmp_path / "audit.jsonl.5").exists()
    log = start_log(reactor, path, rotate_size=600, keep=1)
    await write_many(log, 10, start=40)
    await log.stopService()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.1"]
    assert verify(all_files(path)).ok


@pytest_twisted.ensureDeferred
async def test_fsync_always_syncs_before_each_deferred_fires(
        reactor: Any, tmp_path: Path) -> None:
    """Under `always` a write's Deferred fires only after an fsync covering its line."""
    registry = CollectorRegistry()
    log = start_log(reactor, tmp_path / "audit.jsonl", registry, fsync="always")

    def fsyncs() -> float:
        return sample(log, registry, "appliance_audit_fsync_seconds_count")

    seen: list[float] = []
    for n in range(3):
        d = log.write({"n": n})
        d.addCallback(lambda _: seen.append(fsyncs()))
        await d
    assert seen == [1.0, 2.0, 3.0]
    burst = [log.write({"n": n}) for n in range(50)]
    for d in burst:
        d.addCallback(lambda _: seen.append(fsyncs()))
    await defer.gatherResults(burst)
    # Lines queued together share one fsync (group commit), never skip it.
    assert all(count >= 4.0 for count in seen[3:])
    assert 4.0 <= fsyncs() <= 53.0
    await log.stopService()
    assert sample(log, registry, "appliance_audit_lines_total") == 53.0


@pytest_twisted.ensureDeferred
async def test_fsync_never_only_syncs_at_stop(reactor: Any, tmp_path: Path) -> None:
    """Under `never` writes are not synced; a clean stop still syncs once."""
    registry = CollectorRegistry()
    clock = Clock()
    log = start_log(reactor, tmp_path / "audit.jsonl", registry, clock=clock, fsync="never")
    await write_many(log, 10)
    assert sample(log, registry, "appliance_audit_fsync_seconds_count") == 0.0
    assert clock.getDelayedCalls() == []
    await log.stopService()
    assert sample(log, registry, "appliance_audit_fsync_seconds_count") == 1.0


@pytest_twisted.ensureDeferred
async def test_fsync_interval_syncs_at_most_once_per_interval(
        reactor: Any, tmp_path: Path) -> None:
    """Under `interval` one timer per interval queues an fsync; none without new lines."""
    registry = CollectorRegistry()
    clock = Clock()
    log = start_log(reactor, tmp_path / "audit.jsonl", registry, clock=clock,
                    fsync="interval", fsync_interval=1.0)

    def fsyncs() -> float:
        return sample(log, registry, "appliance_audit_fsync_seconds_count")

    await write_many(log, 5)
    assert fsyncs() == 0.0
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    assert clock.getDelayedCalls() == []
    await log.write({"n": 5})  # the queue is FIFO: the sync ran before this line
    assert fsyncs() == 1.0
    clock.advance(0.5)
    await log.write({"n": 6})
    assert fsyncs() == 1.0
    clock.advance(0.5)
    await log.write({"n": 7})
    assert fsyncs() == 2.0
    clock.advance(1.0)
    await log.flush()  # flush syncs only if something is unsynced
    assert fsyncs() == 3.0
    await log.stopService()
    assert fsyncs() == 3.0
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_stop_flushes_everything_queued(reactor: Any, tmp_path: Path) -> None:
    """stopService fires after every queued line is written, synced and the thread exited."""
    registry = CollectorRegistry()
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, registry, fsync="never")
    pending = [log.write({"n": n}) for n in range(500)]
    thread = log._thread
    assert thread is not None
    await log.stopService()
    assert not thread.is_alive()
    assert all(d.called for d in pending)
    assert [d.result for d in pending] == list(range(500))
    assert len(lines_of(path)) == 500
    assert sample(log, registry, "appliance_audit_fsync_seconds_count") == 1.0
    second = log.stopService()  # twice is fine
    assert second.called
    await second
    error = await failure_of(log.write({"late": True}))
    assert isinstance(error, AuditClosed)
    assert sample(log, registry, "appliance_audit_write_errors_total", reason="closed") == 1.0
    assert isinstance(await failure_of(log.flush()), AuditClosed)


class BlockedDisk(AuditLog):
    """A log whose writer thread blocks in its first write until released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered: defer.Deferred[None] = defer.Deferred()
        self.release = threading.Event()

    def _write_all(self, fd: int, data: bytes) -> None:
        if not self.release.is_set():
            self._reactor.callFromThread(self.entered.callback, None)
            self.release.wait(30)
            self.release.set()
        super()._write_all(fd, data)


@pytest_twisted.ensureDeferred
async def test_queue_full_fails_fast_and_counts(reactor: Any, tmp_path: Path) -> None:
    """When the disk stalls, writes beyond queue_size fail at once; nothing is lost after."""
    registry = CollectorRegistry()
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, registry, cls=BlockedDisk, queue_size=3)
    assert isinstance(log, BlockedDisk)
    first = log.write({"n": 0})
    await log.entered  # the writer holds line 0 and is stuck in write()
    queued = [log.write({"n": n}) for n in (1, 2, 3)]
    assert sample(log, registry, "appliance_audit_queue_depth") == 3.0
    with capturedLogs() as events:
        error = await failure_of(log.write({"n": 4}))
        await failure_of(log.write({"n": 5}))
    assert isinstance(error, AuditQueueFull) and "queue full" in str(error)
    assert len([e for e in events if "queue full" in e.get("log_format", "")
                or "queue full" in str(e.get("error", ""))]) == 1
    assert sample(log, registry, "appliance_audit_write_errors_total",
                  reason="queue_full") == 2.0
    log.release.set()
    assert await defer.gatherResults([first, *queued]) == [0, 1, 2, 3]
    assert await log.write({"n": 6}) == 4  # refused events took no seq
    await log.stopService()
    assert sample(log, registry, "appliance_audit_queue_depth") == 0.0
    assert [r["n"] for r in records_of(path)] == [0, 1, 2, 3, 6]
    assert verify([str(path)]).ok


class FullDisk(AuditLog):
    """A log whose disk is full for the second write only (a partial write)."""

    writes = 0

    def _write_all(self, fd: int, data: bytes) -> None:
        self.writes += 1
        if self.writes == 2:
            os.write(fd, data[:10])  # a torn fragment, as ENOSPC can leave
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write_all(fd, data)


@pytest_twisted.ensureDeferred
async def test_failed_write_is_undone_and_the_log_carries_on(
        reactor: Any, tmp_path: Path) -> None:
    """A failed write is cut back out; lines chained on it fail; the next write works."""
    registry = CollectorRegistry()
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, registry, cls=FullDisk)
    assert await log.write({"n": 0}) == 0  # the first write
    # Lines queued together go out in one write: the second write, which fails.
    writes = [log.write({"n": n}) for n in range(1, 4)]
    outcomes: list[Any] = []
    for d in writes:
        try:
            outcomes.append(await d)
        except AuditWriteError as error:
            outcomes.append(error)
    assert all("No space left" in str(outcome) for outcome in outcomes)
    assert log.writes == 2
    assert await log.write({"n": 4}) == 1  # the chain restarts after line 0
    await log.stopService()
    records = records_of(path)
    assert [r["n"] for r in records] == [0, 4]
    assert [r["seq"] for r in records] == [0, 1]
    assert verify([str(path)]).ok
    assert sample(log, registry, "appliance_audit_write_errors_total", reason="io") == 3


@pytest_twisted.ensureDeferred
async def test_lines_queued_together_are_written_at_once(
        reactor: Any, tmp_path: Path) -> None:
    """A burst of events costs one write, not one per line."""
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, cls=FullDisk)
    log.writes = 10  # never fail
    seqs = await defer.gatherResults([log.write({"n": n}) for n in range(50)])
    assert seqs == list(range(50))
    assert log.writes == 11
    await log.stopService()
    assert [r["n"] for r in records_of(path)] == list(range(50))
    assert verify([str(path)]).ok


class BrokenSync(AuditLog):
    """A log whose fsync fails (EIO)."""

    def _fsync(self, fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")


@pytest_twisted.ensureDeferred
async def test_failed_fsync_fails_the_log_until_restart(reactor: Any, tmp_path: Path) -> None:
    """After an fsync error nothing is acknowledged any more; stop still completes."""
    registry = CollectorRegistry()
    log = start_log(reactor, tmp_path / "audit.jsonl", registry, cls=BrokenSync,
                    fsync="always")
    error = await failure_of(log.write({"n": 0}))
    assert isinstance(error, AuditWriteError) and "fsync" in str(error)
    later = await failure_of(log.write({"n": 1}))
    assert isinstance(later, AuditWriteError) and "restart needed" in str(later)
    assert log.status()["failed"] is not None
    await log.stopService()
    assert sample(log, registry, "appliance_audit_write_errors_total", reason="io") == 2.0


@pytest_twisted.ensureDeferred
async def test_torn_last_line_is_sealed_and_the_chain_continues(
        reactor: Any, tmp_path: Path) -> None:
    """A torn last line is kept in a rotated file and sealed by a recovery line."""
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path)
    await write_many(log, 5)
    await log.stopService()
    whole = path.read_bytes()
    torn = b'{"seq":5,"time":"2025-01-0'
    path.write_bytes(whole + torn)
    assert not verify([str(path)]).ok
    with capturedLogs() as events:
        log = start_log(reactor, path)
    assert any("torn line" in e.get("log_format", "") for e in events)
    assert (tmp_path / "audit.jsonl.1").read_bytes() == whole + torn  # evidence kept
    seal = records_of(path)[0]
    assert seal["event"] == RECOVERED_EVENT and seal["seq"] == 5
    assert seal["prev"] == line_hash(whole.splitlines()[-1])
    assert seal["torn_bytes"] == len(torn) and seal["torn_sha256"] == line_hash(torn)
    assert await log.write({"n": 5}) == 6
    await log.stopService()
    result = verify([str(path), str(tmp_path / "audit.jsonl.1")])
    assert result.ok, result.describe()
    assert result.lines == 7
    assert result.notes == (f"{tmp_path / 'audit.jsonl.1'}:6: torn line from a crash, "
                            f"sealed by {path}:1",)


@pytest_twisted.ensureDeferred
async def test_torn_first_line_after_rotation(reactor: Any, tmp_path: Path) -> None:
    """A current file holding only a fragment chains its seal on the rotated file."""
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, rotate_size=400, keep=3)
    await write_many(log, 6)
    await log.stopService()
    rotated_end = records_of(tmp_path / "audit.jsonl.1")[-1]["seq"]
    path.write_bytes(b'{"seq":')  # the crash came during the first write after a rotation
    log = start_log(reactor, path, rotate_size=4000, keep=3)
    await log.write({"n": 99})
    await log.stopService()
    seal = records_of(path)[0]
    assert seal["event"] == RECOVERED_EVENT and seal["seq"] == rotated_end + 1
    assert (tmp_path / "audit.jsonl.1").read_bytes() == b'{"seq":'
    result = verify(all_files(path))
    assert result.ok, result.describe()


@pytest_twisted.ensureDeferred
async def test_garbage_last_line_refuses_to_start(reactor: Any, tmp_path: Path) -> None:
    """A complete last line that is not a record is no crash artefact: start fails."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"hello world\n")
    log = AuditLog(AuditConfig(str(path)), reactor, CollectorRegistry())
    with pytest.raises(AuditOpenError, match="the last line is not an audit record"):
        log.startService()
    assert not log.running
    stopped = log.stopService()
    assert stopped.called
    await stopped


@pytest_twisted.ensureDeferred
async def test_secrets_never_reach_the_file(reactor: Any, tmp_path: Path) -> None:
    """Remembered secrets and credential patterns are masked in values and keys;
    credential-like keys keep their name but lose their value."""
    secret = "s3cr3t-audit-value-" + "x" * 8
    remember_secret(secret)
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path)
    await log.write({
        "event": "decision", "reason": f"upstream said {secret}",
        "headers": {"Authorization": "Bearer abc.def", "x-trace": [secret, 1, None]},
        "raw": secret.encode(), secret: "as a key", "password": "hunter2",
        "api-key": 12345, "nested": {"clientSecret": {"deep": "hunter3"}},
        "dsn": "postgresql://app:pw-hunter4@db/app",
    })
    await log.stopService()
    text = path.read_text()
    for leaked in (secret, "hunter2", "hunter3", "hunter4", "abc.def", "12345"):
        assert leaked not in text
    record = records_of(path)[0]
    assert record["password"] == record["api-key"] == "[REDACTED]"
    assert record["headers"]["Authorization"] == "[REDACTED]"
    assert record["nested"] == {"clientSecret": "[REDACTED]"}
    assert record["raw"] == "[REDACTED]" and record["[REDACTED]"] == "as a key"
    assert record["headers"]["x-trace"] == ["[REDACTED]", 1, None]
    assert verify([str(path)]).ok


def test_redaction_across_fields_stays_per_field() -> None:
    """A credential pattern at the end of one field never swallows the next field."""
    record = json.loads(b"{" + encode_fields({"a": "authorization: abc", "b": "next",
                                               "c": "token=x", "d": "Bearer"}) + b"}")
    assert record == {"a": "authorization: [REDACTED]", "b": "next",
                      "c": "token=[REDACTED]", "d": "Bearer"}


_FRAGMENTS = st.sampled_from([
    "a", "Z", "0", " ", ":", "/", "@", "=", ",", ";", "\n", "\x00", ".", "-", "password",
    "token", "Bearer ", "basic ", "Authorization", "cookie", "https://", "u:p@h",
    "s3cr3t-remembered", "x" * 130, "[REDACTED]", "\r", "&", "'", '"'])
_TEXTS = st.lists(_FRAGMENTS, max_size=8).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_TEXTS, st.one_of(_TEXTS, st.lists(_TEXTS, max_size=3)), max_size=5))
def test_encoding_matches_field_by_field_redaction(event: dict[str, Any]) -> None:
    """Redacting all fields in one pass gives exactly the field-by-field result."""
    remember_secret("s3cr3t-remembered")

    def one(text: str) -> str:
        return redact(_OPAQUE_RUN.sub(MASK, text))

    def reference(value: Any) -> Any:
        if isinstance(value, list):
            return [reference(item) for item in value]
        return one(value)

    expected = {one(key): MASK if credential_key(key) else reference(value)
                for key, value in event.items() if key not in ("seq", "time", "prev")}
    event = {key: value for key, value in event.items() if key not in ("seq", "time", "prev")}
    assert json.loads(b"{" + encode_fields(event) + b"}") == expected


def test_credential_key_detection() -> None:
    """Key names that look like credentials are recognised in any spelling."""
    for name in ("password", "Passwd", "db_password", "token", "X-Auth-Token", "secret",
                 "client_secret", "Authorization", "api_key", "apiKey", "access-key",
                 "private_key", "credentials", "Cookie", "passphrase"):
        assert credential_key(name), name
    for name in ("identity", "upstream", "method", "decision", "reason", "duration",
                 "user", "key_id"):
        assert not credential_key(name), name


@pytest_twisted.ensureDeferred
async def test_invalid_events_are_refused_without_a_gap(reactor: Any, tmp_path: Path) -> None:
    """Reserved fields, non-JSON values and oversized events fail; no seq is used."""
    registry = CollectorRegistry()
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, registry)
    for bad in ({"seq": 1}, {"prev": "x"}, {1: "a"}, {"x": float("nan")}, {"x": object()},
                {"x": "y " * 9000}, {"x": 2**64}, ["not", "a", "mapping"]):
        error = await failure_of(log.write(bad))  # type: ignore[arg-type]
        assert isinstance(error, AuditEventError), bad
    deep: dict[str, Any] = {}
    for _ in range(40):
        deep = {"d": deep}
    assert isinstance(await failure_of(log.write(deep)), AuditEventError)
    assert await log.write({"ok": True, "tuple": (1, 2)}) == 0
    await log.stopService()
    assert sample(log, registry, "appliance_audit_write_errors_total", reason="invalid") == 9.0
    assert records_of(path)[0]["tuple"] == [1, 2]
    assert verify([str(path)]).ok


@pytest_twisted.ensureDeferred
async def test_metrics_are_registered(reactor: Any, tmp_path: Path) -> None:
    """The four audit metrics appear in the registry under their documented names."""
    registry = CollectorRegistry()
    log = start_log(reactor, tmp_path / "audit.jsonl", registry, fsync="always")
    await write_many(log, 2)
    await log.stopService()
    names = {sample.name for family in registry.collect() for sample in family.samples}
    for name in ("appliance_audit_lines_total", "appliance_audit_write_errors_total",
                 "appliance_audit_queue_depth", "appliance_audit_fsync_seconds_bucket"):
        assert name in names, name
    assert sample(log, registry, "appliance_audit_lines_total") == 2.0
    assert sample(log, registry, "appliance_audit_write_errors_total", reason="io") == 0.0


@pytest_twisted.ensureDeferred
async def test_record_encoded_reports_only_failures(reactor: Any, tmp_path: Path) -> None:
    """record_encoded chains like write_encoded; on_error hears of write failures only."""
    registry = CollectorRegistry()
    path = tmp_path / "audit.jsonl"
    log = start_log(reactor, path, registry, cls=FullDisk)
    errors: list[Any] = []
    log.record_encoded(encode_fields({"n": 0}), errors.append)
    assert await log.write({"n": 1}) == 1  # the first write, both lines
    log.record_encoded(encode_fields({"n": 2}), errors.append)  # the second write fails
    await failure_of(log.write({"n": 3}))
    assert [failure.check(AuditWriteError) for failure in errors] == [AuditWriteError]
    assert "No space left" in errors[0].getErrorMessage()
    await log.stopService()
    assert [r["n"] for r in records_of(path)] == [0, 1]
    assert verify([str(path)]).ok


@pytest_twisted.ensureDeferred
async def test_record_encoded_refused_at_once(reactor: Any, tmp_path: Path) -> None:
    """A line refused on the spot (log stopped) reaches on_error at once, and is counted."""
    registry = CollectorRegistry()
    log = start_log(reactor, tmp_path / "audit.jsonl", registry)
    await log.stopService()
    errors: list[Any] = []
    assert log.record_encoded(encode_fields({"n": 0}), errors.append) is False
    assert [failure.check(AuditClosed) for failure in errors] == [AuditClosed]
    assert sample(log, registry, "appliance_audit_write_errors_total", reason="closed") == 1


@settings(max_examples=300)
@given(st.integers(0, 2**40), st.floats(0, 4e9, allow_nan=False) | st.integers(0, 4 * 10**9),
       st.sampled_from([b"", b'"event":"x"', b'"a":1,"b":"c"']))
def test_line_envelope_is_build_line_of_rfc3339(seq: int, now: float, fields: bytes) -> None:
    """The one-format envelope is byte for byte build_line(seq, rfc3339(now), prev, fields)."""
    log = AuditLog(AuditConfig("/nonexistent/audit.jsonl"), Clock(), CollectorRegistry())
    log._prev = line_hash(b"previous")
    for moment in (now, now + 0.5, now):  # the cached date part, reused and replaced
        assert log._line(seq, moment, fields) == build_line(seq, rfc3339(moment), log._prev,
                                                            fields)
