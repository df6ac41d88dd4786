"""
Tests for audit log verification: every kind of tampering is found and the
first bad line named; the C{appliance audit-verify} command as a subprocess;
random input never makes the verifier raise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from appliance.host.audit import AuditConfig, AuditLog, encode_fields
from appliance.host.audit_records import (
    GENESIS,
    MAX_LINE_BYTES,
    RECOVERED_EVENT,
    build_line,
    line_hash,
    rfc3339,
)
from appliance.host.audit_verify import verify

ROOT = Path(__file__).resolve().parent.parent
APPLIANCE = Path(sys.executable).parent / "appliance"


def chain_lines(count: int, start: int = 0, prev: str = GENESIS) -> list[bytes]:
    """C{count} valid chained lines from seq C{start}, without newlines."""
    lines = []
    for seq in range(start, start + count):
        line = build_line(seq, rfc3339(1700000000 + seq), prev,
                          encode_fields({"event": "test", "n": seq, "who": f"user-{seq}"}))
        prev = line_hash(line)
        lines.append(line)
    return lines


def put(path: Path, lines: list[bytes], end: bytes = b"\n") -> str:
    """Write lines (each followed by a newline, the last by C{end})."""
    body = b"\n".join(lines) + end if lines else b""
    path.write_bytes(body)
    return str(path)


def rotated_set(directory: Path, sizes: list[int]) -> list[str]:
    """A chained set of files, oldest first: audit.jsonl.N ... audit.jsonl."""
    names = [f"audit.jsonl.{n}" for n in range(len(sizes) - 1, 0, -1)] + ["audit.jsonl"]
    paths, seq, prev = [], 0, GENESIS
    for name, size in zip(names, sizes, strict=True):
        lines = chain_lines(size, seq, prev)
        seq, prev = seq + size, line_hash(lines[-1])
        paths.append(put(directory / name, lines))
    return paths


def bad_at(paths: list[str]) -> tuple[str, int, str]:
    """Verify and return (file name, line, reason) of the first bad line."""
    result = verify(paths)
    assert not result.ok and result.line is not None, result
    assert result.file is not None and result.reason is not None
    assert result.exit_status == 1
    return Path(result.file).name, result.line, result.reason


def edit(line: bytes, **changes: Any) -> bytes:
    """A line with some fields changed, still valid JSON."""
    record = json.loads(line)
    record.update(changes)
    return json.dumps(record, separators=(",", ":")).encode()


def test_intact_set_in_any_order(tmp_path: Path) -> None:
    """An intact rotated set verifies whatever order the files are given in."""
    paths = rotated_set(tmp_path, [5, 4, 6])
    for order in (paths, list(reversed(paths)), [paths[1], paths[2], paths[0]]):
        result = verify(order)
        assert result.ok and result.exit_status == 0
        assert result.describe() == "OK: 15 lines in 3 files, chain intact"


def test_empty_file_is_intact(tmp_path: Path) -> None:
    """An empty file (a fresh log) holds no lines and nothing wrong."""
    assert verify([put(tmp_path / "a", [])]).describe() == "OK: 0 lines in 1 files, chain intact"


def test_edited_field_names_the_edited_line(tmp_path: Path) -> None:
    """Changing a field of line 4 breaks the hash recorded by line 5: line 4 is named."""
    lines = chain_lines(10)
    lines[3] = edit(lines[3], who="someone-else")
    assert bad_at([put(tmp_path / "a", lines)]) == (
        "a", 4, "hash mismatch: line edited (the next line records another hash for it)")


def test_edited_prev_names_that_line(tmp_path: Path) -> None:
    """Editing line 4's own prev is told apart from an edit of line 3."""
    lines = chain_lines(10)
    lines[3] = edit(lines[3], prev="f" * 64)
    name, number, reason = bad_at([put(tmp_path / "a", lines)])
    assert (name, number) == ("a", 4) and reason.startswith("hash mismatch: line edited")


def test_edited_last_line_of_a_rotated_file(tmp_path: Path) -> None:
    """An edit of the last line of an older file is found through the next file's link."""
    paths = rotated_set(tmp_path, [3, 3, 3])
    older = Path(paths[1])
    lines = older.read_bytes().splitlines()
    lines[-1] = edit(lines[-1], n=999)
    put(older, lines)
    assert bad_at(paths)[:2] == ("audit.jsonl.1", 3)


def test_deleted_line_is_a_seq_gap(tmp_path: Path) -> None:
    """Removing line 4 shows up at the line now in its place."""
    lines = chain_lines(10)
    del lines[3]
    assert bad_at([put(tmp_path / "a", lines)]) == (
        "a", 4, "seq gap: seq 4 follows seq 2 (1 line(s) removed before this one)")


