"""Tests for the policy keys of a service section, and the rules-mode Policy built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.task import Clock

from appliance.host.ini import ConfigProblem, ConfigReader, read_ini
from appliance.host.secret import Secret
from appliance.policy import (
    OPAConfig,
    Policy,
    PolicyConfig,
    PolicyDecision,
    PolicyInput,
    Rule,
    RulesEngine,
    build_policy,
    parse_policy,
)
from tests.canary import CANARY, CANARY_ENV


def parse(tmp_path: Path, text: str) -> tuple[PolicyConfig, list[str]]:
    """Parse [secretproxy] of an ini text; return the config and the problems."""
    path = tmp_path / "a.ini"
    path.write_text("[secretproxy]\n" + text)
    problems: list[ConfigProblem] = []
    reader = ConfigReader(read_ini(str(path), problems), problems,
                          environ={CANARY_ENV: CANARY})
    config = parse_policy(reader.section("secretproxy"))
    reader.finish()
    return config, [str(p).split(": ", 1)[1] for p in problems]


def test_defaults_are_builtin_rules(tmp_path: Path) -> None:
    """Without keys: mode rules, no rules (everything denied), no OPA."""
    config, problems = parse(tmp_path, "")
    assert problems == [] and config == PolicyConfig("rules", (), None)


def test_every_opa_key(tmp_path: Path) -> None:
    """opa mode reads URL, path, timeout, token, cache TTL and size."""
    config, problems = parse(tmp_path, f"""policy = OPA
opa_url = http://127.0.0.1:8181/
opa_path = secretproxy.allow
opa_timeout = 250ms
opa_token = ${{env:{CANARY_ENV}}}
opa_cache_ttl = 30s
opa_cache_size = 500
""")
    assert problems == []
    assert config == PolicyConfig("opa", (), OPAConfig(
        "http://127.0.0.1:8181", "secretproxy/allow", 0.25,
        Secret(f"${{env:{CANARY_ENV}}}", CANARY), 30.0, 500))
    assert config.opa is not None
    assert config.opa.data_url == "http://127.0.0.1:8181/v1/data/secretproxy/allow"
    assert config.opa.health_url == "http://127.0.0.1:8181/health"
    assert CANARY not in repr(config)


def test_opa_defaults_and_both_mode_with_rules(tmp_path: Path) -> None:
    """both keeps the rules; timeout 500ms, TTL 5s and 10000 entries by default."""
    config, problems = parse(tmp_path, "policy = both\nopa_url = https://opa.internal\n"
                                       "opa_path = gateway/decision\n"
                                       "[secretproxy.rule:read]\nmethod = GET\n")
    assert problems == []
    assert config.mode == "both" and [r.name for r in config.rules] == ["read"]
    assert config.opa == OPAConfig("https://opa.internal", "gateway/decision")
    assert (config.opa.timeout, config.opa.cache_ttl, config.opa.cache_size) == (0.5, 5.0, 10000)


def test_every_problem_is_recorded(tmp_path: Path) -> None:
    """Bad values are all reported in one pass."""
    _, problems = parse(tmp_path, """policy = opa
