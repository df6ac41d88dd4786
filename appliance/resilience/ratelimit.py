"""
Rate limiting: the shared vocabulary.

 - L{Rate}: C{limit} units per C{period} seconds, parsed from ini text
   such as C{100/s}, C{6000/m} or C{10/1s} by L{parse_rate}.
 - L{Quota}: an algorithm (C{token_bucket} or C{gcra}), a L{Rate} and a
   C{burst}: the bucket holds up to C{burst} units and refills at the rate.
   Both algorithms admit the same traffic: at most
   M{burst + rate * elapsed} units over any stretch of time.
 - L{Decision}: the answer for one request, with everything needed for
   C{Retry-After} and the IETF C{RateLimit} / C{RateLimit-Policy} fields
   (L{rate_limit_headers}).
 - L{Limiter}: what both limiters offer, C{acquire(key, cost)}.

The limiters live in L{appliance.resilience.ratelimit_memory} (one
process) and L{appliance.resilience.ratelimit_redis} (shared by every
appliance using the same Redis).
"""

from __future__ import annotations

import math
import re
from typing import Literal, Protocol

from attrs import field, frozen, validators
from twisted.internet.defer import Deferred

Algorithm = Literal["token_bucket", "gcra"]
"""The two limiting algorithms."""

ALGORITHMS: tuple[Algorithm, ...] = ("token_bucket", "gcra")

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*$", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DISPLAY_UNITS = sorted(_UNITS.items(), key=lambda item: -item[1])
_POLICY_NAME = re.compile(r"^[\x20-\x7e]+$")


@frozen
class Rate:
    """
    C{limit} units per C{period} seconds.
    """

    limit: int = field(validator=validators.gt(0))
    period: float = field(validator=validators.gt(0))

    @property
    def per_second(self) -> float:
        """Units per second."""
        return self.limit / self.period

    def __str__(self) -> str:
        """The ini form, e.g. C{100/s}, C{6000/m} or C{5/500ms}."""
        for unit, scale in _DISPLAY_UNITS:
            count = self.period / scale
            if count >= 1 and abs(count - round(count)) < 1e-9 * count:
                return f"{self.limit}/{'' if round(count) == 1 else round(count)}{unit}"
        millis = f"{self.period * 1000:.6f}".rstrip("0").rstrip(".")
        return f"{self.limit}/{millis}ms"


def parse_rate(text: str) -> Rate:
    """
    Parse C{100/s}, C{6000/m}, C{10/1s} or C{5/500ms} (units ms, s, m, h, d).

    @raise ValueError: saying what was expected, for the config reader.
    """
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is not None:
        count = float(match.group(2)) if match.group(2) is not None else 1.0
        limit, period = int(match.group(1)), count * _UNITS[match.group(3)]
        if limit > 0 and 0 < period < math.inf:
            return Rate(limit, period)
    raise ValueError(f"expected a rate such as 100/s, 6000/m or 10/1s, got {text!r}")


@frozen
class Quota:
    """
    What a limiter enforces per key.

    @ivar algorithm: C{"token_bucket"} or C{"gcra"}.
    @ivar rate: the sustained rate.
    @ivar burst: the most units admitted at once (default: C{rate.limit}).
    """

    algorithm: Algorithm = field(validator=validators.in_(ALGORITHMS))
    rate: Rate
    burst: int = field(default=0, validator=validators.ge(0))

    def __attrs_post_init__(self) -> None:
        """Default the burst to the rate's limit."""
        if self.burst == 0:
            object.__setattr__(self, "burst", self.rate.limit)

    @property
    def interval(self) -> float:
        """Seconds to earn one unit back."""
        return self.rate.period / self.rate.limit

    @property
    def window(self) -> float:
        """Seconds for an empty bucket to fill up (C{burst * interval})."""
        return self.burst * self.interval

    def check_cost(self, cost: int) -> None:
        """
        @raise ValueError: unless M{0 <= cost <= burst} (a bigger request
            could never be admitted).
        """
        if not 0 <= cost <= self.burst:
            raise ValueError(f"cost {cost} is outside 0..{self.burst} (the burst)")


@frozen
class Decision:
    """
    The answer to one C{acquire}.

    @ivar allowed: whether the request may proceed.
    @ivar remaining: whole units left after this request.
    @ivar retry_after: seconds until this request would be admitted
        (0 when allowed).
    @ivar reset: seconds until the bucket is full again.
    @ivar limit: the quota (the burst).
    @ivar window: seconds in which the quota refills completely.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset: float
    limit: int
    window: float


def rate_limit_headers(decision: Decision, policy: str = "default") -> dict[str, str]:
    """
    HTTP response fields for C{decision}: C{RateLimit-Policy} and
    C{RateLimit} as in draft-ietf-httpapi-ratelimit-headers (C{q}, C{w};
    C{r}, C{t}), plus C{Retry-After} when the request was denied. Seconds
    are rounded up, so a client that waits never comes back too early.

    @param policy: the policy name, a fixed printable-ASCII string.
    """
    if not _POLICY_NAME.match(policy):
        raise ValueError("a policy name must be printable ASCII")
    name = '"' + policy.replace("\\", "\\\\").replace('"', '\\"') + '"'
    headers = {
        "RateLimit-Policy": f"{name};q={decision.limit};w={max(1, math.ceil(decision.window))}",
        "RateLimit": f"{name};r={decision.remaining};t={math.ceil(decision.reset)}",
    }
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
    return headers


class Limiter(Protocol):
    """What every limiter offers."""

    name: str
    quota: Quota

    def acquire(self, key: str, cost: int = 1) -> Deferred[Decision]:
        """Take C{cost} units from C{key}'s bucket, if it has them."""
