"""
pow: complete proof-of-work sessions per second against the appliance's pow
service, next to the most trivial Twisted server on the same machine.

A session: connect, CHALLENGE_REQUEST, CHALLENGE, solve (a low fixed
difficulty, 4 bits by default: about 16 hashes), SOLUTION, QUOTE, the server
closes. The peer, measured in the same run in alternate rounds, accepts,
writes one quote frame of the same size and closes: the ceiling for
sessions per second on this reactor (epoll) and this machine. Both are
loaded by L{bench.powload} (its own process, C{--connections} virtual
clients on one reactor), which also reports its own CPU use so a load
generator that is the bottleneck shows.

Before the rounds, in this process: what one verification costs the server
(C{PowEngine.verify} on a valid solution, at the benchmark's difficulty and
at 20 bits) and the client solver's hashes/s per core, on one core and on
every core at once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import json
import multiprocessing
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import timeit
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    ROOT,
    BenchError,
    Cleanup,
    Figure,
    Result,
    format_number,
    free_port,
    say,
    temp_dir,
    warn,
)
from bench.machine import CpuMeter
from bench.procs import cpu_plan, die_with_parent, pinned, spawn, stop_process, wait_until
from bench.servers import START_TIMEOUT, start_appliance

NAME = "pow"
SUMMARY = ("pow sessions/s (connect, challenge, solve at 4 bits, solution, quote) vs a "
           "trivial Twisted write-a-quote-and-close server")
PACKAGES: tuple[str, ...] = ()

PEER = "twisted-trivial"
OTHER_WORK_LIMIT = 0.25
"""Cores' worth of other work during a best round above which we warn."""

ERROR_LIMIT = 0.01
"""Failed sessions, as a share of completed ones, above which the run fails."""

SATURATED = 0.9
"""A process using this many cores or more is taken to be the limit."""

SOLVER_SECONDS = 3.0
"""How long each solver hash-rate measurement runs."""

_HZ = os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3,
                        help="peer/ours rounds, alternating; the best of each is reported "
                             "(default 3)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of load per measured run (default 10)")
    parser.add_argument("--connections", type=int, default=64,
                        help="concurrent virtual clients, each looping sessions (default 64)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unmeasured load on each server first (default 1; "
                             "0 skips)")
    parser.add_argument("--difficulty", type=int, default=4,
                        help="fixed difficulty in bits: difficulty = min = max (default 4)")
    parser.add_argument("--backlog", type=int, default=1024,
                        help="listen backlog of both servers (default 1024; Twisted's own "
                             "default of 50 is below the concurrency)")
    parser.add_argument("--no-costs", action="store_true",
                        help="skip the in-process verification cost and solver hash rate")


# -- the servers ---------------------------------------------------------------


def pow_section(port: int, key_file: Path, difficulty: int, backlog: int) -> str:
    """A [pow] section that never raises the difficulty and never rate-limits."""
    return textwrap.dedent(f"""
        [pow]
        listen = tcp:{port}:interface={LOOPBACK}:backlog={backlog}
        difficulty = {difficulty}
        min_difficulty = {difficulty}
        max_difficulty = {difficulty}
        rate_limit = 100000000/s
        max_connections = 1000000
        max_connections_per_client = 1000000
        target_rate = 1000000000
        client_threshold = 1000000000
        client_extra_max = 0
        replay_capacity = 10000000

        [pow.key:bench]
        secret = file:{key_file}
        """)


