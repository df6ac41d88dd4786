"""Tests for the builtin rules engine: globs, order, deny rules, default deny, rule sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.host.ini import ConfigProblem, ConfigReader, read_ini
from appliance.policy import (
    NO_RULE_MATCHED,
    PATH_NOT_NORMALISED,
    PolicyDecision,
    PolicyInput,
    Rule,
    RulesEngine,
    parse_rules,
    path_is_normalised,
)


def ask(rules: list[Rule], path: str = "/", identity: str = "svc-a", upstream: str = "stripe",
        method: str = "GET", **more: Any) -> PolicyDecision:
    """Evaluate one input against a fresh engine."""
    return RulesEngine(rules).evaluate(PolicyInput(identity, upstream, method, path, **more))


def allowed(rules: list[Rule], path: str = "/", **input: Any) -> bool:
    """Whether the table allows the input."""
    return ask(rules, path, **input).allowed


def test_single_star_matches_within_one_segment() -> None:
    """`*` matches one segment's characters (possibly none), never a slash."""
    rules = [Rule("charges", path=["/v1/charges/*"])]
    assert allowed(rules, "/v1/charges/ch_123")
    assert allowed(rules, "/v1/charges/")  # an empty last segment is still one segment
    assert not allowed(rules, "/v1/charges/ch_123/refunds")
    assert not allowed(rules, "/v1/charges")
    assert not allowed(rules, "/v1/chargesX/1")


def test_double_star_matches_across_segments() -> None:
    """`/public/**` covers /public and everything below it, not its siblings."""
    rules = [Rule("public", path=["/public/**"])]
    for path in ("/public", "/public/", "/public/a", "/public/a/b/c.txt"):
        assert allowed(rules, path), path
    for path in ("/publicity", "/public-x/a", "/", "/admin", "/x/public/a"):
        assert not allowed(rules, path), path


def test_double_star_in_the_middle_and_alone() -> None:
    """A middle `**` stands for zero or more whole segments; `/**` matches every path."""
    rules = [Rule("deep", path=["/a/**/z"])]
    for path in ("/a/z", "/a/b/z", "/a/b/c/z"):
        assert allowed(rules, path), path
    for path in ("/a/b/zz", "/az", "/a/z/b", "/ab/z"):
        assert not allowed(rules, path), path
    assert allowed([Rule("all", path=["/**"])], "/anything/at/all")


def test_question_mark_and_star_inside_a_segment() -> None:
    """`?` is one character of a segment; `*` may sit inside a segment."""
    rules = [Rule("json", path=["/files/*.json", "/v?/status"])]
    assert allowed(rules, "/files/report.json")
    assert not allowed(rules, "/files/report.xml")
    assert not allowed(rules, "/files/a/report.json")
    assert allowed(rules, "/v1/status") and allowed(rules, "/v2/status")
    assert not allowed(rules, "/v10/status") and not allowed(rules, "/v/status")
    assert not allowed(rules, "/v//status")


def test_first_match_wins_in_file_order() -> None:
    """A deny above an allow wins for what it covers; the allow still covers the rest."""
    rules = [Rule("no-admin", effect="deny", path=["/v1/admin/**"]),
             Rule("v1", path=["/v1/**"])]
    assert ask(rules, "/v1/admin/users") == PolicyDecision(False, "no-admin", "rules")
    assert ask(rules, "/v1/charges") == PolicyDecision(True, "v1", "rules")
    reversed_rules = list(reversed(rules))
    assert ask(reversed_rules, "/v1/admin/users") == PolicyDecision(True, "v1", "rules")


def test_default_deny() -> None:
    """No rule, or no matching rule, denies with a fixed reason."""
    assert ask([]) is NO_RULE_MATCHED
    assert ask([Rule("other", upstream=["github"])]) is NO_RULE_MATCHED
    assert NO_RULE_MATCHED == PolicyDecision(False, "no rule matched", "rules")


def test_a_rule_without_matchers_matches_everything() -> None:
    """A catch-all deny ends the table; rules after it never apply."""
    rules = [Rule("read", method=["GET"]), Rule("rest", effect="deny"), Rule("never")]
    assert ask(rules, method="GET").reason == "read"
    assert ask(rules, method="POST") == PolicyDecision(False, "rest", "rules")


