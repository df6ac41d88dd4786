"""
The reference of the secretproxy benchmark (C{--reference}): the leanest
HTTP proxy this reactor allows, run as its own process by L{bench.secretproxy}:

    python -m bench.leanproxy --upstream-port P --inject 'Authorization: Bearer K' --port-file F

The design FACTS.md calls a lean raw-C{Protocol} proxy: HTTP/1.1 heads cut at
the bytes level, one persistent upstream connection per client connection,
one write per message, the routing and session headers dropped, one header
injected. No authentication, policy, rate limits, audit, metrics or limits:
it shows what Twisted itself reaches on this machine in this run, so the
appliance's figure can be read against it as well as against nginx.

It handles exactly what the benchmark sends (requests without a body,
upstream responses with a Content-Length) and is not a proxy to use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from twisted.internet.protocol import ClientFactory, Protocol

from bench.common import serve

DROPPED = (b"connection", b"authorization", b"x-session-secret", b"x-upstream-host", b"host")


class Upstream(Protocol):
    """The upstream side: cut responses by Content-Length, hand each back whole."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.buffer = b""

    def connectionMade(self) -> None:  # noqa: N802 (Twisted naming)
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            length = 0
            start = buffer.find(b"\r\ncontent-length:", 0, end)
            if start < 0:
                start = buffer.find(b"\r\nContent-Length:", 0, end)
            if start >= 0:
                stop = buffer.find(b"\r\n", start + 2)
                length = int(buffer[start + 17:stop])
            total = end + 4 + length
            if len(buffer) < total:
                break
            self.client.transport.write(buffer[:total])
            buffer = buffer[total:]
        self.buffer = buffer

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.client.transport.loseConnection()


class UpstreamFactory(ClientFactory):
    """Connects one L{Upstream} for one client."""

    noisy = False

    def __init__(self, client: Client) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> Upstream:  # noqa: N802
        return Upstream(self.client)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:  # noqa: N802
        self.client.transport.loseConnection()


class Client(Protocol):
    """The client side: rewrite each request head, forward it in one write."""

    upstream_port = 0
    host_line = b""
    injected = b""

    def connectionMade(self) -> None:  # noqa: N802
        self.buffer = b""
        self.upstream: Upstream | None = None
        self.waiting: list[bytes] = []
        from twisted.internet import reactor

        reactor.connectTCP("127.0.0.1", self.upstream_port, UpstreamFactory(self))

    def upstream_ready(self, upstream: Upstream) -> None:
        self.upstream = upstream
        if self.waiting:
            upstream.transport.write(b"".join(self.waiting))
            self.waiting = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            lines = buffer[:end].split(b"\r\n")
            out = [lines[0], self.host_line]
            out += [line for line in lines[1:]
                    if line[:line.find(b":")].lower() not in DROPPED]
            out.append(self.injected)
            message = b"\r\n".join(out) + b"\r\n\r\n"
            buffer = buffer[end + 4:]
            if self.upstream is not None:
                self.upstream.transport.write(message)
            else:
                self.waiting.append(message)
        self.buffer = buffer

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.leanproxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream-host", default="api.upstream.test",
                        help="the Host header sent upstream")
    parser.add_argument("--inject", required=True, help="the header line injected")
    parser.add_argument("--port-file", type=Path, required=True,
                        help="written with the port number once listening")
    args = parser.parse_args(argv)

    Client.upstream_port = args.upstream_port
    Client.host_line = b"Host: " + args.upstream_host.encode("ascii")
    Client.injected = args.inject.encode("ascii")
    return serve(Client, args.port_file)


if __name__ == "__main__":
    sys.exit(main())
