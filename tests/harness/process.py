"""The lifecycle the harness servers share: spawn, stop, kill, close."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

SERVER_WAIT = 30.0
"""Seconds to wait for a server to start or stop."""


class ServerProcess:
    """
    A server run from an installed binary in its own temporary folder.

    Subclasses set C{base_dir} and C{log_path}, start the server with
    L{_spawn} and wait for it to be ready themselves.
    """

    base_dir: Path
    log_path: Path
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