def test_methods_are_case_insensitive() -> None:
    """A rule's methods match the input's method in any case."""
    rules = [Rule("read", method=["get", "Head"])]
    for method in ("GET", "get", "Get", "HEAD", "head"):
        assert allowed(rules, method=method), method
    assert not allowed(rules, method="POST")
    assert not allowed(rules, method="GETX")


def test_name_globs_on_identity_namespace_service_account_upstream() -> None:
    """Name globs: `*` spans any characters, `/` included; matching is case-sensitive."""
    rules = [Rule("api", identity=["spiffe://prod/ns/*/sa/api"], upstream=["stripe*"]),
             Rule("team", namespace=["payments-*"], service_account=["worker", "cron?"])]
    assert allowed(rules, identity="spiffe://prod/ns/payments/sa/api", upstream="stripe-eu")
    assert not allowed(rules, identity="spiffe://prod/ns/payments/sa/api", upstream="github")
    assert not allowed(rules, identity="spiffe://prod/ns/payments/sa/API", upstream="stripe")
    assert allowed(rules, namespace="payments-eu", service_account="cron1")
    assert not allowed(rules, namespace="payments-eu", service_account="cron12")
    assert not allowed(rules, namespace="billing", service_account="worker")


def test_a_matcher_never_matches_a_missing_value() -> None:
    """`namespace = *` needs a namespace; a rule without the key matches None too."""
    assert not allowed([Rule("ns", namespace=["*"])], namespace=None)
    assert allowed([Rule("ns", namespace=["*"])], namespace="")
    assert allowed([Rule("any", upstream=["stripe"])], namespace=None, service_account=None)


def test_normalisation_pitfall_relies_on_normalised_input() -> None:
    """
    The caller normalises `/public/..%2Fadmin` to `/admin` and asks about that:
    `/public/**` must not allow it. Forms no normaliser would produce are refused.
    """
    rules = [Rule("public", path=["/public/**"])]
    assert ask(rules, "/admin") is NO_RULE_MATCHED
    for raw in ("/public/..%2Fadmin", "/public/../admin", "/public/%2e%2e/admin",
                "/public/%2E%2E/admin", "/public/./x", "/public/.%2fx", "/public/..%5Cadmin",
                "public/x", "", "/public/a b", "/public/%zz", "/public/x?y=1", "/public/\u00e9"):
        assert ask(rules, raw) is PATH_NOT_NORMALISED, raw
    # Encoded slashes that hide no dot segment are data, as in GitLab project ids.
    assert allowed(rules, "/public/group%2Fproject")
    assert path_is_normalised("/public/.well-known/x") and path_is_normalised("/a/..b")


def test_decisions_are_shared_objects() -> None:
    """Evaluating allocates no decision: each rule owns one."""
    engine = RulesEngine([Rule("public", path=["/public/**"])])
    first = engine.evaluate(PolicyInput("a", "u", "GET", "/public/1"))
    assert engine.evaluate(PolicyInput("b", "u", "GET", "/public/2")) is first


def test_plan_table_is_bounded() -> None:
    """Plans per caller are kept up to max_plans; evicted callers are re-planned correctly."""
    engine = RulesEngine([Rule("a", identity=["a*"], path=["/x/*"]), Rule("b", identity=["b*"])],
                         max_plans=2)
    for round_ in range(3):
        for name in ("a1", "a2", "b1", "c1"):
            decision = engine.evaluate(PolicyInput(name, "u", "GET", "/x/1"))
            expected = {"a": "a", "b": "b"}.get(name[0], "no rule matched")
            assert decision.reason == expected, (round_, name)
            assert engine.plans <= 2
    with pytest.raises(ValueError):
        RulesEngine([], max_plans=0)


