"""
The rate limiting algorithms as Redis Lua scripts, and how to run them.

Each script is one atomic step for one key: Redis runs a script to the end
before it serves any other command, so concurrent requests from any number
of appliances can never both take the last token. The clock is Redis'
own (C{TIME}), so the appliances' clocks do not matter. Time is kept in
microseconds; all arguments are integers (txredisapi would render floats
with six decimals only). Keys expire once their bucket would be full again,
so idle buckets vanish (a missing key is a full bucket).

Arguments: C{KEYS[1]} the bucket, C{ARGV} = burst, limit, period in
microseconds, cost. Reply: C{{allowed (0|1), remaining units,
retry_after_us, reset_us}}.

L{LuaScript.run} sends C{EVALSHA} and falls back to C{EVAL} when Redis no
longer knows the script (after a restart or C{SCRIPT FLUSH}); the C{EVAL}
loads it again for the next call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_PROLOGUE = """
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[3]) / tonumber(ARGV[2])
local cost = tonumber(ARGV[4])
local eps = 1e-9
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

TOKEN_BUCKET_LUA = _PROLOGUE + """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) / interval)
  ts = now
end
if tokens + eps >= cost then
  tokens = math.max(0, tokens - cost)
  local reset = (burst - tokens) * interval
  local ttl = math.ceil(reset / 1000)
  if ttl > 0 then
    redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
               'ts', string.format('%.17g', ts))
    redis.call('PEXPIRE', KEYS[1], ttl)
  else
    redis.call('DEL', KEYS[1])
  end
  return {1, math.floor(tokens + eps), 0, math.ceil(reset)}
end
return {0, math.floor(tokens + eps), math.ceil((cost - tokens) * interval),
        math.ceil((burst - tokens) * interval)}
"""
"""The token bucket step; stores C{tokens} and C{ts} in a hash."""

GCRA_LUA = _PROLOGUE + """
local tolerance = burst * interval
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + cost * interval
local allow_at = new_tat - tolerance
if allow_at - now <= eps * interval then
  local ttl = math.ceil((new_tat - now) / 1000)
  if ttl > 0 then
    redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl)
  else
    redis.call('DEL', KEYS[1])
  end
  return {1, math.max(0, math.floor((tolerance - (new_tat - now)) / interval + eps)), 0,
          math.ceil(new_tat - now)}
end
return {0, math.max(0, math.floor((tolerance - (tat - now)) / interval + eps)),
        math.ceil(allow_at - now), math.ceil(tat - now)}
"""
"""The GCRA step; stores the theoretical arrival time in a string key."""


class RedisCaller(Protocol):
    """
    What the limiter needs from L{appliance.host.redis.RedisLink}.
    """

    state: str

    def call(self, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Call a txredisapi method, failing with C{RedisUnavailable}."""


def is_noscript(failure: Failure) -> bool:
    """
    Whether a failed C{EVALSHA} means "Redis does not know this script".

    L{RedisLink.call} turns every error into C{RedisUnavailable} with the
    original message; txredisapi words this one C{No script matching hash}
    (its C{ScriptDoesNotExist}), Redis itself C{NOSCRIPT}.
    """
    message = failure.getErrorMessage()
    return "NOSCRIPT" in message or "No script matching hash" in message


@frozen
class LuaScript:
    """
    A Lua script run with C{EVALSHA}, falling back to C{EVAL}.

    @ivar source: the script text.
    @ivar sha: its SHA-1, as Redis names it.
    """

    source: str
    sha: str = field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    def run(self, redis: RedisCaller, keys: Sequence[str],
            args: Sequence[int]) -> Deferred[Any]:
        """
        Run the script: C{EVALSHA}, then C{EVAL} if the script cache is
        empty. Fails with whatever C{redis.call} fails with.
        """
        keys, args = list(keys), list(args)
        d = redis.call("evalsha", self.sha, keys, args)

        def fallback(failure: Failure) -> Any:
            if is_noscript(failure):
                return redis.call("eval", self.source, keys, args)
            return failure

        return d.addErrback(fallback)


TOKEN_BUCKET = LuaScript(TOKEN_BUCKET_LUA)
"""The token bucket script."""

GCRA = LuaScript(GCRA_LUA)
"""The GCRA script."""