opa_url = ftp://opa
opa_path = secret-proxy/allow
opa_timeout = forever
opa_cache_ttl = -1s
opa_cache_size = 0
opa_token = hunter2
[secretproxy.rule:x]
path = /x
""")
    assert problems == [
        "[secretproxy] opa_url: expected an http:// or https:// URL with a host, "
        "got 'ftp://opa'",
        "[secretproxy] opa_path: expected a data path such as secretproxy/allow "
        "(identifiers separated by /), got 'secret-proxy/allow'",
        "[secretproxy] opa_timeout: expected a duration such as 250ms, 30s, 5m or 1h, "
        "got 'forever'",
        "[secretproxy] opa_token: expected a secret reference ${env:NAME} or file:/path; "
        "secrets are never written into the config itself",
        "[secretproxy] opa_cache_ttl: expected a duration such as 250ms, 30s, 5m or 1h, "
        "got '-1s'",
        "[secretproxy] opa_cache_size: expected at least 1, got '0'",
        "[secretproxy] policy: rule sections are not used with policy = opa "
        "(use policy = both to apply them too)",
    ]


@pytest.mark.parametrize(("text", "problem"), [
    ("policy = maybe\n", "[secretproxy] policy: expected one of rules, opa, both, got 'maybe'"),
    ("policy = opa\n", "[secretproxy] opa_url: is required with policy = opa"),
    ("opa_url = http://127.0.0.1:8181\n",
     "[secretproxy] opa_url: is only used with policy = opa or policy = both"),
    ("policy = both\nopa_url = http://user:pw@opa:8181\nopa_path = a\n",
     "[secretproxy] opa_url: credentials do not belong in opa_url; use opa_token"),
    ("policy = both\nopa_url = http://opa:8181/?x=1\nopa_path = a\n",
     "[secretproxy] opa_url: opa_url takes no query or fragment, got 'http://opa:8181/?x=1'"),
    ("policy = both\nopa_url = http://opa:99999\nopa_path = a\n",
     "[secretproxy] opa_url: expected a URL such as http://127.0.0.1:8181, "
     "got 'http://opa:99999'"),
    (f"policy = both\nopa_url = http://opa.internal:8181\nopa_path = a\n"
     f"opa_token = ${{env:{CANARY_ENV}}}\n",
     "[secretproxy] opa_token: a token is only sent over https:// "
     "(or http:// to a loopback address)"),
])
def test_single_problems(tmp_path: Path, text: str, problem: str) -> None:
    """Each misconfiguration names the key and what is expected."""
    _, problems = parse(tmp_path, text)
    assert problem in problems, problems


def test_a_token_over_http_to_loopback_is_fine(tmp_path: Path) -> None:
    """OPA as a sidecar on localhost needs no TLS for its token."""
    for host in ("localhost", "127.0.0.1", "[::1]"):
        _, problems = parse(tmp_path, f"policy = opa\nopa_url = http://{host}:8181\n"
                                      f"opa_path = a/b\nopa_token = ${{env:{CANARY_ENV}}}\n")
        assert problems == [], host


# -- the rules-mode Policy ---------------------------------------------------


def rules_policy(tmp_path: Path, registry: CollectorRegistry) -> Policy:
    """A Policy built from a config with two rules."""
    config, problems = parse(tmp_path, "[secretproxy.rule:no-admin]\neffect = deny\n"
                                       "path = /admin/**\n[secretproxy.rule:all]\n")
    assert problems == []
    return build_policy(config, Clock(), None, registry, "secretproxy")


def test_rules_mode_decides_synchronously(tmp_path: Path) -> None:
    """decide_now always answers; decide returns an already fired Deferred."""
    policy = rules_policy(tmp_path, CollectorRegistry())
    assert policy.decide_now(PolicyInput("a", "u", "GET", "/admin/x")) == \
        PolicyDecision(False, "no-admin", "rules")
    seen: list[Any] = []
    policy.decide(PolicyInput("a", "u", "GET", "/x")).addCallback(seen.append)
    assert seen == [PolicyDecision(True, "all", "rules")]
    assert policy.readiness() == (True, "")
    assert policy.status() == {"mode": "rules", "rules": 2}
    checked: list[Any] = []
    policy.check().addCallback(checked.append)
    assert checked == [True]


def test_rules_mode_metrics(tmp_path: Path) -> None:
    """Decisions are counted and timed; two services share the families in one registry."""
    registry = CollectorRegistry()
    policy = rules_policy(tmp_path, registry)
    other = Policy("rules", "gateway", registry, rules=RulesEngine([Rule("all")]))
    for _ in range(3):
        policy.decide_now(PolicyInput("a", "u", "GET", "/x"))
    policy.decide_now(PolicyInput("a", "u", "GET", "/admin"))
    other.decide_now(PolicyInput("a", "u", "GET", "/x"))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("appliance_policy_decisions_total", service="secretproxy",
                  decision="allow", source="rules") == 3
    assert sample("appliance_policy_decisions_total", service="secretproxy",
                  decision="deny", source="rules") == 1
    assert sample("appliance_policy_decisions_total", service="gateway",
                  decision="allow", source="rules") == 1
    assert sample("appliance_policy_decision_seconds_count", service="secretproxy",
                  source="rules") == 4
    assert sample("appliance_policy_decision_seconds_bucket", service="secretproxy",
                  source="rules", le="0.0005") == 4
    assert sample("appliance_policy_decisions_total", service="secretproxy",
                  decision="deny", source="error") == 0
    text = generate_latest(registry).decode()
    assert "# TYPE appliance_policy_decision_seconds histogram" in text
    assert "# TYPE appliance_policy_decisions_total counter" in text


def test_policy_needs_its_parts() -> None:
    """A mode without the engine it needs is a programming error."""
    registry = CollectorRegistry()
    with pytest.raises(ValueError):
        Policy("rules", "s", registry)
    with pytest.raises(ValueError):
        Policy("both", "s", registry, rules=RulesEngine([]))
    with pytest.raises(ValueError):
        Policy("sometimes", "s", registry, rules=RulesEngine([]))
