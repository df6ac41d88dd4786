"""
The builtin rules engine: an ordered table of allow/deny rules, first match
wins, default deny.

Rules come from C{[<service>.rule:<name>]} sections (L{parse_rules}). The
engine is built for a proxy's hot path:

 - every matcher is compiled to a regular expression once, at load;
 - the rules that can apply to one caller (identity, namespace, service
   account, upstream, method) form a I{plan}, computed on first sight of that
   caller and kept in a bounded table; a plan's path patterns are joined into
   one regular expression whose alternatives keep the rule order, so a
   request costs one dict lookup and one C{fullmatch}, whatever the size of
   the table;
 - every rule owns its L{PolicyDecision}, so evaluating allocates nothing
   but the plan key and the match object.

Paths are keyed out of the plan table on purpose: they carry ids, so a
decision cache keyed on them would churn (and could be flushed by anyone
sending random paths), while callers are few.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from attrs import field, frozen

from appliance.host.ini import INVALID, Section
from appliance.host.values import one_of, parse_list
from appliance.policy.globs import check_method, name_glob_regex, path_glob_regex
from appliance.policy.model import (
    NO_RULE_MATCHED,
    PATH_NOT_NORMALISED,
    PolicyDecision,
    PolicyInput,
    path_is_normalised,
)

RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A rule name: it becomes the decision's reason, so it stays short and plain."""

_Patterns = tuple[str, ...] | None


def _patterns(value: Any) -> _Patterns:
    return None if value is None else tuple(value)


@frozen
class Rule:
    """
    One row of the table. A matcher left as None matches anything; a
    matcher never matches a missing namespace or service account.

    @ivar name: the rule's label, used as the decision's reason.
    @ivar effect: C{"allow"} or C{"deny"}.
    @ivar identity: name globs for L{PolicyInput.identity}.
    @ivar namespace: name globs for L{PolicyInput.namespace}.
    @ivar service_account: name globs for L{PolicyInput.service_account}.
    @ivar upstream: name globs for L{PolicyInput.upstream}.
    @ivar method: HTTP methods, any case.
    @ivar path: path globs (C{*} within a segment, C{**} across segments).
    """

    name: str
    effect: str = "allow"
    identity: _Patterns = field(default=None, converter=_patterns)
    namespace: _Patterns = field(default=None, converter=_patterns)
    service_account: _Patterns = field(default=None, converter=_patterns)
    upstream: _Patterns = field(default=None, converter=_patterns)
    method: _Patterns = field(default=None, converter=_patterns)
    path: _Patterns = field(default=None, converter=_patterns)

    @property
    def allows(self) -> bool:
        """Whether a match allows the request."""
        return self.effect == "allow"


_NameMatcher = Callable[[str], Any] | None


def _name_matcher(patterns: _Patterns) -> _NameMatcher:
    if patterns is None:
        return None
    regex = "|".join(f"(?:{name_glob_regex(p)})" for p in patterns)
    return re.compile(regex, re.DOTALL).fullmatch


class _Compiled:
    """A rule with its matchers compiled and its decision built."""

    __slots__ = ("decision", "identity", "methods", "namespace", "path", "service_account",
                 "upstream")

    def __init__(self, rule: Rule) -> None:
        if rule.effect not in ("allow", "deny"):
            raise ValueError(f"rule {rule.name}: effect must be allow or deny")
        self.decision = PolicyDecision(rule.allows, rule.name, "rules")
        self.identity = _name_matcher(rule.identity)
        self.namespace = _name_matcher(rule.namespace)
        self.service_account = _name_matcher(rule.service_account)
        self.upstream = _name_matcher(rule.upstream)
        self.methods = (None if rule.method is None
                        else frozenset(check_method(m) for m in rule.method))
        self.path = (None if rule.path is None
                     else "|".join(f"(?:{path_glob_regex(p)})" for p in rule.path))

    def applies_to(self, identity: str, namespace: str | None, service_account: str | None,
                   upstream: str, method: str) -> bool:
        """Whether every matcher but the path's accepts this caller."""
        return (
            _accepts(self.identity, identity)
            and _accepts(self.namespace, namespace)
            and _accepts(self.service_account, service_account)
            and _accepts(self.upstream, upstream)
            and (self.methods is None or method.upper() in self.methods)
        )


def _accepts(matcher: _NameMatcher, value: str | None) -> bool:
    if matcher is None:
        return True
    return value is not None and matcher(value) is not None


_Plan = tuple[Callable[[str], Any] | None, tuple[PolicyDecision, ...], PolicyDecision]
"""(fullmatch of the joined path patterns, decision per alternative, fallback)."""


