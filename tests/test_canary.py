"""Tests that the canary check itself would catch a leak."""

from __future__ import annotations

from twisted.logger import Logger, LogPublisher

from tests import canary


def test_observer_catches_the_canary() -> None:
    """An event carrying the canary is recorded as a violation."""
    before = list(canary.violations)
    Logger(observer=LogPublisher(canary.observe)).info("leak {x}", x=canary.CANARY)
    assert len(canary.violations) == len(before) + 1
    del canary.violations[len(before):]  # this leak was on purpose


def test_outputs_are_scanned(tmp_path: object) -> None:
    """A subprocess output file with the canary is recorded as a violation."""
    path = tmp_path / "out.log"  # type: ignore[operator]
    path.write_text(f"oops {canary.CANARY}\n")
    before = len(canary.violations)
    canary.watch_output(path)
    canary.scan_outputs()
    assert len(canary.violations) > before
    del canary.violations[before:]
    path.unlink()
