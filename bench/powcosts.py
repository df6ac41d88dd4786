"""
The pow benchmark's figures measured in the harness process, before the
rounds: what one verification costs the server (C{PowEngine.verify} on a
valid solution, with its parse, signature and work checks timed alone) and
the client solver's hashes/s, on one core and on every core at once.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import secrets
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

from bench.common import LOOPBACK, BenchError, say

SOLVER_SECONDS = 3.0
"""How long each solver hash-rate measurement runs."""


class _WallClock:
    """The clock C{PowEngine} reads (the reactor's, in the appliance)."""

    @staticmethod
    def seconds() -> float:
        return time.time()


def _per_call_us(call: Any) -> float:
    """Microseconds per call: the best of 5 timeit repeats of about 0.2 s each."""
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def verification_costs(config_file: Path, difficulties: list[int]) -> None:
    """Time C{PowEngine.verify} (and its signature and work checks) on a valid
    solution at each difficulty, with the benchmark's own config and key."""
    from prometheus_client import CollectorRegistry

    from appliance.host.config import load_config
    from appliance.host.plugin import discover_plugins
    from appliance.pow.challenge import Challenge, work_is_done
    from appliance.pow.difficulty import DifficultyController
    from appliance.pow.engine import PowEngine, PowMetrics, memory_replay
    from appliance.pow.quotes import QuoteSource
    from appliance.pow.solver import solve

    plugins = [plugin for plugin in discover_plugins() if plugin.name == "pow"]
    service = load_config(str(config_file), plugins, os.environ).service("pow")
    if service is None:
        raise BenchError("the generated config has no pow service")
    config: Any = service.config
    clock = _WallClock()
    registry = CollectorRegistry()
    engine = PowEngine(config, clock, DifficultyController(config.difficulty, clock), None,
                       memory_replay(config, clock), QuoteSource(config.quotes, registry, clock),
                       PowMetrics(registry))
    say("server-side verification per solution (PowEngine.verify in this process, timeit "
        "best of 5; signature = HMAC-SHA-256 check, work = one SHA-256 per puzzle):")
    for difficulty in difficulties:
        started = time.perf_counter()
        challenge, signature = engine.signer.issue(
            LOOPBACK, difficulty, now_ms=int(time.time() * 1000), lifetime_ms=3_600_000)
        nonces, hashes = solve(challenge)
        solved_in = time.perf_counter() - started
        payload = {"challenge": challenge.to_json(), "signature": signature, "nonces": nonces}
        engine.verify(LOOPBACK, payload)  # raises if the solution is not valid
        verify = _per_call_us(functools.partial(engine.verify, LOOPBACK, payload))
        parse = _per_call_us(functools.partial(Challenge.from_json, payload["challenge"]))
        sign = _per_call_us(functools.partial(engine.signer.authentic, challenge, signature))
        work = _per_call_us(functools.partial(work_is_done, challenge, nonces))
        say(f"  difficulty {difficulty:>2}: verify {verify:.1f} us (parse {parse:.1f} us, "
            f"signature {sign:.1f} us, work {work:.1f} us); solving it took {hashes} hashes "
            f"in {solved_in:.2f} s")


def _hash_rate(seconds: float) -> tuple[int, float]:
    """Run the solver's search for C{seconds} at a difficulty it will not meet:
    (hashes tried, seconds taken)."""
    from appliance.pow.solver import search

    prefix = b"pow1|sha256|64|bench|" + secrets.token_bytes(8)
    started = time.perf_counter()
    deadline = started + seconds
    _, tried = search(prefix, 64, itertools.count(),
                      should_stop=lambda: time.perf_counter() >= deadline)
    return tried, time.perf_counter() - started


def solver_rates(seconds: float = SOLVER_SECONDS) -> None:
    """The solver's hashes/s on one core, then per core with one process per core."""
    cores = os.cpu_count() or 1
    tried, taken = _hash_rate(seconds)
    single = tried / taken
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(cores, mp_context=context) as pool:
        results = list(pool.map(_hash_rate, [seconds] * cores, timeout=seconds + 60))
    rates = [hashes / spent for hashes, spent in results]
    say(f"client solver (appliance.pow.solver.search, difficulty 64 so never found, "
        f"~{seconds:.0f} s each): {single / 1e6:.2f} M hashes/s in one process; "
        f"{statistics.mean(rates) / 1e6:.2f} M hashes/s per core with {cores} processes "
        f"({sum(rates) / 1e6:.2f} M hashes/s in all); 2^20 expected hashes at "
        f"difficulty 20 = {(1 << 20) / single:.2f} s on one core")
