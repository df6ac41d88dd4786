"""A throwaway Redis server: ``redis-server`` on a free 127.0.0.1 port.

No configuration file is read (only command-line options), nothing is
persisted (``--save "" --appendonly no``) and the working folder is a fresh
temporary one, so the machine's own Redis on port 6379 is never touched.
:meth:`RedisServer.stop`, :meth:`RedisServer.kill` and
:meth:`RedisServer.start` let tests take Redis away and bring it back on the
same port. :func:`resp_command` talks raw RESP over a socket, with no client
library.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

from tests.harness.ports import LOOPBACK, free_port
from tests.harness.process import ServerProcess

#: Seconds to wait for the server to answer PING, and to exit on SIGTERM.


def resp_command(
    host: str, port: int, *commands: tuple[str, ...], timeout: float = 5.0
) -> list[bytes]:
    """Send RESP commands on one new connection and return each reply's first line.

    Each command is a tuple of arguments, e.g. ``("AUTH", "pw"), ("PING",)``;
    a reply is returned as its first line without CRLF (``b"+PONG"``,
    ``b"-NOAUTH Authentication required."``), which suffices for status
    and error replies.
    """
    replies: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        payload = b"".join(_encode(command) for command in commands)
        sock.sendall(payload)
        buffer = b""
        while len(replies) < len(commands):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by Redis")
            buffer += chunk
            while b"\r\n" in buffer and len(replies) < len(commands):
                line, buffer = buffer.split(b"\r\n", 1)
                replies.append(line)
    return replies


def _encode(command: tuple[str, ...]) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    parts = [f"*{len(command)}\r\n".encode()]
    for arg in command:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisServer(ServerProcess):
    """A running throwaway Redis server; see the module docstring.

    Attributes: ``host`` (127.0.0.1), ``port``, ``password`` (``None`` when
    no ``requirepass``), ``base_dir``, ``log_path``. Use it as a context
    manager or call :meth:`close`.
    """

    name = "redis-server"
    poll_interval = 0.02

    def __init__(self, password: str | None = None) -> None:
        """Start the server; with ``password`` clients must ``AUTH`` first."""
        self.host = LOOPBACK
        self.port = 0
        self.password = password
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        self.base_dir = Path(tempfile.mkdtemp(prefix="appliance-redis-"))
        self.log_path = self.base_dir / "redis.log"
        try:
            self._first_start()
        except BaseException:
            self.close()
            raise

    # -- public API --------------------------------------------------------

    def ping(self, timeout: float = 5.0) -> bytes:
        """Send PING (after AUTH when a password is set) and return the reply line."""
        commands: list[tuple[str, ...]] = [("PING",)]
        if self.password is not None:
            commands.insert(0, ("AUTH", self.password))
        return resp_command(self.host, self.port, *commands, timeout=timeout)[-1]

    def start(self) -> None:
        """Start the server again on the same port (no-op if running)."""
        if self._closed:
            raise RuntimeError("server is closed")
        if self.running:
            return
        args = [
            "redis-server",
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.base_dir),
            "--daemonize",
            "no",
            "--pidfile",
            str(self.base_dir / "redis.pid"),
            "--logfile",
            "",  # log to stdout, which goes to log_path
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self._spawn(args)
        self._wait_ready()

    def __repr__(self) -> str:
        """Show where the server listens."""
        return f"<RedisServer {self.host}:{self.port} dir={self.base_dir}>"

    # -- helpers -----------------------------------------------------------

    def _first_start(self) -> None:
        """Start on a free port, picking another one if it was taken meanwhile."""
        for attempt in range(3):
            self.port = free_port()
            try:
                self.start()
                return
            except RuntimeError as error:
                if attempt == 2 or "already in use" not in str(error):
                    raise

    def _probe(self) -> str | None:
        """Ready when PING answers +PONG."""
        try:
            reply: object = self.ping(timeout=1.0)
        except OSError as error:
            reply = error
        return None if reply == b"+PONG" else repr(reply)
