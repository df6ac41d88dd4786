"""
Session-wide test fixtures: real throwaway servers, the reactor, and the
canary check that fails the session if a secret leaked anywhere.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from tests import canary
from tests.harness.fixtures import *  # noqa: F401,F403  (server fixtures)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Watch every in-process log event for the canary secret."""
    globalLogPublisher.addObserver(canary.observe)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if the canary appeared in any log, output or error text."""
    globalLogPublisher.removeObserver(canary.observe)
    canary.scan_outputs()
    if canary.violations:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("CANARY SECRET LEAKED:", red=True, bold=True)
            for violation in canary.violations:
                reporter.write_line(f"  {violation}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def reactor() -> Any:
    """The global reactor pytest-twisted runs the tests in."""
    from twisted.internet import reactor as global_reactor

    return global_reactor
