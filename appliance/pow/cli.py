"""
C{appliance-pow HOST:PORT}: get quotes from a pow server, solving its
challenges on every core.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Sequence

from appliance.pow.client import Connection, ServerError, Solver, fetch_quote

EXIT_SERVER_ERROR = 1
EXIT_CONNECT = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance-pow",
        description="Fetch quotes from an appliance pow server by solving its "
                    "proof-of-work challenges.")
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("--count", "-n", type=int, default=1, help="quotes to fetch (1)")
    parser.add_argument("--json", action="store_true", help="one JSON object per quote")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the server at each step (30)")
    parser.add_argument("--workers", type=int, default=None,
                        help="solver processes (default: one per core)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", help="CA bundle to verify the server with (implies --tls)")
    parser.add_argument("--cert", help="client certificate for mTLS (implies --tls)")
    parser.add_argument("--key", help="client private key for mTLS")
    parser.add_argument("--servername", help="name to verify the server certificate against")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="show solving progress on stderr (auto: on a terminal)")
    return parser


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.ca or args.cert):
        return None
    context = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    return context


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of C{appliance-pow}."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        host, port = _split(args.address)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.count < 1:
        parser.error("--count must be at least 1")
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())

    def progress(hashes: int, seconds: float) -> None:
        if show and seconds >= 1:
            rate = hashes / seconds / 1e6
            print(f"\rsolving: {hashes / 1e6:.1f}M hashes, {seconds:.1f}s, {rate:.1f}M/s",
                  end="", file=sys.stderr, flush=True)

    solver = Solver(args.workers)
    connection: Connection | None = None
    try:
        fetched = 0
        reused = False
        while fetched < args.count:
            if connection is None:
                try:
                    connection = Connection(host, port, args.timeout, _tls_context(args),
                                            args.servername)
                except (OSError, ssl.SSLError) as error:
                    print(f"appliance-pow: cannot connect to {host}:{port}: {error}",
                          file=sys.stderr)
                    return EXIT_CONNECT
                reused = False
            try:
                result = fetch_quote(connection, solver, progress)
            except ServerError as error:
                print(f"appliance-pow: {error}", file=sys.stderr)
                return EXIT_SERVER_ERROR
            except (EOFError, OSError) as error:
                connection.close()
                connection = None
                if reused:
                    continue  # the server closed after the last round: reconnect
                print(f"appliance-pow: connection failed: {error}", file=sys.stderr)
                return EXIT_CONNECT
            reused = True
            if show:
                print("\r", end="", file=sys.stderr)
            fetched += 1
            if args.json:
                print(json.dumps({"quote": result.quote, "author": result.author,
                                  "difficulty": result.difficulty, "puzzles": result.puzzles,
                                  "hashes": result.hashes,
                                  "solve_seconds": round(result.solve_seconds, 4)}))
            else:
                print(f"{result.quote}\n    - {result.author}")
            sys.stdout.flush()
        return 0
    finally:
        if connection is not None:
            connection.close()
        solver.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
