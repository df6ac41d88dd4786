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

With C{--reference}, L{bench.powminimal} (the protocol's own work with none
of the service around it: no limits, deadlines, adaptive difficulty or
metrics) runs in each round too, to read ours against what the protocol
itself reaches here.

Before the rounds, in this process: what one verification costs the server
(C{PowEngine.verify} on a valid solution, at the benchmark's difficulty and
at 20 bits) and the client solver's hashes/s per core, on one core and on
every core at once.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    BenchError,
    Cleanup,
    Result,
    free_port,
    say,
    temp_dir,
)
from bench.powcosts import solver_rates, verification_costs
from bench.powrounds import Contender, side_by_side
from bench.procs import cpu_plan
from bench.servers import start_appliance, start_python_server

NAME = "pow"
SUMMARY = ("pow sessions/s (connect, challenge, solve at 4 bits, solution, quote) vs a "
           "trivial Twisted write-a-quote-and-close server")
PACKAGES: tuple[str, ...] = ()

PEER = "twisted-trivial"
MINIMAL = "pow-minimal"
"""The reference (C{--reference}): the protocol with none of the service around it."""


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
    parser.add_argument("--reference", action="store_true",
                        help="also run the least a pow server must do (bench.powminimal) in "
                             "each round and print ours as a ratio of it")


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
    process, port = start_python_server(
        cleanup, "bench.powpeer", ["--payload", str(payload_file), "--backlog", str(backlog)],
        workdir, PEER, cpus)
    return Peer(process, port)


def start_minimal(cleanup: Cleanup, workdir: Path, difficulty: int, backlog: int,
                  cpus: str | None) -> Peer:
    """Start L{bench.powminimal}; wait until it listens."""
    process, port = start_python_server(
        cleanup, "bench.powminimal", ["--difficulty", str(difficulty), "--backlog", str(backlog)],
        workdir, MINIMAL, cpus)
    return Peer(process, port)


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
        references = []
        if args.reference:
            minimal = start_minimal(cleanup, workdir, args.difficulty, args.backlog,
                                    server_cpus)
            one_session(minimal.port, args.difficulty)
            references.append(Contender(MINIMAL, "pow", minimal.port, minimal.process.pid))
        result = side_by_side(
            args, NAME,
            ours=Contender(NAME, "pow", pow_port, appliance.process.pid),
            peer=Contender(PEER, "trivial", peer.port, peer.process.pid, expect=len(payload)),
            load_cpus=load_cpus, references=references)
        say("the appliance's own counters, warmup included: "
            + appliance_counters(appliance.url("/metrics")))
        return result