@pytest.mark.parametrize("rule", [
    Rule("x", path=["no-slash"]),
    Rule("x", path=["/a**"]),
    Rule("x", path=["/a/../b"]),
    Rule("x", identity=["[abc]"]),
    Rule("x", upstream=["a{b,c}"]),
    Rule("x", identity=["a b"]),
    Rule("x", method=["FETCH"]),
    Rule("x", effect="maybe"),
    Rule("x", identity=[""]),
])
def test_bad_rules_are_refused(rule: Rule) -> None:
    """An unsupported glob, unknown method or effect raises ValueError at load."""
    with pytest.raises(ValueError):
        RulesEngine([rule])


# -- rule sections -------------------------------------------------------------


def read(tmp_path: Path, text: str) -> tuple[tuple[Rule, ...], list[str]]:
    """Parse the [secretproxy] rules of an ini text; return the rules and the problems."""
    path = tmp_path / "a.ini"
    path.write_text(text)
    problems: list[ConfigProblem] = []
    reader = ConfigReader(read_ini(str(path), problems), problems)
    rules = parse_rules(reader.section("secretproxy"))
    reader.finish()
    return rules, [str(p).split(": ", 1)[1] for p in problems]


def test_rule_sections_are_read_in_file_order(tmp_path: Path) -> None:
    """Every key is read; lists take commas or newlines; methods are upper-cased."""
    rules, problems = read(tmp_path, """
[secretproxy]
[secretproxy.rule:no-admin]
effect = deny
path = /v1/admin/**
[secretproxy.rule:charges]
identity = spiffe://prod/ns/payments/sa/*
namespace = payments, payments-*
service_account = api
upstream = stripe
method = get, Post
path =
    /v1/charges/*
    /v1/charges/*/refunds
[secretproxy.rule:health]
path = /healthz
""")
    assert problems == []
    assert [r.name for r in rules] == ["no-admin", "charges", "health"]
    assert rules[0] == Rule("no-admin", effect="deny", path=["/v1/admin/**"])
    assert rules[1] == Rule("charges", "allow", identity=["spiffe://prod/ns/payments/sa/*"],
                            namespace=["payments", "payments-*"], service_account=["api"],
                            upstream=["stripe"], method=["GET", "POST"],
                            path=["/v1/charges/*", "/v1/charges/*/refunds"])
    engine = RulesEngine(rules)
    assert engine.evaluate(PolicyInput("spiffe://prod/ns/payments/sa/api", "stripe", "post",
                                       "/v1/charges/ch_1/refunds", "payments-eu", "api")
                           ).reason == "charges"


def test_every_rule_problem_is_recorded(tmp_path: Path) -> None:
    """Bad values are recorded per rule and key; rules with problems are left out."""
    rules, problems = read(tmp_path, """
[secretproxy]
[secretproxy.rule:bad-effect]
effect = permit
[secretproxy.rule:bad-glob]
identity = svc-[ab]
path = /v1/**x
[secretproxy.rule:bad-method]
method = GET, FETCH
[secretproxy.rule:empty]
upstream = ,
[secretproxy.rule:bad name!]
[secretproxy.rule:typo]
paths = /x
[secretproxy.rule:fine]
path = /ok
""")
    assert [r.name for r in rules] == ["typo", "fine"]
    assert problems == [
        "[secretproxy.rule:bad-effect] effect: expected one of allow, deny, got 'permit'",
        "[secretproxy.rule:bad-glob] identity: 'svc-[ab]': '[' is not supported "
        "(only * and ? are wildcards)",
        "[secretproxy.rule:bad-glob] path: '/v1/**x': ** must be a whole path segment",
        "[secretproxy.rule:bad-method] method: unknown method 'FETCH' (expected CONNECT, "
        "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE)",
        "[secretproxy.rule:empty] upstream: needs at least one pattern "
        "(leave the key out to match anything)",
        "[secretproxy.rule:bad name!]: a rule name is 1-64 letters, digits, '_', '.' or '-'",
        "[secretproxy.rule:typo] paths: unknown key",
    ]


def test_rules_of_other_services_are_not_read(tmp_path: Path) -> None:
    """Only [<section>.rule:*] children belong to a section."""
    rules, problems = read(tmp_path, "[secretproxy]\n[gateway.rule:x]\npath = /x\n"
                           "[secretproxy.rule:y]\npath = /y\n")
    assert [r.name for r in rules] == ["y"]
    assert problems == ["[gateway.rule:x]: unknown section"]