def write_key(path: Path) -> None:
    """A fresh random HMAC key, created mode 600 (the appliance refuses others)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    path.chmod(0o600)


def quote_frame() -> tuple[bytes, str]:
    """The QUOTE frame of the shipped quote of median frame size, and a note."""
    from appliance.pow.frames import MessageType, encode
    from appliance.pow.quotes import load_quote_file

    frames = sorted((encode(MessageType.QUOTE, quote.to_json())
                     for quote in load_quote_file(None)), key=len)
    median = frames[len(frames) // 2]
    return median, (f"{len(median)} bytes, the median QUOTE frame of the {len(frames)} "
                    f"shipped quotes ({len(frames[0])}-{len(frames[-1])} bytes)")


@dataclass
class Peer:
    process: subprocess.Popen[bytes]
    port: int


def start_peer(cleanup: Cleanup, workdir: Path, payload: bytes, backlog: int,
               cpus: str | None) -> Peer:
    """Start L{bench.powpeer} on a port the kernel picks; wait until it listens."""
    payload_file = workdir / "quote.frame"
    payload_file.write_bytes(payload)
    port_file = workdir / "peer.port"
    log = workdir / "peer.log"
    env = _python_env()
    with open(log, "wb") as output:
        process = spawn(pinned([sys.executable, "-m", "bench.powpeer",
                                "--payload", str(payload_file), "--port-file", str(port_file),
                                "--backlog", str(backlog)], cpus),
                        output=output, cwd=workdir, env=env)
    cleanup.callback(stop_process, process, signum=signal.SIGTERM, timeout=10)
    wait_until(port_file.exists, timeout=START_TIMEOUT, what=PEER, process=process, log=log)
    return Peer(process, int(port_file.read_text()))


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    return env


def one_session(port: int, difficulty: int, timeout: float = 10.0) -> dict[str, Any]:
    """One pow session with a blocking socket: proves the config before the load
    (the difficulty is the one asked for, a quote comes, the server closes)."""
    from appliance.pow.challenge import Challenge
    from appliance.pow.frames import FrameDecoder, MessageType, encode
    from appliance.pow.solver import solve

    decoder = FrameDecoder(1024 * 1024)
    frames: list[Any] = []

    def read(sock: socket.socket) -> Any:
        while not frames:
            data = sock.recv(65536)
            if not data:
                return None
            frames.extend(decoder.feed(data))
        return frames.pop(0)

    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(encode(MessageType.CHALLENGE_REQUEST, {}))
        frame = read(sock)
        if frame is None or frame.type != MessageType.CHALLENGE:
            raise BenchError(f"pow: expected a CHALLENGE, got {frame}")
        challenge = Challenge.from_json(frame.payload["challenge"])
        if challenge.difficulty != difficulty:
            raise BenchError(f"pow: the challenge has difficulty {challenge.difficulty}, "
                             f"not {difficulty}")
        nonces, _ = solve(challenge)
        sock.sendall(encode(MessageType.SOLUTION, {**frame.payload, "nonces": nonces}))
        frame = read(sock)
        if frame is None or frame.type != MessageType.QUOTE:
            raise BenchError(f"pow: expected a QUOTE, got {frame}")
        if read(sock) is not None:
            raise BenchError("pow: the server did not close after the quote")
        return frame.payload


# -- the load ------------------------------------------------------------------


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
                                text=True, timeout=duration + 30, cwd=ROOT, env=_python_env(),
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


def side_by_side(args: argparse.Namespace, ours: Contender, peer: Contender,
                 load_cpus: str | None) -> Result:
    """Peer then ours, C{args.rounds} times; the best round of each."""
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

    say(f"load: python -m bench.powload, {args.connections} virtual clients, "
        f"{round(args.duration)}s, {args.rounds} rounds, {peer.label} then {ours.label} in each")
    if args.warmup > 0:
        for contender in (peer, ours):
            measure(contender, args.warmup, None)
    runs: dict[str, list[LoadRun]] = {peer.label: [], ours.label: []}
    width = max(len(peer.label), len(ours.label))
    meter = CpuMeter()
    for number in range(1, args.rounds + 1):
        for contender in (peer, ours):
            run = measure(contender, args.duration, meter)
            runs[contender.label].append(run)
            say(f"round {number}/{args.rounds} {contender.label:<{width}}  {run.summary()}")
            if run.failed:
                warn(f"{contender.label}: {run.failed} failed sessions in round {number}: "
                     f"{run.errors}")
    best = {label: max(found, key=lambda r: r.sessions_per_sec) for label, found in runs.items()}
    say(f"best of {args.rounds} rounds (highest sessions/s of each, not an average):")
    for label in (peer.label, ours.label):
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
    return Result(name=NAME, ours=Figure(best[ours.label].sessions_per_sec, "sessions/s"),
                  peer_name=peer.label,
                  peer=Figure(best[peer.label].sessions_per_sec, "sessions/s"))


# -- in-process costs ----------------------------------------------------------


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


# -- the benchmark -------------------------------------------------------------


def appliance_counters(url: str) -> str:
    """The appliance's own pow counters, to check the load generator's count."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as error:
        return f"(metrics unavailable: {error})"
    wanted = ("appliance_pow_challenges_issued_total ", "appliance_pow_solutions_accepted_total ",
              "appliance_pow_verification_seconds_sum ",
              "appliance_pow_verification_seconds_count ")
    values = {}
    rejections = []
    for line in text.splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
        elif line.startswith("appliance_pow_rejections_total{") and not line.endswith(" 0.0"):
            rejections.append(line.split("{", 1)[1].replace('"}', "").replace('reason="', ""))
    count = values.get("appliance_pow_verification_seconds_count", 0)
    mean = (values.get("appliance_pow_verification_seconds_sum", 0) / count * 1e6
            if count else 0)
    return (f"{values.get('appliance_pow_challenges_issued_total', 0):.0f} challenges issued, "
            f"{values.get('appliance_pow_solutions_accepted_total', 0):.0f} quotes served, "
            f"rejections: {', '.join(rejections) or 'none'}; "
            f"mean verification under load {mean:.1f} us")


def run(args: argparse.Namespace) -> Result:
    server_cpus, load_cpus = cpu_plan(args.pin)
    if not 0 <= args.difficulty <= 24:
        raise BenchError("--difficulty must be within 0-24")
    payload, payload_note = quote_frame()
    with Cleanup() as cleanup:
        workdir = temp_dir(cleanup, "pow")
        key_file = workdir / "pow.key"
        write_key(key_file)
        pow_port = 0

        def extra_config() -> str:
            nonlocal pow_port
            pow_port = free_port()
            return pow_section(pow_port, key_file, args.difficulty, args.backlog)

        if not args.no_costs:
            config_file = workdir / "costs.ini"
            config_file.write_text(extra_config())
            verification_costs(config_file, sorted({args.difficulty, 20}))
            solver_rates()
        appliance = start_appliance(cleanup, cpus=server_cpus, extra_config=extra_config)
        peer = start_peer(cleanup, workdir, payload, args.backlog, server_cpus)
        quote = one_session(pow_port, args.difficulty)
        say(f"appliance pid {appliance.process.pid} (pow on {LOOPBACK}:{pow_port}, difficulty "
            f"{args.difficulty} fixed, backlog {args.backlog}); {PEER} pid {peer.process.pid} "
            f"({LOOPBACK}:{peer.port}) writes {payload_note}")
        say(f"a first session got a quote by {quote.get('author', '?')!r}"
            + (f"; pinned: servers on CPU {server_cpus}, load on CPU {load_cpus}"
               if server_cpus else ""))
        result = side_by_side(
            args,
            ours=Contender(NAME, "pow", pow_port, appliance.process.pid),
            peer=Contender(PEER, "trivial", peer.port, peer.process.pid, expect=len(payload)),
            load_cpus=load_cpus)
        say("the appliance's own counters, warmup included: "
            + appliance_counters(appliance.url("/metrics")))
        return result
