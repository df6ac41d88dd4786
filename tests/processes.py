"""
Running the real appliance as a subprocess (C{twistd -n appliance}) and
talking to it with plain blocking clients, for end-to-end tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests import canary

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for subprocesses: the source tree first on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


class ApplianceProcess:
    """One C{twistd -n appliance} subprocess, its output captured to a file."""

    def __init__(self, config: Path | str, workdir: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.output_path = workdir / f"appliance-{time.monotonic_ns()}.log"
        canary.watch_output(self.output_path)
        self._output = open(self.output_path, "wb")
        self.process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "appliance", "--config", str(config),
             "--log-format", "json", *args],
            stdout=self._output, stderr=subprocess.STDOUT, cwd=workdir,
            env=environment(env),
        )

    def output(self) -> str:
        """Everything the process printed so far."""
        if not self._output.closed:
            self._output.flush()
        return self.output_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines printed so far."""
        lines = []
        for line in self.output().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def wait_until(self, predicate: Any, timeout: float = 15.0, what: str = "") -> None:
        """Poll C{predicate} until true; fail with the output if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            try:
                self.process.wait(0.05)  # returns early if the process exits
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(
                f"appliance exited ({self.process.returncode}) while waiting for "
                f"{what}:\n{self.output()}")
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")

    def wait_healthy(self, admin_port: int, timeout: float = 15.0) -> None:
        """Wait until /healthz answers."""
        self.wait_until(lambda: http_get(admin_port, "/healthz")[0] == 200, timeout,
                        "/healthz")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit and return the status."""
        try:
            return self.process.wait(timeout)
        finally:
            self._output.flush()

    def stop(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._output.close()


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path; (0, b'') when nothing answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    """A blocking TCP connection to 127.0.0.1:port."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def run_command(*args: str, env: dict[str, str] | None = None,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command from the venv's bin with the source tree on sys.path."""
    command = [str(BIN / args[0]), *args[1:]] if (BIN / args[0]).exists() else list(args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=environment(env), cwd=ROOT)
    canary.check_text(result.stdout + result.stderr, f"output of {' '.join(args)}")
    return result
