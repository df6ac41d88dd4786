"""
The canary: a secret value configured through ${env:...} that must never
appear in any log line, metric or error text the suite produces.

The conftest sets the variable before anything runs, watches every in-process
log event and scans every appliance subprocess's output at session end.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from twisted.logger import formatEvent

CANARY_ENV = "APPLIANCE_TEST_CANARY"
CANARY = os.environ.setdefault(CANARY_ENV, "canary-" + secrets.token_hex(12))

violations: list[str] = []
_outputs: list[Path] = []


def watch_output(path: Path) -> None:
    """Scan this file for the canary at session end."""
    _outputs.append(path)


def check_text(text: str, where: str) -> None:
    """Record a violation if C{text} contains the canary."""
    if CANARY in text:
        violations.append(f"{where}: {text[:300]!r}")


def observe(event: dict[str, Any]) -> None:
    """A log observer recording events that carry the canary."""
    try:
        text = formatEvent(event) + json.dumps(event, default=repr)
        failure = event.get("log_failure")
        if failure is not None:
            text += failure.getTraceback()
    except Exception:
        text = repr(event)
    check_text(text, f"log event {event.get('log_namespace')}")


def scan_outputs() -> None:
    """Scan every watched subprocess output file."""
    for path in _outputs:
        if path.exists():
            check_text(path.read_text(errors="replace"), str(path))
