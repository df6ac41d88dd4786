"""
The shipped Prometheus alerting rules (etc/prometheus/): valid for
promtool, their unit tests pass, and every appliance metric they use exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus" / "appliance-alerts.yml"
RULE_TESTS = ROOT / "etc" / "prometheus" / "appliance-alerts.test.yml"
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs it)")
    return promtool


def test_promtool_accepts_the_rules_and_their_tests_pass() -> None:
    """promtool check rules, then promtool test rules with the shipped cases."""
    promtool = _promtool()
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        result = subprocess.run([promtool, *command], capture_output=True, text=True,
                                timeout=60, cwd=RULES.parent)
        assert result.returncode == 0, result.stdout + result.stderr


def _defined_metrics() -> set[str]:
    """Every appliance metric family name the code registers."""
    names: set[str] = set()
    for path in (ROOT / "appliance").rglob("*.py"):
        names.update(re.findall(r'"(appliance_[a-z0-9_]+)"', path.read_text()))
    return {_family(name) for name in names}


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_metric_in_the_rules_exists() -> None:
    """A renamed metric must not leave an alert that can never fire."""
    used = {_family(name) for name in re.findall(r"\b(appliance_[a-z0-9_]+)", RULES.read_text())}
    assert used, "no appliance metric found in the rules"
    missing = used - _defined_metrics()
    assert not missing, f"the rules use metrics the appliance does not have: {sorted(missing)}"
