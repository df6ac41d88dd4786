"""Property tests: the rules engine agrees with a slow fnmatch reference and never raises."""

from __future__ import annotations

import fnmatch
import json
import re
import string
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from appliance.host.ini import ConfigProblem, ConfigReader, RawConfig, RawSection, RawValue
from appliance.policy import Policy, PolicyDecision, PolicyInput, Rule, RulesEngine, parse_rules
from appliance.policy.globs import HTTP_METHODS
from appliance.policy.opa import canonical_json

# -- the reference: obviously right, slow ------------------------------------

_PATH_CHARACTERS = set(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%")


def ref_normalised(path: str) -> bool:
    """The input check, written with string operations instead of regexes."""
    if not path.startswith("/") or any(char not in _PATH_CHARACTERS for char in path):
        return False
    for index, char in enumerate(path):
        escape = path[index + 1:index + 3]
        if char == "%" and (len(escape) < 2 or any(c not in string.hexdigits for c in escape)):
            return False
    lowered = path.lower()
    if "%2e" in lowered:
        return False
    pieces = re.split("/|%2f|%5c", lowered)
    return not any(piece in (".", "..") for piece in pieces)


def ref_names(patterns: tuple[str, ...] | None, value: str | None) -> bool:
    """Name globs through fnmatch."""
    if patterns is None:
        return True
    return value is not None and any(fnmatch.fnmatchcase(value, p) for p in patterns)


def ref_path(pattern: str, path: str) -> bool:
    """A path glob, segment by segment: `**` takes zero or more segments, else fnmatch."""
    wanted, segments = pattern.split("/")[1:], path.split("/")[1:]

    def match(i: int, j: int) -> bool:
        if i == len(wanted):
            return j == len(segments)
        if wanted[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(segments) + 1))
        return (j < len(segments) and fnmatch.fnmatchcase(segments[j], wanted[i])
                and match(i + 1, j + 1))

    return match(0, 0)


def reference(rules: list[Rule], i: PolicyInput) -> tuple[bool, str]:
    """First match wins, default deny, with the input check first."""
    if not ref_normalised(i.path):
        return False, "path not normalised"
    for rule in rules:
        if (ref_names(rule.identity, i.identity) and ref_names(rule.namespace, i.namespace)
                and ref_names(rule.service_account, i.service_account)
                and ref_names(rule.upstream, i.upstream)
                and (rule.method is None
                     or i.method.upper() in {m.upper() for m in rule.method})
                and (rule.path is None or any(ref_path(p, i.path) for p in rule.path))):
            return rule.allows, rule.name
    return False, "no rule matched"


# -- strategies: small alphabets so that rules often match ---------------------

names = st.sampled_from(["alice", "bob", "svc-a", "svc-b", "spiffe://p/ns/a/sa/x", "", "a"])
name_patterns = st.one_of(names.filter(bool), st.text("abcls-*?/:", min_size=1, max_size=6))
path_segments = st.sampled_from(["a", "b", "public", "admin", "x.json", "", "..", ".",
                                 "%2e", "%2F", "..%2F", "%41", "%", "a b", "\u00e9", "v1"])
paths = st.builds(lambda prefix, segs: prefix + "/".join(segs),
                  st.sampled_from(["/", "/", "/", ""]), st.lists(path_segments, max_size=5))
pattern_segments = st.sampled_from(["a", "b", "public", "*", "**", "?", "*.json", "pub*",
                                    "", "a?", "x.json", "%2F"])
path_patterns = st.builds(lambda segs, tail: "/" + "/".join(segs) + tail,
                          st.lists(pattern_segments, min_size=1, max_size=3),
                          st.sampled_from(["", "", "/**", "/*"]))