def test_swapped_lines_are_reordered(tmp_path: Path) -> None:
    """Swapping lines 4 and 5 names line 4 as reordered."""
    lines = chain_lines(10)
    lines[3], lines[4] = lines[4], lines[3]
    assert bad_at([put(tmp_path / "a", lines)]) == (
        "a", 4, "reordered: seq 4 appears before seq 3")


def test_duplicated_line_goes_backwards(tmp_path: Path) -> None:
    """A repeated line makes seq go backwards at the copy."""
    lines = chain_lines(6)
    lines.insert(3, lines[2])
    assert bad_at([put(tmp_path / "a", lines)]) == (
        "a", 4, "reordered: seq 2 follows seq 2 (seq goes backwards)")


def test_truncated_mid_line(tmp_path: Path) -> None:
    """A file cut in the middle of line 7 names line 7."""
    lines = chain_lines(10)
    path = put(tmp_path / "a", lines)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: data.index(lines[6]) + 40])
    assert bad_at([path]) == (
        "a", 7, "truncated line: no newline at the end (torn write or truncation)")


def test_line_cut_in_the_middle_is_bad_json(tmp_path: Path) -> None:
    """Half a line in the middle of the file is bad JSON at that line."""
    lines = chain_lines(10)
    lines[4] = lines[4][:30]
    name, number, reason = bad_at([put(tmp_path / "a", lines)])
    assert (name, number) == ("a", 5) and reason.startswith("bad JSON")


def test_missing_middle_file_breaks_the_link(tmp_path: Path) -> None:
    """Deleting a middle rotated file is a broken link at the next file's first line."""
    paths = rotated_set(tmp_path, [4, 4, 4, 4])
    os.unlink(paths[1])
    del paths[1]
    name, number, reason = bad_at(paths)
    assert (name, number) == ("audit.jsonl.1", 1)
    assert reason.startswith("broken link between files: starts at seq 8 but ")
    assert "audit.jsonl.3 ends at seq 3" in reason


def test_not_a_record(tmp_path: Path) -> None:
    """Valid JSON that is not an audit record is named as such."""
    lines = chain_lines(3)
    lines.insert(1, b'{"hello":"world"}')
    assert bad_at([put(tmp_path / "a", lines)]) == (
        "a", 2, "not an audit record: seq is missing or not a non-negative integer")
    assert bad_at([put(tmp_path / "b", [b"[1,2]"])])[1:] == (
        1, "not an audit record: not a JSON object")


def test_seq_zero_needs_the_genesis_prev(tmp_path: Path) -> None:
    """The very first line (seq 0) must carry the genesis prev."""
    lines = chain_lines(3, prev="a" * 64)
    assert bad_at([put(tmp_path / "a", lines)])[:2] == ("a", 1)
    later = chain_lines(3, start=10, prev="a" * 64)  # older files rotated away
    assert verify([put(tmp_path / "b", later)]).ok


def test_overlong_line(tmp_path: Path) -> None:
    """A line over the size limit is reported without being held in memory."""
    lines = chain_lines(2) + [b"x" * (MAX_LINE_BYTES + 10)] + chain_lines(1, start=2)
    assert bad_at([put(tmp_path / "a", lines)]) == (
        "a", 3, f"line longer than {MAX_LINE_BYTES} bytes")
    torn = chain_lines(2) + [b"y" * (MAX_LINE_BYTES * 2)]
    assert bad_at([put(tmp_path / "b", torn, end=b"")])[1] == 3


def test_forged_seal_does_not_excuse_a_truncation(tmp_path: Path) -> None:
    """A recovery line only seals the exact torn bytes it names."""
    lines = chain_lines(4)
    older = put(tmp_path / "audit.jsonl.1", lines[:3] + [lines[3][:20]], end=b"")
    seal = build_line(3, rfc3339(0), line_hash(lines[2]), encode_fields({
        "event": RECOVERED_EVENT, "torn_bytes": 20, "torn_sha256": "0" * 64}))
    current = put(tmp_path / "audit.jsonl", [seal] + chain_lines(2, 4, line_hash(seal)))
    assert bad_at([older, current])[:2] == ("audit.jsonl.1", 4)
    good_seal = build_line(3, rfc3339(0), line_hash(lines[2]), encode_fields({
        "event": RECOVERED_EVENT, "torn_bytes": 20,
        "torn_sha256": line_hash(lines[3][:20])}))
    put(tmp_path / "audit.jsonl", [good_seal] + chain_lines(2, 4, line_hash(good_seal)))
    result = verify([current, older])
    assert result.ok and result.lines == 6 and len(result.notes) == 1


def test_unreadable_input(tmp_path: Path) -> None:
    """A missing file or a directory is unreadable input (status 2), no line named."""
    good = put(tmp_path / "a", chain_lines(2))
    for bad in (str(tmp_path / "missing"), str(tmp_path)):
        result = verify([good, bad])
        assert not result.ok and result.unreadable and result.exit_status == 2
        assert result.file == bad and result.line is None
        assert result.describe().startswith(f"{bad}: cannot read: ")


