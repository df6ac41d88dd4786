"""
The measured rounds of the pow benchmark: each contender loaded by
L{bench.powload} in its own process, alternately, with the CPU the server,
the load generator and everything else used meanwhile, and the best round
of each as the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, BenchError, Figure, Result, format_number, python_env, say, warn
from bench.machine import CpuMeter
from bench.procs import die_with_parent, pinned

OTHER_WORK_LIMIT = 0.25
"""Cores' worth of other work during a best round above which we warn."""

ERROR_LIMIT = 0.01
"""Failed sessions, as a share of completed ones, above which the run fails."""

SATURATED = 0.9
"""A process using this many cores or more is taken to be the limit."""

_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Contender:
    """One side: its label, the load generator's mode, where it listens, its process."""

    label: str
    mode: str
    port: int
    pid: int
    expect: int = 0


@dataclass(frozen=True)
class LoadRun:
    """What one L{bench.powload} run measured, and the CPU around it."""

    sessions_per_sec: float
    p50_ms: float
    p99_ms: float
    sessions: int
    errors: dict[str, int]
    load_cores: float
    server_cores: float
    other_cores: float
    listen_overflows: int

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def server_us(self) -> float:
        """Server CPU per completed session, in microseconds."""
        return self.server_cores / self.sessions_per_sec * 1e6 if self.sessions_per_sec else 0.0

    def summary(self) -> str:
        text = (f"{format_number(self.sessions_per_sec)} sessions/s, p50 {self.p50_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms, {self.sessions} sessions, "
                f"server {self.server_cores:.2f} cores, load generator {self.load_cores:.2f} "
                f"cores, other work {self.other_cores:.2f} cores")
        if self.failed:
            text += ", errors " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
        if self.listen_overflows:
            text += f", {self.listen_overflows} listen queue overflows"
        return text


def _process_ticks(pid: int) -> int:
    """CPU ticks used so far by C{pid} (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


def _listen_overflows() -> int:
    """The machine's TcpExt ListenOverflows counter (SYNs dropped, accept queue full)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def run_load(contender: Contender, *, duration: float, connections: int,
             cpus: str | None, meter: CpuMeter | None = None) -> LoadRun:
    """Run L{bench.powload} against C{contender}, bounded in time."""
    command = pinned([sys.executable, "-m", "bench.powload", "--mode", contender.mode,
                      "--port", str(contender.port), "--connections", str(connections),
                      "--duration", str(duration), "--expect", str(contender.expect)], cpus)
    if meter is not None:
        meter.start()
    ticks = _process_ticks(contender.pid)
    overflows = _listen_overflows()
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=duration + 30, cwd=ROOT, env=python_env(),
                                start_new_session=True, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"the load generator did not finish within {duration + 30:.0f}s "
                         f"on {contender.label}") from error
    other = meter.other_cores() if meter is not None else 0.0
    server_ticks = _process_ticks(contender.pid) - ticks
    overflows = _listen_overflows() - overflows
    if result.returncode != 0:
        raise BenchError(f"the load generator failed (exit {result.returncode}) on "
                         f"{contender.label}:\n{result.stdout}{result.stderr[-3000:]}")
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as error:
        raise BenchError(f"no JSON from the load generator:\n{result.stdout}"
                         f"{result.stderr[-3000:]}") from error
    if result.stderr.strip():
        warn(f"the load generator said on {contender.label}:\n{result.stderr[-2000:]}")
    window = report["duration"] or duration
    return LoadRun(
        sessions_per_sec=report["sessions_per_sec"], p50_ms=report["p50_ms"],
        p99_ms=report["p99_ms"], sessions=report["sessions"], errors=report["errors"],
        load_cores=report["cpu_cores"], server_cores=server_ticks / _HZ / window,
        other_cores=other, listen_overflows=overflows)