class RulesEngine:
    """
    Evaluates a rule table: first match wins, default deny. See the module
    docstring for how it stays fast.
    """

    def __init__(self, rules: Iterable[Rule], max_plans: int = 4096) -> None:
        """
        @param rules: the table, in order; a bad pattern raises L{ValueError}
            (L{parse_rules} reports those as config problems first).
        @param max_plans: how many callers' plans to keep (the oldest goes).
        """
        if max_plans < 1:
            raise ValueError("max_plans must be at least 1")
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._compiled = tuple(_Compiled(rule) for rule in self.rules)
        self._max_plans = max_plans
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._joined: dict[tuple[int, ...], Callable[[str], Any]] = {}

    def __len__(self) -> int:
        """The number of rules."""
        return len(self.rules)

    @property
    def plans(self) -> int:
        """How many callers' plans are kept now."""
        return len(self._plans)

    def evaluate(self, input: PolicyInput) -> PolicyDecision:
        """
        The decision of the first rule matching C{input}, or
        L{NO_RULE_MATCHED}. A path no normaliser would produce (dot
        segments, C{%2e}, characters a URI path cannot hold) is refused
        with L{PATH_NOT_NORMALISED} before any rule is tried.
        """
        path = input.path
        if not path_is_normalised(path):
            return PATH_NOT_NORMALISED
        key = (input.identity, input.namespace, input.service_account, input.upstream,
               input.method)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(key)
        match, decisions, otherwise = plan
        if match is not None:
            found = match(path)
            if found is not None:
                return decisions[found.lastindex - 1]
        return otherwise

    def _plan(self, key: tuple[Any, ...]) -> _Plan:
        steps: list[int] = []
        otherwise = NO_RULE_MATCHED
        for index, rule in enumerate(self._compiled):
            if not rule.applies_to(*key):
                continue
            if rule.path is None:
                otherwise = rule.decision
                break
            steps.append(index)
        plan: _Plan = (self._join(tuple(steps)) if steps else None,
                       tuple(self._compiled[i].decision for i in steps), otherwise)
        if len(self._plans) >= self._max_plans:
            del self._plans[next(iter(self._plans))]
        self._plans[key] = plan
        return plan

    def _join(self, steps: tuple[int, ...]) -> Callable[[str], Any]:
        # Alternatives are tried left to right, so the first rule whose
        # path matches wins; each is one capturing group, whose number
        # (lastindex) says which rule it was.
        joined = self._joined.get(steps)
        if joined is None:
            regex = "|".join(f"({self._compiled[i].path})" for i in steps)
            joined = re.compile(regex, re.DOTALL).fullmatch
            if len(self._joined) >= self._max_plans:
                self._joined.clear()
            self._joined[steps] = joined
        return joined


def _name_globs(text: str) -> tuple[str, ...]:
    items = parse_list(text)
    if not items:
        raise ValueError("needs at least one pattern (leave the key out to match anything)")
    for item in items:
        name_glob_regex(item)
    return items


def _path_globs(text: str) -> tuple[str, ...]:
    items = parse_list(text)
    if not items:
        raise ValueError("needs at least one pattern (leave the key out to match any path)")
    for item in items:
        path_glob_regex(item)
    return items


def _methods(text: str) -> tuple[str, ...]:
    items = parse_list(text)
    if not items:
        raise ValueError("needs at least one method (leave the key out to match any)")
    return tuple(dict.fromkeys(check_method(item) for item in items))


_MATCHERS: tuple[tuple[str, Callable[[str], tuple[str, ...]]], ...] = (
    ("identity", _name_globs),
    ("namespace", _name_globs),
    ("service_account", _name_globs),
    ("upstream", _name_globs),
    ("method", _methods),
    ("path", _path_globs),
)


def parse_rules(section: Section) -> tuple[Rule, ...]:
    """
    Read every C{[<section>.rule:<name>]} section, in file order.

    Problems (a bad effect, an unsupported glob, an unknown method, a bad
    rule name) are recorded on the rule's section; rules with problems are
    left out of the result (the config is refused anyway).
    """
    rules: list[Rule] = []
    for label, child in section.children("rule"):
        ok = True
        if RULE_NAME.fullmatch(label) is None:
            child.problem(None, "a rule name is 1-64 letters, digits, '_', '.' or '-'")
            ok = False
        effect = child.get("effect", one_of("allow", "deny"), "allow")
        matchers = {key: child.get(key, convert, None) for key, convert in _MATCHERS}
        if effect is INVALID or any(value is INVALID for value in matchers.values()):
            ok = False
        if ok:
            rules.append(Rule(name=label, effect=effect, **matchers))
    return tuple(rules)