methods = st.sampled_from(["GET", "get", "Post", "DELETE", "patch", "BREW"])


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly None (the matcher is absent), else a short list."""
    return st.one_of(st.none(), st.none(), st.none(),
                     st.lists(strategy, min_size=1, max_size=3))


rules_strategy = st.lists(
    st.builds(Rule, name=st.sampled_from(["r1", "r2", "r3", "r4"]),
              effect=st.sampled_from(["allow", "deny"]), identity=maybe(name_patterns),
              namespace=maybe(name_patterns), service_account=maybe(name_patterns),
              upstream=maybe(name_patterns),
              method=maybe(st.sampled_from(sorted(HTTP_METHODS) + ["get", "Post"])),
              path=st.none() | st.lists(path_patterns, min_size=1, max_size=3)),
    max_size=6)
random_inputs = st.builds(PolicyInput, identity=names, upstream=names, method=methods,
                          path=paths, namespace=st.none() | names,
                          service_account=st.none() | names)


def fill(draw: Any, pattern: str, star: st.SearchStrategy[str]) -> str:
    """A string the glob matches: each `*` and `?` replaced with drawn text."""
    return "".join(draw(star) if c == "*" else draw(st.sampled_from("ab.-")) if c == "?"
                   else c for c in pattern)


@st.composite
def near(draw: Any, rules: list[Rule]) -> PolicyInput:
    """An input built from one rule's patterns (so it likely matches), maybe nudged off."""
    rule = draw(st.sampled_from(rules))

    def name(patterns: tuple[str, ...] | None) -> str | None:
        if patterns is None:
            return draw(st.none() | names)
        return fill(draw, draw(st.sampled_from(patterns)), st.text("ab/-", max_size=3))

    path = "/x"
    if rule.path is not None:
        segments = []
        for segment in draw(st.sampled_from(rule.path)).split("/")[1:]:
            if segment == "**":
                segments += draw(st.lists(st.sampled_from(["a", "b", "x.json", ""]),
                                          max_size=2))
            else:
                segments.append(fill(draw, segment, st.text("ab.", max_size=3)))
        path = "/" + "/".join(segments)
        nudge = draw(st.sampled_from(["none", "none", "drop", "extend", "grow"]))
        if nudge == "drop":
            path = path.rsplit("/", 1)[0] or "/"
        elif nudge == "extend":
            path += "/" + draw(st.sampled_from(["a", "", "x.json"]))
        elif nudge == "grow":
            path += "x"
    method = draw(st.sampled_from(rule.method) if rule.method else methods)
    return PolicyInput(name(rule.identity) or "", name(rule.upstream) or "",
                       draw(st.sampled_from([method, method.lower(), "PUT"])), path,
                       name(rule.namespace), name(rule.service_account))


@settings(max_examples=300, deadline=None)
@given(st.data(), rules_strategy, st.integers(1, 3))
def test_evaluate_agrees_with_the_reference(data: Any, rules: list[Rule],
                                            max_plans: int) -> None:
    """Same decision as the fnmatch reference for every input, through a tiny plan table."""
    questions = data.draw(st.lists(near(rules) | random_inputs if rules else random_inputs,
                                   min_size=1, max_size=12))
    engine = RulesEngine(rules, max_plans=max_plans)
    for question in questions * 2:  # the second round is served from plans
        decision = engine.evaluate(question)
        assert (decision.allowed, decision.reason) == reference(rules, question), question
        assert decision.source == "rules"


any_text = st.text(max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.builds(PolicyInput, identity=any_text, upstream=any_text, method=any_text,
                 path=any_text, namespace=st.none() | any_text,
                 service_account=st.none() | any_text,
                 attributes=st.dictionaries(any_text, any_text, max_size=3)))
def test_random_inputs_never_raise(question: PolicyInput) -> None:
    """Any strings at all: a decision comes back, and the OPA document serialises."""
    rules = [Rule("public", path=["/public/**"]), Rule("svc", identity=["svc-*"], method=["get"]),
             Rule("deny-all", effect="deny")]
    policy = Policy("rules", "props", CollectorRegistry(), rules=RulesEngine(rules))
    decision = policy.decide_now(question)
    assert isinstance(decision, PolicyDecision)
    key = canonical_json(question)
    assert key == json.dumps(question.as_document(), sort_keys=True, separators=(",", ":"))
    assert key.isascii() and json.loads(key) == question.as_document()


rule_keys = st.sampled_from(["effect", "identity", "namespace", "service_account", "upstream",
                             "method", "path", "other"])
rule_values = st.text("ab/*?[]{},\n -.GETpost%", max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text("ab-_.!", min_size=0, max_size=5),
                          st.dictionaries(rule_keys, rule_values, max_size=4)), max_size=4))
def test_parse_rules_never_raises_and_what_parses_loads(
        sections: list[tuple[str, dict[str, str]]]) -> None:
    """Random rule sections: problems are recorded, and every rule accepted compiles."""
    raw = RawConfig(main_file="t.ini")
    raw.sections["svc"] = RawSection(name="svc", file="t.ini")
    for label, values in sections:
        name = f"svc.rule:{label}"
        raw.sections[name] = RawSection(
            name=name, file="t.ini",
            values={k: RawValue(text=v, file="t.ini") for k, v in values.items()})
    problems: list[ConfigProblem] = []
    reader = ConfigReader(raw, problems)
    rules = parse_rules(reader.section("svc"))
    reader.finish()
    RulesEngine(rules).evaluate(PolicyInput("a", "b", "GET", "/a"))
    labels = {label for label, _ in sections}
    assert {rule.name for rule in rules} <= labels
