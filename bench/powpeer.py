"""
The peer of the pow benchmark: the most trivial Twisted server, run as its
own process by L{bench.pow}:

    python -m bench.powpeer --payload FILE --port-file FILE [--backlog N]

On each connection it writes the bytes of C{--payload} (a real QUOTE frame)
and closes: accept, one write, close, on the same reactor (epoll) the
appliance runs on. It is the ceiling for complete sessions per second with
this reactor on this machine. It listens on a loopback port the kernel
picks and writes the number to C{--port-file} once it listens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twisted.internet.protocol import Protocol

from bench.common import serve


class WriteAndClose(Protocol):
    """Write the payload, close."""

    payload = b""

    def connectionMade(self) -> None:  # noqa: N802 (Twisted naming)
        self.transport.write(self.payload)
        self.transport.loseConnection()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.powpeer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload", type=Path, required=True,
                        help="the bytes written on each connection")
    parser.add_argument("--port-file", type=Path, required=True,
                        help="written with the port number once listening")
    parser.add_argument("--backlog", type=int, default=50,
                        help="listen backlog (default 50, Twisted's)")
    args = parser.parse_args(argv)

    WriteAndClose.payload = args.payload.read_bytes()
    return serve(WriteAndClose, args.port_file, args.backlog)


if __name__ == "__main__":
    sys.exit(main())
