"""
The resilience kit every service builds on: circuit breakers, rate
limiters (in memory and in Redis), retries, bulkheads, caches and
deadlines.

Everything takes an injected clock (an L{IReactorTime}) and an optional
Prometheus registry; nothing imports the global reactor. See
C{docs/resilience.md}.
"""

from appliance.resilience.breaker import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Ticket,
)
from appliance.resilience.bulkhead import Bulkhead, BulkheadFull, BulkheadTimeout, Permit
from appliance.resilience.cache import TTLCache
from appliance.resilience.deadline import Deadline, DeadlineExceeded
from appliance.resilience.ratelimit import (
    Decision,
    Limiter,
    Quota,
    Rate,
    parse_rate,
    rate_limit_headers,
)
from appliance.resilience.ratelimit_memory import MemoryLimiter
from appliance.resilience.ratelimit_redis import RedisLimiter
from appliance.resilience.retry import RetryPolicy, retry, retry_on_types

__all__ = [
    "BreakerPolicy",
    "BreakerState",
    "Bulkhead",
    "BulkheadFull",
    "BulkheadTimeout",
    "CircuitBreaker",
    "CircuitOpen",
    "Deadline",
    "DeadlineExceeded",
    "Decision",
    "Limiter",
    "MemoryLimiter",
    "Permit",
    "Quota",
    "Rate",
    "RedisLimiter",
    "RetryPolicy",
    "TTLCache",
    "Ticket",
    "parse_rate",
    "rate_limit_headers",
    "retry",
    "retry_on_types",
]
