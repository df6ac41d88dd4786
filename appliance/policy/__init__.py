"""
The access policy shared by the secret-injecting proxy and the routing
gateway: may this caller reach this upstream with this method and path?

A builtin rules engine (ordered allow/deny rules, first match wins, default
deny), a fail-closed OPA client, and L{Policy}, which combines them as the
config says. See C{docs/policy.md}.
"""

from appliance.policy.config import (
    MODES,
    OPAConfig,
    PolicyConfig,
    parse_opa_path,
    parse_opa_url,
    parse_policy,
)
from appliance.policy.decider import Policy, build_policy
from appliance.policy.model import (
    NO_RULE_MATCHED,
    PATH_NOT_NORMALISED,
    UNAVAILABLE,
    PolicyDecision,
    PolicyInput,
    path_is_normalised,
)
from appliance.policy.opa import OPAClient, OPAError
from appliance.policy.rules import Rule, RulesEngine, parse_rules

__all__ = [
    "MODES",
    "NO_RULE_MATCHED",
    "OPAClient",
    "OPAConfig",
    "OPAError",
    "PATH_NOT_NORMALISED",
    "Policy",
    "PolicyConfig",
    "PolicyDecision",
    "PolicyInput",
    "Rule",
    "RulesEngine",
    "UNAVAILABLE",
    "build_policy",
    "parse_opa_path",
    "parse_opa_url",
    "parse_policy",
    "parse_rules",
    "path_is_normalised",
]