def side_by_side(args: argparse.Namespace, name: str, ours: Contender, peer: Contender,
                 load_cpus: str | None, references: Sequence[Contender] = ()) -> Result:
    """
    Peer then ours, C{args.rounds} times; the best round of each, as C{name}'s
    result. C{references} run in each round too, after ours, and are printed
    as ratios (ours to each, each to the peer); they do not change the result.
    """
    if args.rounds < 1 or args.duration < 1 or args.connections < 1:
        raise BenchError("--rounds, --duration and --connections must be >= 1")

    def measure(contender: Contender, seconds: float, meter: CpuMeter | None) -> LoadRun:
        run = run_load(contender, duration=seconds, connections=args.connections,
                       cpus=load_cpus, meter=meter)
        if run.sessions == 0:
            raise BenchError(f"{contender.label}: no session completed; errors {run.errors}")
        if run.failed > ERROR_LIMIT * run.sessions:
            raise BenchError(f"{contender.label}: {run.failed} failed sessions for "
                             f"{run.sessions} completed under load: {run.errors}")
        return run

    contenders = (peer, ours, *references)
    say(f"load: python -m bench.powload, {args.connections} virtual clients, "
        f"{round(args.duration)}s, {args.rounds} rounds, "
        f"{' then '.join(c.label for c in contenders)} in each")
    if args.warmup > 0:
        for contender in contenders:
            measure(contender, args.warmup, None)
    runs: dict[str, list[LoadRun]] = {c.label: [] for c in contenders}
    width = max(len(c.label) for c in contenders)
    meter = CpuMeter()
    for number in range(1, args.rounds + 1):
        for contender in contenders:
            run = measure(contender, args.duration, meter)
            runs[contender.label].append(run)
            say(f"round {number}/{args.rounds} {contender.label:<{width}}  {run.summary()}")
            if run.failed:
                warn(f"{contender.label}: {run.failed} failed sessions in round {number}: "
                     f"{run.errors}")
    best = {label: max(found, key=lambda r: r.sessions_per_sec) for label, found in runs.items()}
    say(f"best of {args.rounds} rounds (highest sessions/s of each, not an average):")
    for label in (c.label for c in contenders):
        run = best[label]
        say(f"  {label:<{width}}  {run.summary()}")
        if run.other_cores > OTHER_WORK_LIMIT:
            warn(f"other work on this machine used {run.other_cores:.2f} cores during "
                 f"{label}'s best round: its figure, and so the ratio, is skewed; rerun on a "
                 f"quiet machine")
        if run.load_cores >= SATURATED and run.server_cores < SATURATED:
            warn(f"during {label}'s best round the load generator used "
                 f"{run.load_cores:.2f} cores and the server {run.server_cores:.2f}: the "
                 f"generator, not the server, may be the limit")
        elif run.load_cores >= SATURATED:
            say(f"  ({label}: the server and the load generator were both at a full core: "
                f"this figure is what the two cores give, the server's own ceiling is at "
                f"most {1 / run.server_cores:.2f} times it)")
    say(f"server CPU per session in the best rounds: {ours.label} "
        f"{best[ours.label].server_us:.0f} us, {peer.label} {best[peer.label].server_us:.0f} us "
        f"(sessions per server CPU-second: ratio "
        f"{best[peer.label].server_us / best[ours.label].server_us:.2f})"
        if best[ours.label].server_us else "server CPU per session: not measured")
    for reference in references:
        mine, theirs, peers = best[ours.label], best[reference.label], best[peer.label]
        say(f"reference: {ours.label} {mine.sessions_per_sec:.0f} sessions/s vs "
            f"{reference.label} {theirs.sessions_per_sec:.0f} sessions/s = ratio "
            f"{mine.sessions_per_sec / theirs.sessions_per_sec:.2f}; {reference.label} vs "
            f"{peer.label} = ratio {theirs.sessions_per_sec / peers.sessions_per_sec:.2f} "
            f"(server CPU per session {theirs.server_us:.0f} us)")
    return Result(name=name, ours=Figure(best[ours.label].sessions_per_sec, "sessions/s"),
                  peer_name=peer.label,
                  peer=Figure(best[peer.label].sessions_per_sec, "sessions/s"))
