"""
Session-wide test fixtures: real throwaway servers, the reactor, and the
canary check that fails the session if a secret leaked anywhere.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from twisted.logger import globalLogPublisher

from tests import canary
from tests.harness.fixtures import *  # noqa: F401,F403  (server fixtures)

# No per-example deadline: on a shared 2-core machine a busy moment made an
# example exceed hypothesis' default 200 ms and fail a correct test.
settings.register_profile("appliance", deadline=None)
settings.load_profile("appliance")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Watch every log event for the canary; create the dev key the shipped config names."""
    globalLogPublisher.addObserver(canary.observe)
    ensure_dev_key()


def ensure_dev_key() -> None:
    """What `make run` does: a random var/pow-dev.key for etc/appliance.ini."""
    key = Path(__file__).resolve().parent.parent / "var" / "pow-dev.key"
    if not key.exists():
        key.parent.mkdir(exist_ok=True)
        key.write_text(base64.b64encode(os.urandom(48)).decode() + "\n")
        key.chmod(0o600)


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
