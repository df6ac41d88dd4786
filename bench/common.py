"""
What every benchmark shares: the result line, detail and warning output,
cleanup that survives Ctrl-C, free loopback ports.

Child processes are in L{bench.procs}, the machine (Debian packages, CPU
load) in L{bench.machine}, the servers in L{bench.servers}, the HTTP load
generator and the side-by-side rounds in L{bench.wrk}.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the appliance runs from this source tree."""

BIN = Path(sys.executable).parent
"""The venv's bin folder (twistd lives there)."""

LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """A benchmark could not run; the message says why."""


# -- the result line ---------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured figure and its unit, e.g. 11234 req/s."""

    value: float
    unit: str

    def __str__(self) -> str:
        return f"{format_number(self.value)} {self.unit}"


@dataclass(frozen=True)
class Result:
    """
    A benchmark's outcome: ours against the peer, measured in the same run.
    The ratio is ours / peer (above 1: ours has the higher figure).
    """

    name: str
    ours: Figure
    peer_name: str
    peer: Figure

    @property
    def ratio(self) -> float:
        return self.ours.value / self.peer.value if self.peer.value else float("nan")

    def line(self) -> str:
        """The one result line every benchmark ends with."""
        return (f"{self.name}: {self.ours} vs {self.peer_name} {self.peer} "
                f"= ratio {self.ratio:.2f}")


def format_number(value: float) -> str:
    """Whole numbers from 100 up, three significant digits below."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def say(*parts: Any) -> None:
    """A detail line on stdout, flushed (so it shows before a long run)."""
    print(*parts, flush=True)


def warn(*parts: Any) -> None:
    """A warning on stderr."""
    print("bench: warning:", *parts, file=sys.stderr, flush=True)


# -- cleanup -----------------------------------------------------------------


class Cleanup(contextlib.ExitStack):
    """
    An C{ExitStack} whose callbacks run with SIGINT, SIGTERM and SIGHUP
    ignored, so a second Ctrl-C cannot leave a server running. Every
    callback is already bounded in time (see L{stop_process}).
    """

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        saved = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            saved[signum] = signal.signal(signum, signal.SIG_IGN)
        try:
            super().__exit__(exc_type, exc, tb)
            return False  # never swallows an exception
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def temp_dir(cleanup: Cleanup, prefix: str) -> Path:
    """A temporary folder removed when C{cleanup} unwinds. Its name carries
    this process's pid, for L{sweep_leftovers}."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-{os.getpid()}-"))
    cleanup.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into C{SystemExit}, so C{with} blocks unwind."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# -- loopback ----------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on C{host} that was free a moment ago (the kernel's pick).
    Servers started on it retry with a new port if another process won it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 1.0) -> int:
    """The status of GET C{url}; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, urllib.error.URLError):
        return 0


def python_env() -> dict[str, str]:
    """The environment for a Python child that imports this source tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    return env


def serve(protocol: type, port_file: Path, backlog: int = 50) -> int:
    """
    Run a peer or reference server of this package until it is killed:
    C{protocol} on a loopback port the kernel picks, on the epoll reactor,
    the port's number published to C{port_file} once it listens.
    """
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    factory: Any = Factory.forProtocol(protocol)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, backlog=backlog, interface="127.0.0.1")
    publish_port(port_file, port.getHost().port)
    reactor.run()  # type: ignore[attr-defined]
    return 0


def publish_port(path: Path, port: int) -> None:
    """Write a listening port's number to C{path} for the harness, atomically
    (the harness never reads half a number)."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(str(port))
    os.replace(partial, path)
