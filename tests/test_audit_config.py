"""Tests for reading the [audit] section."""

from __future__ import annotations

from pathlib import Path

from appliance.host.audit import AuditConfig, parse_audit
from appliance.host.ini import ConfigProblem, ConfigReader, read_ini


def parse(tmp_path: Path, text: str) -> tuple[AuditConfig | None, list[str]]:
    """Parse the [audit] section of an ini text; return the config and problems."""
    path = tmp_path / "a.ini"
    path.write_text(text)
    problems: list[ConfigProblem] = []
    reader = ConfigReader(read_ini(str(path), problems), problems)
    config = parse_audit(reader.section("audit"))
    reader.finish()
    return config, [str(p).split(": ", 1)[1] for p in problems]


def test_absent_section_means_no_audit_log(tmp_path: Path) -> None:
    """Without [audit] there is no audit log and nothing to complain about."""
    config, problems = parse(tmp_path, "")
    assert config is None and problems == []


def test_defaults(tmp_path: Path) -> None:
    """Only path is needed; the rest have documented defaults."""
    config, problems = parse(tmp_path, "[audit]\npath = /var/log/appliance/audit.jsonl\n")
    assert problems == []
    assert config == AuditConfig("/var/log/appliance/audit.jsonl", fsync="interval",
                                 fsync_interval=1.0, rotate_size=100 * 1024 * 1024,
                                 keep=10, queue_size=10000)


def test_every_key(tmp_path: Path) -> None:
    """Every key is read with its converter."""
    config, problems = parse(tmp_path, "[audit]\npath = /a/audit.jsonl\nfsync = Always\n"
                             "fsync_interval = 250ms\nrotate_size = 10MiB\nkeep = 0\n"
                             "queue_size = 500\n")
    assert problems == []
    assert config == AuditConfig("/a/audit.jsonl", "always", 0.25, 10 * 1024 * 1024, 0, 500)


def test_every_problem_is_recorded(tmp_path: Path) -> None:
    """Bad values are recorded, one problem per key, and parsing goes on."""
    _, problems = parse(tmp_path, "[audit]\nfsync = sometimes\nfsync_interval = soon\n"
                        "rotate_size = big\nkeep = -1\nqueue_size = 0\nrotate = daily\n")
    assert problems == [
        "[audit] path: is required",
        "[audit] fsync: expected one of always, interval, never, got 'sometimes'",
        "[audit] fsync_interval: expected a duration such as 250ms, 30s, 5m or 1h, "
        "got 'soon'",
        "[audit] rotate_size: expected a size such as 512B, 16KiB, 10MiB or 1GiB, got 'big'",
        "[audit] keep: expected at least 0, got '-1'",
        "[audit] queue_size: expected at least 1, got '0'",
        "[audit] rotate: unknown key",
    ]


def test_path_must_be_an_absolute_file(tmp_path: Path) -> None:
    """A relative path or a directory path is refused."""
    for value in ("audit.jsonl", "/var/log/"):
        _, problems = parse(tmp_path, f"[audit]\npath = {value}\n")
        assert problems == [f"[audit] path: expected an absolute file path, got {value!r}"]
