"""
The reference of the pow benchmark (C{--reference}): the least a pow server
must do per session, run as its own process by L{bench.pow}:

    python -m bench.powminimal --difficulty 4 --backlog 1024 --port-file F

It speaks the same protocol with the appliance's own codec and checks
(frames, challenge signing and verification, the work check) and the same
fast socket paths (read at accept, write-through, close-through), and checks
everything a session needs checked: signature, address, expiry, work and
replay. It has none of the service around that: no connection limits, rate
limits, adaptive difficulty, deadlines, drain, metrics or errors frames
(anything unexpected closes the connection). So it shows how far the
protocol itself lets a Twisted server go on this machine in this run, and
the appliance's figure can be read against it as well as against the
trivial server. It is not a server to use.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Protocol

from appliance.host.peers import peer_host
from appliance.http.fastwrite import close_now, read_now, write_now
from appliance.pow.challenge import Challenge, ChallengeSigner, offer_json, work_is_done
from appliance.pow.frames import FrameDecoder, MessageType, ProtocolError, encode, encode_text
from appliance.pow.quotes import load_quote_file
from bench.common import serve

LIFETIME_MS = 60_000
SPENT_PRUNE_AT = 1_000_000
"""Spent signatures kept before the expired ones are dropped."""


class MinimalPow(Protocol):
    """Challenge on request; on a good new solution a quote, then close."""

    signer: ChallengeSigner
    difficulty = 4
    quotes: list[bytes] = []
    spent: dict[str, int] = {}  # signature -> expiry (ms)

    def connectionMade(self) -> None:  # noqa: N802 (Twisted naming)
        self.address = peer_host(self.transport)
        self.decoder = FrameDecoder()
        early = read_now(self.transport)
        if early:
            self.dataReceived(early)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            frames = self.decoder.feed(data)
        except ProtocolError:
            close_now(self.transport)
            return
        for frame in frames:
            if frame.type is MessageType.CHALLENGE_REQUEST:
                now = int(time.time() * 1000)
                challenge, signature = self.signer.issue(self.address, self.difficulty, now,
                                                         now + LIFETIME_MS)
                write_now(self.transport,
                          encode_text(MessageType.CHALLENGE, offer_json(challenge, signature)))
            elif frame.type is MessageType.SOLUTION and self._good(frame.payload):
                write_now(self.transport, random.choice(self.quotes))
                close_now(self.transport)
                return
            else:
                close_now(self.transport)
                return

    def _good(self, payload: dict[str, Any]) -> bool:
        try:
            challenge = Challenge.from_json(payload["challenge"])
            signature = payload["signature"]
            canonical = challenge.canonical()
            if not (self.signer.authentic(challenge, signature, canonical)
                    and challenge.address == self.address
                    and time.time() * 1000 <= challenge.expires_at
                    and work_is_done(challenge, payload["nonces"], canonical)):
                return False
        except (KeyError, TypeError, ProtocolError):
            return False
        spent = self.spent
        if signature in spent:
            return False
        if len(spent) >= SPENT_PRUNE_AT:
            now = time.time() * 1000
            for old in [key for key, expiry in spent.items() if expiry < now]:
                del spent[old]
        spent[signature] = challenge.expires_at
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.powminimal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--difficulty", type=int, default=4)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--port-file", type=Path, required=True,
                        help="written with the port number once listening")
    args = parser.parse_args(argv)

    MinimalPow.signer = ChallengeSigner({"bench": os.urandom(32)}, "bench")
    MinimalPow.difficulty = args.difficulty
    MinimalPow.quotes = [encode(MessageType.QUOTE, quote.to_json())
                         for quote in load_quote_file(None)]
    return serve(MinimalPow, args.port_file, args.backlog)


if __name__ == "__main__":
    sys.exit(main())
