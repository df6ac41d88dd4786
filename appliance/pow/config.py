"""The C{[pow]} section and its C{[pow.key:ID]} HMAC keys."""

from __future__ import annotations

import math

from attrs import field, frozen

from appliance.host.ini import INVALID, Section
from appliance.host.secret import Secret
from appliance.host.values import (
    in_range,
    one_of,
    parse_duration,
    parse_endpoint,
    parse_int,
    parse_size,
)
from appliance.pow.challenge import MAX_DIFFICULTY, MAX_PUZZLES
from appliance.pow.difficulty import DifficultyPolicy
from appliance.pow.quotes import Quote, load_quote_file
from appliance.resilience import Rate, parse_rate

MIN_KEY_BYTES = 32


@frozen
class PowConfig:
    """Everything the pow service is configured with."""

    listen: str
    tls: str | None
    keys: dict[str, Secret] = field(repr=False)
    current_key: str
    difficulty: DifficultyPolicy
    puzzles: int
    challenge_lifetime: float
    first_byte_timeout: float
    frame_timeout: float
    solution_timeout: float
    max_frame: int
    max_connections: int
    max_connections_per_client: int
    rounds_per_connection: int
    rate_limit: Rate
    rate_limit_burst: int
    limits_backend: str
    on_redis_error: str
    replay_capacity: int
    quotes: tuple[Quote, ...] = field(repr=False, eq=False)
    quotes_file: str | None
    quotes_url: str | None
    quotes_timeout: float
    quotes_cache_ttl: float
    quotes_refresh: float

    def key_bytes(self) -> dict[str, bytes]:
        """The HMAC keys by id."""
        return {kid: secret.reveal().encode("utf-8") for kid, secret in self.keys.items()}

    @property
    def puzzle_difficulty_offset(self) -> int:
        """Bits taken off each sub-puzzle so total work matches one puzzle."""
        return int(math.log2(self.puzzles)) if self.puzzles > 1 else 0


def parse(section: Section) -> PowConfig:
    """Validate C{[pow]} and its keys."""
    keys = _parse_keys(section)
    current = section.get("current_key", str, None)
    if current is None and keys:
        current = sorted(keys)[-1]
    elif current is not None and keys and current not in keys:
        section.problem("current_key", f"there is no [pow.key:{current}] section")
    difficulty = section.get("difficulty", in_range(parse_int, 0, MAX_DIFFICULTY), 20)
    minimum = section.get("min_difficulty", in_range(parse_int, 0, MAX_DIFFICULTY), difficulty)
    maximum = section.get("max_difficulty", in_range(parse_int, 0, MAX_DIFFICULTY),
                          min(MAX_DIFFICULTY, difficulty + 8) if difficulty is not INVALID
                          else INVALID)
    max_connections = section.get("max_connections", in_range(parse_int, 1), 10_000)
    policy = DifficultyPolicy(
        base=difficulty, minimum=minimum, maximum=maximum,
        window=section.get("load_window", in_range(parse_duration, 0.1), 10.0),
        target_rate=section.get("target_rate", in_range(parse_int, 1), 1000),
        max_connections=max_connections,
        client_threshold=section.get("client_threshold", in_range(parse_int, 1), 10),
        client_extra_max=section.get("client_extra_max", in_range(parse_int, 0, 32), 8),
        per_client_cap=section.get("per_client_cap", in_range(parse_int, 1), 20),
        prefix_v4=section.get("client_prefix_v4", in_range(parse_int, 8, 32), 32),
        prefix_v6=section.get("client_prefix_v6", in_range(parse_int, 16, 128), 64),
    )
    if INVALID not in (difficulty, minimum, maximum) and not minimum <= difficulty <= maximum:
        section.problem("difficulty", "expected min_difficulty <= difficulty <= max_difficulty")
    rate = section.get("rate_limit", parse_rate, Rate(20, 1.0))
    quotes_file = section.get("quotes_file", str, None)
    quotes: tuple[Quote, ...] = ()
    try:
        quotes = load_quote_file(quotes_file)
    except ValueError as error:
        section.problem("quotes_file", str(error))
    return PowConfig(
        listen=section.get("listen", parse_endpoint, "tcp:9472:interface=127.0.0.1"),
        tls=section.reference("tls", "tls", None),
        keys=keys,
        current_key=current,
        difficulty=policy,
        puzzles=section.get("puzzles", in_range(parse_int, 1, MAX_PUZZLES), 1),
        challenge_lifetime=section.get("challenge_lifetime", in_range(parse_duration, 1, 3600),
                                       60.0),
        first_byte_timeout=section.get("first_byte_timeout", in_range(parse_duration, 0.01),
                                       5.0),
        frame_timeout=section.get("frame_timeout", in_range(parse_duration, 0.01), 5.0),
        solution_timeout=section.get("solution_timeout", in_range(parse_duration, 0.01), 60.0),
        max_frame=section.get("max_frame", in_range(parse_size, 256, 1024**2), 16 * 1024),
        max_connections=max_connections,
        max_connections_per_client=section.get("max_connections_per_client",
                                               in_range(parse_int, 1), 32),
        rounds_per_connection=section.get("rounds_per_connection", in_range(parse_int, 1), 1),
        rate_limit=rate,
        rate_limit_burst=section.get("rate_limit_burst", in_range(parse_int, 0), 0),
        limits_backend=section.get("limits", one_of("auto", "memory", "redis"), "auto"),
        on_redis_error=section.get("on_redis_error", one_of("allow", "deny", "local"), "local"),
        replay_capacity=section.get("replay_capacity", in_range(parse_int, 100), 1_000_000),
        quotes=quotes,
        quotes_file=quotes_file,
        quotes_url=section.get("quotes_url", _http_url, None),
        quotes_timeout=section.get("quotes_timeout", in_range(parse_duration, 0.01), 2.0),
        quotes_cache_ttl=section.get("quotes_cache_ttl", in_range(parse_duration, 1), 300.0),
        quotes_refresh=section.get("quotes_refresh", in_range(parse_duration, 1), 60.0),
    )


def _parse_keys(section: Section) -> dict[str, Secret]:
    keys = {}
    for kid, child in section.children("key"):
        if len(kid) > 32 or not kid.replace("-", "").replace("_", "").isalnum():
            child.problem(None, "key ids are up to 32 letters, digits, - or _")
            continue
        secret = child.secret("secret")
        if isinstance(secret, Secret):
            if len(secret.reveal().encode()) < MIN_KEY_BYTES:
                child.problem("secret", f"an HMAC key needs at least {MIN_KEY_BYTES} bytes")
                continue
            keys[kid] = secret
    if not keys:
        section.problem(None, "needs at least one [pow.key:ID] section with secret = "
                        "${env:NAME} or file:/path (32+ random bytes)")
    return keys


def _http_url(text: str) -> str:
    url = text.strip()
    if not (url.startswith("http://") or url.startswith("https://")) or " " in url:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return url
