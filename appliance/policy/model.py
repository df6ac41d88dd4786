"""
The question a policy answers and its answer: L{PolicyInput} and
L{PolicyDecision}, plus the fixed decisions every engine shares.

Reasons are short fixed strings or rule names, never request data: a
decision may be logged, audited or counted, and a path or identity could
carry a secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

SOURCES = ("rules", "opa", "cache", "error")
"""Where a decision came from: the builtin rules, OPA, OPA's cached answer, a failure."""

_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


@frozen
class PolicyInput:
    """
    May C{identity} reach C{upstream} with C{method} on C{path}?

    @ivar identity: the authenticated caller (a SPIFFE ID, a user name, ...).
    @ivar upstream: the configured name of the upstream being reached.
    @ivar method: the HTTP method; matched case-insensitively.
    @ivar path: the request path B{as the upstream receives it}, already
        normalised by the caller (percent-decoding of unreserved characters,
        dot segments resolved), without the query string. The policy never
        decodes it again: deciding on one form and forwarding another is how
        C{/public/..%2Fadmin} gets past a C{/public/**} rule.
    @ivar namespace: the caller's namespace, if the identity has one.
    @ivar service_account: the caller's service account, if any.
    @ivar attributes: extra facts for OPA (the builtin rules ignore them).
    """

    identity: str
    upstream: str
    method: str
    path: str
    namespace: str | None = None
    service_account: str | None = None
    attributes: Mapping[str, str] = field(default=_NO_ATTRIBUTES)

    def as_document(self) -> dict[str, Any]:
        """
        The JSON input document sent to OPA (C{{"input": <this>}}).
        """
        return {
            "identity": self.identity,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "upstream": self.upstream,
            "method": self.method,
            "path": self.path,
            "attributes": dict(self.attributes),
        }


@frozen
class PolicyDecision:
    """
    The answer: allowed or not, a short fixed reason, and its source.

    @ivar allowed: whether the request may go ahead.
    @ivar reason: a rule name or a fixed string such as C{"no rule matched"};
        never request data.
    @ivar source: one of L{SOURCES}.
    """

    allowed: bool
    reason: str
    source: str


NO_RULE_MATCHED = PolicyDecision(False, "no rule matched", "rules")
"""The builtin engine's default: deny."""

PATH_NOT_NORMALISED = PolicyDecision(False, "path not normalised", "rules")
"""The input check refused a path no normaliser would produce."""

UNAVAILABLE = PolicyDecision(False, "policy unavailable", "error")
"""OPA could not answer (timeout, error, garbage, circuit open): fail closed."""


# The characters RFC 3986 allows in a path (non-ASCII and spaces must be
# percent-encoded), then what a normaliser never leaves behind: a "." or
# ".." segment, also one hidden behind an encoded slash or backslash
# ("/public/..%2Fadmin": an upstream that decodes %2F sees "/admin"), an
# encoded dot ("%2e": a normaliser decodes encoded unreserved characters)
# and a "%" that does not start an escape.
_PATH_CHARS = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*").fullmatch
_NOT_NORMALISED = re.compile(
    r"(?:/|%2[fF]|%5[cC])\.\.?(?:/|%2[fF]|%5[cC]|$)|%2[eE]|%(?![0-9A-Fa-f]{2})"
).search


def path_is_normalised(path: str) -> bool:
    """
    Whether C{path} could be the output of a normaliser (see L{PolicyInput}).

    A defence in depth only: the caller must still decide on the very path
    it forwards.
    """
    return _PATH_CHARS(path) is not None and not (
        ("/." in path or "%" in path) and _NOT_NORMALISED(path) is not None)
