"""The lifecycle the harness servers share: spawn, stop, kill, close."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

SERVER_WAIT = 30.0
"""Seconds to wait for a server to start or stop."""


class ServerProcess:
    """
    A server run from an installed binary in its own temporary folder.

    Subclasses set C{base_dir}, C{log_path} and C{name}, start the server
    with L{_spawn}, and say in L{_probe} whether it is ready; L{_wait_ready}
    polls that.
    """

    base_dir: Path
    log_path: Path
    name: str
    poll_interval = 0.05
    _process: subprocess.Popen[bytes] | None = None
    _closed = False

    def _spawn(self, args: Sequence[str]) -> None:
        """Start C{args} with its output appended to the log."""
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                list(args),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in pytest must not reach the server
            )

    def _probe(self) -> str | None:
        """None when the server is ready, else what was seen instead."""
        raise NotImplementedError

    def _wait_ready(self) -> None:
        """Poll L{_probe}; raise with the log tail if the server dies or takes too long."""
        assert self._process is not None
        deadline = time.monotonic() + SERVER_WAIT
        while True:
            seen = self._probe()
            if seen is None:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"{self.name} not ready after {SERVER_WAIT} s: {seen}\n{self._log_tail()}")
            try:
                code = self._process.wait(timeout=self.poll_interval)  # doubles as the wait
            except subprocess.TimeoutExpired:
                continue
            self._process = None
            raise RuntimeError(f"{self.name} exited with {code} during start\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return f"--- {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server with SIGTERM and wait for it (SIGKILL if it hangs)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SERVER_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=SERVER_WAIT)

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash) and reap it."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=SERVER_WAIT)

    def close(self) -> None:
        """Stop the server and remove its temporary folder; safe to call twice."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        """Return the running server."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the server."""
        self.close()
