"""
HTTP load with wrk, and the side-by-side rounds: the peer and ours measured
alternately in the same run, the best round of each reported.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import BenchError, Figure, Result, format_number, say, warn
from bench.machine import CpuMeter
from bench.procs import die_with_parent, pinned, require_binary

OTHER_WORK_LIMIT = 0.25
"""Cores' worth of other work during a best round above which we warn."""

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass(frozen=True)
class WrkRun:
    """What one wrk run measured."""

    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx: int

    def summary(self) -> str:
        text = (f"{format_number(self.requests_per_sec)} req/s, p50 {self.p50_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms, {self.requests} requests")
        if self.socket_errors:
            text += f", {self.socket_errors} socket errors"
        return text


def parse_wrk(output: str) -> WrkRun:
    """Parse C{wrk --latency} output (wrk 4.x)."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if rate is None:
        raise BenchError(f"no Requests/sec in wrk's output:\n{output}")

    def percentile(which: str) -> float:
        found = re.search(rf"^\s*{which}%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
        if found is None:
            raise BenchError(f"no {which}% latency in wrk's output (was --latency given?):\n"
                             f"{output}")
        return float(found.group(1)) * _UNITS_MS[found.group(2)]

    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkRun(
        requests_per_sec=float(rate.group(1)),
        p50_ms=percentile("50"),
        p99_ms=percentile("99"),
        requests=int(total.group(1)) if total else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run_wrk(url: str, *, duration: float, connections: int, threads: int = 1,
            cpus: str | None = None, headers: tuple[str, ...] = ()) -> WrkRun:
    """
    C{wrk -tT -cC -dDs --latency URL}, bounded in time. Any non-2xx answer
    fails the benchmark: a server answering errors fast proves nothing.
    """
    wrk = require_binary("wrk")
    seconds = max(1, round(duration))
    header_args = [arg for header in headers for arg in ("-H", header)]
    command = pinned([wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
                      *header_args, url], cpus)
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=seconds + 30, start_new_session=True,
                                preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"wrk did not finish within {seconds + 30}s: {url}") from error
    if result.returncode != 0:
        raise BenchError(f"wrk failed (exit {result.returncode}) on {url}:\n"
                         f"{result.stdout}{result.stderr}")
    run = parse_wrk(result.stdout)
    if run.non_2xx:
        raise BenchError(f"{url} answered {run.non_2xx} non-2xx responses under load:\n"
                         f"{result.stdout}")
    if run.requests == 0:
        raise BenchError(f"wrk completed no request on {url}:\n{result.stdout}")
    return run


@dataclass(frozen=True)
class Contender:
    """One side of the comparison: its label in the output and the URL to load."""

    label: str
    url: str
    headers: tuple[str, ...] = ()


def add_wrk_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every wrk-driven benchmark takes."""
    parser.add_argument("--rounds", type=int, default=3,
                        help="peer/ours rounds, alternating; the best of each is reported "
                             "(default 3)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of load per measured run (default 10)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent keep-alive connections, wrk -c (default 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="wrk threads, wrk -t (default 1)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unmeasured load on each server first (default 1; "
                             "0 skips)")


def side_by_side(args: argparse.Namespace, name: str, ours: Contender, peer: Contender,
                 *, wrk_cpus: str | None = None,
                 references: Sequence[Contender] = ()) -> Result:
    """
    Measure C{peer} then C{ours} with wrk, C{args.rounds} times, in the same
    run; print every round and return the best round of each (highest
    req/s) as the result. C{references} are measured in each round too
    (after ours) and printed, with ours as a ratio of each, but are not the
    result.
    """
    if args.rounds < 1 or args.duration < 1 or args.connections < 1 or args.threads < 1:
        raise BenchError("--rounds, --duration, --connections and --threads must be >= 1")
    if args.threads > args.connections:
        raise BenchError("wrk needs --connections >= --threads")

    def measure(contender: Contender, seconds: float) -> WrkRun:
        return run_wrk(contender.url, duration=seconds, connections=args.connections,
                       threads=args.threads, cpus=wrk_cpus, headers=contender.headers)

    say(f"load: wrk -t{args.threads} -c{args.connections} -d{round(args.duration)}s "
        f"--latency, {args.rounds} rounds, {peer.label} then {ours.label} in each")
    contenders = (peer, ours, *references)
    for contender in contenders:
        say(f"  {contender.label}: {contender.url}")
    if args.warmup > 0:
        for contender in contenders:
            measure(contender, args.warmup)
    runs: dict[str, list[tuple[WrkRun, float]]] = {c.label: [] for c in contenders}
    width = max(len(c.label) for c in contenders)
    meter = CpuMeter()
    for number in range(1, args.rounds + 1):
        for contender in contenders:
            meter.start()
            run = measure(contender, args.duration)
            other = meter.other_cores()
            runs[contender.label].append((run, other))
            say(f"round {number}/{args.rounds} {contender.label:<{width}}  {run.summary()}, "
                f"other work {other:.2f} cores")
            if run.socket_errors:
                warn(f"{contender.label}: {run.socket_errors} socket errors in round {number}")
    best = {label: max(found, key=lambda r: r[0].requests_per_sec)
            for label, found in runs.items()}
    say(f"best of {args.rounds} rounds (highest req/s of each, not an average):")
    for label in runs:
        run, other = best[label]
        say(f"  {label:<{width}}  {run.summary()}, other work {other:.2f} cores")
        if other > OTHER_WORK_LIMIT:
            warn(f"other work on this machine used {other:.2f} cores during {label}'s best "
                 f"round: its figure, and so the ratio, is skewed; rerun on a quiet machine")
    ours_rate = best[ours.label][0].requests_per_sec
    for reference in references:
        rate = best[reference.label][0].requests_per_sec
        say(f"reference: {ours.label} {ours_rate:.0f} req/s vs {reference.label} {rate:.0f} "
            f"req/s = ratio {ours_rate / rate if rate else float('nan'):.2f}; "
            f"{reference.label} vs {peer.label} = ratio "
            f"{rate / best[peer.label][0].requests_per_sec:.2f}")
    return Result(
        name=name,
        ours=Figure(best[ours.label][0].requests_per_sec, "req/s"),
        peer_name=peer.label,
        peer=Figure(best[peer.label][0].requests_per_sec, "req/s"),
    )