def test_verification_streams_in_bounded_memory(tmp_path: Path) -> None:
    """Verifying a ~10 MB file keeps well under 2 MB of Python allocations."""
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as handle:
        prev = GENESIS
        fields = encode_fields({"event": "test", "pad": "p " * 40})
        for seq in range(60000):
            line = build_line(seq, "2025-01-01T00:00:00.000000Z", prev, fields)
            prev = line_hash(line)
            handle.write(line + b"\n")
    assert path.stat().st_size > 10_000_000
    tracemalloc.start()
    try:
        result = verify([str(path)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok and result.lines == 60000
    assert peak < 2_000_000, peak


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `appliance` console script."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([str(APPLIANCE), *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)


@pytest.mark.slow
def test_cli_ok_tampered_and_unreadable(tmp_path: Path) -> None:
    """`appliance audit-verify` prints OK/exit 0, FILE:LINE: reason/exit 1, exit 2."""
    paths = rotated_set(tmp_path, [3, 3])
    done = run_cli("audit-verify", *reversed(paths))
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "OK: 6 lines in 2 files, chain intact\n", "")
    lines = Path(paths[0]).read_bytes().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    put(Path(paths[0]), lines)
    done = run_cli("audit-verify", *paths)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"{paths[0]}:1: reordered: seq 1 appears before seq 0\n"
    done = run_cli("audit-verify", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"{tmp_path / 'nope'}: cannot read: No such file")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_cli_on_a_log_written_by_the_service(reactor: Any, tmp_path: Path) -> None:
    """A rotated log written by AuditLog verifies with the CLI; deleting a middle
    file is reported as a broken link."""
    log = AuditLog(AuditConfig(str(tmp_path / "audit.jsonl"), rotate_size=700, keep=5),
                   reactor, CollectorRegistry())
    log.startService()
    for n in range(30):
        await log.write({"event": "decision", "n": n, "decision": "allow"})
    await log.stopService()
    files = sorted(str(p) for p in tmp_path.iterdir())
    assert len(files) == 6
    done = run_cli("audit-verify", *files)
    assert done.returncode == 0 and done.stdout.startswith("OK: ")
    os.unlink(tmp_path / "audit.jsonl.3")
    done = run_cli("audit-verify", *[f for f in files if not f.endswith(".3")])
    assert done.returncode == 1
    assert done.stderr.startswith(f"{tmp_path / 'audit.jsonl.2'}:1: broken link between files")


def assert_names_a_line(result: Any, paths: list[str]) -> None:
    """A result is either OK or names a line of one of the given files."""
    if not result.ok:
        assert not result.unreadable
        assert result.file in paths and result.line is not None and result.line >= 1
        assert result.describe().startswith(f"{result.file}:{result.line}: ")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), max_size=4))
def test_random_bytes_never_raise(tmp_path: Path, contents: list[bytes]) -> None:
    """Whatever bytes the files hold, verify returns a result naming a line."""
    paths = []
    for n, content in enumerate(contents):
        path = tmp_path / f"f{n}"
        path.write_bytes(content)
        paths.append(str(path))
    assert_names_a_line(verify(paths), paths)


_MUTATIONS = st.lists(st.tuples(
    st.sampled_from(["delete", "swap", "copy", "flip", "cut", "junk"]),
    st.integers(0, 1000), st.integers(0, 1000), st.binary(max_size=20)), max_size=4)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 12), st.integers(1, 3), _MUTATIONS, st.booleans())
def test_mutated_chains_never_raise(tmp_path: Path, count: int, files: int,
                                    mutations: list[tuple[str, int, int, bytes]],
                                    torn_end: bool) -> None:
    """Random line-level damage to a valid set is either reported at a line or
    (for damage at the very end) invisible; verify never raises."""
    lines = chain_lines(count * files)
    for kind, i, j, junk in mutations:
        if not lines:
            break
        i, j = i % len(lines), j % len(lines)
        if kind == "delete":
            del lines[i]
        elif kind == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "copy":
            lines.insert(j, lines[i])
        elif kind == "flip" and lines[i]:
            data = bytearray(lines[i])
            data[j % len(data)] ^= 1 << (j % 8)
            lines[i] = bytes(data)
        elif kind == "cut":
            lines[i] = lines[i][: j % (len(lines[i]) + 1)]
        else:
            lines.insert(i, junk)
    paths = []
    for n in range(files):
        part = lines[n * count:(n + 1) * count]
        end = b"" if torn_end and n == files - 1 else b"\n"
        paths.append(put(tmp_path / f"f{n}", part, end=end))
    assert_names_a_line(verify(paths), paths)
