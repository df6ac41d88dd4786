"""Session-scoped pytest fixtures that start real throwaway servers on demand.

Import them into a conftest with ``from tests.harness.fixtures import *``.
Every fixture is lazy: a server starts the first time a test requests it and
is closed at the end of the session.

Cleanup when a session dies:

* every server is registered with :func:`tracked`; an ``atexit`` hook closes
  them (an exception, ``pytest.exit``, Ctrl-C);
* on SIGTERM, if nothing else handles that signal, the servers are closed
  before the process dies of it (under pytest-twisted the reactor owns
  SIGTERM and the session goes on to its normal teardown);
* a SIGKILLed session cannot clean up, so :func:`tracked` writes the owning
  process id into the server's folder and the first server of a later
  session stops servers and removes folders whose owner is gone
  (:func:`reap_stale_servers`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Protocol, TypeVar

import pytest

from tests.harness.certs import TestCA
from tests.harness.mariadb import MariaDBServer
from tests.harness.postgres import PostgresServer
from tests.harness.redis import RedisServer

__all__ = [
    "close_all_servers",
    "fixture_mariadb_server",
    "fixture_postgres_server",
    "fixture_redis_server",
    "fixture_test_ca",
    "reap_stale_servers",
    "tracked",
]

#: Name of the file holding the owning process id in a server's folder.
OWNER_FILE = "owner.pid"
#: Per folder prefix: the server's pid file, its process name, the signal that stops it.
_STALE_KINDS: dict[str, tuple[str, str, signal.Signals]] = {
    "appliance-pg-": ("data/postmaster.pid", "postgres", signal.SIGQUIT),
    "appliance-mariadb-": ("mariadbd.pid", "mariadbd", signal.SIGKILL),
    "appliance-redis-": ("redis.pid", "redis-server", signal.SIGKILL),
    "appliance-ca-": ("", "", signal.SIGKILL),
}


class _Server(Protocol):
    """A harness server: a temporary folder and an idempotent ``close()``."""

    @property
    def base_dir(self) -> Path:
        """The server's temporary folder."""

    def close(self) -> None:
        """Stop the server and remove its folder."""


_T = TypeVar("_T", bound=_Server)
_live: list[_Server] = []
_state = {"reaped": False, "sigterm": False}


def tracked(server: _T) -> _T:
    """Register ``server`` for cleanup at exit or SIGTERM and mark its folder as ours."""
    _live.append(server)
    _write_owner(server.base_dir)
    _install_sigterm_handler()
    return server


def close_all_servers() -> None:
    """Close every tracked server, newest first, ignoring errors; safe to call twice."""
    while _live:
        server = _live.pop()
        try:
            server.close()
        except Exception:  # noqa: BLE001, S110 - best effort while exiting
            pass


atexit.register(close_all_servers)


def reap_stale_servers() -> list[Path]:
    """Stop servers and remove folders left by dead harness sessions; return the folders.

    Only folders with an owner file naming a process that no longer exists
    are touched, and a pid file's process is signalled only if its name is
    the expected server's. Unless running as root, other users' folders
    are skipped.
    """
    reaped = []
    me = os.geteuid()
    for parent in {Path("/tmp"), Path(tempfile.gettempdir())}:
        for prefix, (pid_file, name, stop_signal) in _STALE_KINDS.items():
            for folder in parent.glob(prefix + "*"):
                if me != 0 and _folder_owner(folder) != me:
                    continue
                owner = _read_pid(folder / OWNER_FILE)
                if owner is None or _pid_alive(owner):
                    continue
                server_pid = _read_pid(folder / pid_file) if pid_file else None
                if server_pid is not None and _process_name(server_pid) == name:
                    try:
                        os.kill(server_pid, stop_signal)
                    except OSError:
                        pass
                shutil.rmtree(folder, ignore_errors=True)
                reaped.append(folder)
    return reaped


def _reap_once() -> None:
    """Run :func:`reap_stale_servers` the first time a session starts a server."""
    if not _state["reaped"]:
        _state["reaped"] = True
        reap_stale_servers()


def _install_sigterm_handler() -> None:
    """Close the servers on SIGTERM, unless someone else already handles SIGTERM."""
    if _state["sigterm"] or threading.current_thread() is not threading.main_thread():
        return
    _state["sigterm"] = True
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        close_all_servers()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def _write_owner(folder: Path) -> None:
    """Record this process as the owner of ``folder``."""
    try:
        (folder / OWNER_FILE).write_text(f"{os.getpid()}\n")
    except OSError:
        pass


def _folder_owner(folder: Path) -> int | None:
    """The user id owning ``folder``, or ``None`` if it is gone."""
    try:
        return folder.stat().st_uid
    except OSError:
        return None


def _read_pid(path: Path) -> int | None:
    """The process id on the first line of ``path``, or ``None``."""
    try:
        return int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z"


def _process_name(pid: int) -> str:
    """The kernel's short name of a process (``/proc/<pid>/comm``), or ``""``."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _serve(server: _T) -> Iterator[_T]:
    """Yield a tracked server and close it afterwards."""
    tracked(server)
    try:
        yield server
    finally:
        server.close()
        if server in _live:
            _live.remove(server)


@pytest.fixture(scope="session", name="test_ca")
def fixture_test_ca() -> Iterator[TestCA]:
    """A test certificate authority whose files live in a session temp folder."""
    directory = Path(tempfile.mkdtemp(prefix="appliance-ca-"))
    _write_owner(directory)
    try:
        yield TestCA(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres_server")
def fixture_postgres_server(test_ca: TestCA) -> Iterator[PostgresServer]:
    """A PostgreSQL server (TLS by ``test_ca``, logical WAL, role ``appliance``)."""
    _reap_once()
    yield from _serve(PostgresServer(ca=test_ca))


@pytest.fixture(scope="session", name="mariadb_server")
def fixture_mariadb_server() -> Iterator[MariaDBServer]:
    """A MariaDB server with a password user and database ``appliance``."""
    _reap_once()
    yield from _serve(MariaDBServer())


@pytest.fixture(scope="session", name="redis_server")
def fixture_redis_server() -> Iterator[RedisServer]:
    """A Redis server without a password and without persistence."""
    _reap_once()
    yield from _serve(RedisServer())
