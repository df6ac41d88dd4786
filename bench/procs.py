"""
Child processes that cannot outlive the run: servers in their own session
with a parent-death signal, stopped by process group with a bounded wait,
optionally pinned to CPUs; and the sweep after a run that was killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from bench.common import BenchError, warn

_PR_SET_PDEATHSIG = 1
_libc: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)

_SPAWNED_GROUPS: set[int] = set()
"""Process groups of the servers this run started, for L{CpuMeter}."""


def die_with_parent() -> None:
    """In the child, before exec: die with the harness, even on SIGKILL."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(command: Sequence[str], *, output: IO[bytes] | int | None = None,
          cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """
    Start a server process in its own session (Ctrl-C on the terminal reaches
    only the harness, which stops it in order) that is killed if the harness
    dies.
    """
    process = subprocess.Popen(
        list(command), stdin=subprocess.DEVNULL, stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        cwd=cwd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    _SPAWNED_GROUPS.add(process.pid)  # its own session: its pid is its group
    return process


def spawned_groups() -> set[int]:
    """The process groups of the servers this run started."""
    return set(_SPAWNED_GROUPS)


def stop_process(process: subprocess.Popen[bytes], *, signum: int = signal.SIGTERM,
                 timeout: float = 15.0) -> int | None:
    """
    Send C{signum} to the process's group, wait up to C{timeout}, then
    SIGKILL the group. Returns the exit status (None if it never exited).
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            warn(f"pid {process.pid} ignored signal {signum} for {timeout:.0f}s: killing it")
    # Kill whatever is left in the group (e.g. nginx workers), then reap.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        return process.wait(5)
    except subprocess.TimeoutExpired:
        return None


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               process: subprocess.Popen[bytes] | None = None,
               log: Path | None = None) -> None:
    """Poll C{check} until true; fail early if C{process} exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what}: the process exited ({process.returncode})"
                             + _log_tail(log))
        time.sleep(0.05)
    raise BenchError(f"{what}: not ready within {timeout:.0f}s" + _log_tail(log))


def _log_tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log.name} ---\n" + "\n".join(tail)


def require_binary(name: str) -> str:
    """The path of C{name}, also looking in the sbin folders (nginx lives there)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        raise BenchError(f"{name} is not installed")
    return found


def add_pin_argument(parser: Any) -> None:
    """C{--pin}: load generator on CPU 0, servers on CPU 1 (off by default)."""
    parser.add_argument("--pin", action="store_true",
                        help="pin the load generator to CPU 0 and the servers to CPU 1 "
                             "with taskset (default: let the kernel schedule)")


def cpu_plan(pin: bool) -> tuple[str | None, str | None]:
    """(server CPUs, load generator CPUs) for taskset; (None, None) unpinned."""
    if not pin:
        return None, None
    if (os.cpu_count() or 1) < 2:
        raise BenchError("--pin needs at least 2 CPUs")
    return "1", "0"


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """C{command} run under C{taskset -c CPUS} when C{cpus} is given."""
    if not cpus:
        return list(command)
    return [require_binary("taskset"), "-c", cpus, *command]


_OWNED = re.compile(r"^bench-[a-z]+-(\d+)-")


def _alive(pid: int) -> bool:
    """Whether C{pid} runs; a zombie (killed, not yet reaped) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def sweep_leftovers() -> None:
    """
    Clean up after an earlier run that was killed with SIGKILL (no cleanup
    ran): its servers died with it (see L{die_with_parent}) except nginx's
    worker, which outlives its master. Such leftovers are found by their
    working folder, a temp folder whose owner pid is gone; they are killed
    and the folder removed.
    """
    stale = []
    for folder in Path(tempfile.gettempdir()).glob("bench-*"):
        owner = _OWNED.match(folder.name)
        if owner and folder.is_dir() and not _alive(int(owner.group(1))):
            stale.append(str(folder.resolve()))
    if not stale:
        return
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if any(cwd == path or cwd.startswith(path + "/") for path in stale):
            warn(f"killing pid {proc.name}, left running by a killed run (cwd {cwd})")
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
