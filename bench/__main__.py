"""
C{python -m bench NAME [options]}: run one side-by-side benchmark; its last
line on stdout is C{NAME: <figure> <unit> vs <peer> <figure> <unit> = ratio R}.
C{python -m bench --list} names the benchmarks.

To add a benchmark, write C{bench/NAME.py} with C{NAME}, C{SUMMARY},
C{PACKAGES} (Debian packages it needs), C{add_arguments(parser)} and
C{run(args) -> Result}, and add one line to L{BENCHMARKS}.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from types import ModuleType

from bench.common import BenchError, exit_on_signals, say
from bench.machine import PACKAGES, check_quiet, ensure_packages, machine
from bench.procs import add_pin_argument, sweep_leftovers

BENCHMARKS: dict[str, str] = {
    "admin": "bench.admin",
    "pow": "bench.pow",
    "secretproxy": "bench.secretproxy",
}
"""Benchmark name -> the module that runs it."""


def load(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side benchmarks of the appliance against a peer on loopback.",
        epilog="'python -m bench NAME --help' shows a benchmark's options.")
    top.add_argument("--list", action="store_true", help="name the benchmarks and exit")
    top.add_argument("--install", action="store_true",
                     help=f"install every Debian package benchmarks use "
                          f"({', '.join(PACKAGES)}) and exit")
    top.add_argument("name", nargs="?", metavar="NAME",
                     help="the benchmark to run: " + ", ".join(sorted(BENCHMARKS)))
    # The benchmark's own options follow its name: split there.
    split = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    known = top.parse_args(argv[:split + 1])
    rest = argv[split + 1:]

    if known.list:
        for name in sorted(BENCHMARKS):
            say(f"{name:<14} {load(name).SUMMARY}")
        return 0
    exit_on_signals()
    if known.install:
        try:
            ensure_packages(PACKAGES)
        except BenchError as error:
            print(f"bench: {error}", file=sys.stderr)
            return 1
        return 0
    if known.name not in BENCHMARKS:
        top.print_usage(sys.stderr)
        what = f"no benchmark {known.name!r}" if known.name else "name a benchmark"
        print(f"python -m bench: error: {what} (choose from {', '.join(sorted(BENCHMARKS))})",
              file=sys.stderr)
        return 2

    module = load(known.name)
    parser = argparse.ArgumentParser(prog=f"python -m bench {known.name}",
                                     description=module.SUMMARY)
    module.add_arguments(parser)
    add_pin_argument(parser)
    args = parser.parse_args(rest)

    started = time.monotonic()
    try:
        sweep_leftovers()
        ensure_packages(module.PACKAGES)
        say(f"benchmark {known.name} on {machine()}")
        check_quiet()
        result = module.run(args)
    except BenchError as error:
        print(f"bench {known.name}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bench {known.name}: interrupted; servers stopped", file=sys.stderr)
        return 130
    say(f"took {time.monotonic() - started:.0f}s")
    print(result.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
