"""
The machine: the Debian packages the peers come from, a description for the
record, and how busy the CPUs are (other work skews every figure).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError, say, warn
from bench.procs import spawned_groups

PACKAGES = ("nginx", "wrk", "haproxy", "pgbouncer")
"""Every Debian package some benchmark's peer or load generator comes from."""

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
"""Exits 101 while packages install, so their scripts start no daemon."""


def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and "install ok installed" in result.stdout


def ensure_packages(packages: Sequence[str]) -> None:
    """
    Install the missing ones among C{packages} with apt-get (as root, or via
    sudo), with --no-install-recommends, and without letting their package
    scripts start daemons (a temporary policy-rc.d when none exists).
    """
    if shutil.which("dpkg-query") is None:
        raise BenchError("not a Debian system: install " + ", ".join(packages) + " by hand")
    missing = [package for package in packages if not _installed(package)]
    if not missing:
        return
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise BenchError(f"need root or sudo to install {', '.join(missing)}")
        sudo = ["sudo"]
    say(f"installing Debian packages: {' '.join(missing)}")
    policy = POLICY_RC_D
    created = False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        if not policy.exists():
            subprocess.run([*sudo, "sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {policy} "
                            f"&& chmod 755 {policy}"], check=True, timeout=30)
            created = True
        for command in (["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
            result = subprocess.run([*sudo, *command], env=env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise BenchError(f"{' '.join(command[:2])} failed (exit {result.returncode}):\n"
                                 + (result.stdout + result.stderr)[-3000:])
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"package installation timed out: {error.cmd}") from error
    finally:
        if created:
            subprocess.run([*sudo, "rm", "-f", str(policy)], timeout=30)
    still = [package for package in missing if not _installed(package)]
    if still:
        raise BenchError(f"packages still missing after apt-get: {', '.join(still)}")


def machine() -> str:
    """A one-line description of this machine, for the record."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{platform.node()}: {os.cpu_count()} cores{', ' + model if model else ''}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def version_of(command: Sequence[str]) -> str:
    """The first line a C{--version}-like command prints (stdout or stderr)."""
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU the machine used over C{seconds}."""
    busy_before, total_before = _cpu_times()
    time.sleep(seconds)
    busy_after, total_after = _cpu_times()
    elapsed = total_after - total_before
    if elapsed <= 0:
        return 0.0
    return (busy_after - busy_before) / elapsed * (os.cpu_count() or 1)


def check_quiet(limit: float = 0.25) -> None:
    """Measure the machine for a second before the run and warn if it is
    busy: other work skews every figure (the load average would also count
    the previous benchmark run)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        busy = busy_cores()
        say(f"machine before the run: {busy:.2f} of {os.cpu_count()} cores busy")
        if busy > limit:
            warn(f"{busy:.2f} cores were busy before the run: other work on this machine "
                 f"makes the figures noisy")


def _group_ticks(groups: set[int]) -> int:
    """CPU ticks used so far by the live processes in C{groups}."""
    ticks = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state ppid pgrp ... utime(11) stime(12)
        if len(fields) > 12 and int(fields[2]) in groups:
            ticks += int(fields[11]) + int(fields[12])
    return ticks


def _own_ticks() -> float:
    """CPU ticks of this process and its reaped children (wrk)."""
    own = os.times()
    return (own.user + own.system + own.children_user + own.children_system) * _HZ


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class CpuMeter:
    """
    Splits the machine's CPU use over one measured run into ours (the servers
    this run started, the load generator, the harness) and other work, so a
    round disturbed by something else on the machine shows.
    """

    _busy: int = 0
    _total: int = 0
    _ours: float = 0.0

    def start(self) -> None:
        self._busy, self._total = _cpu_times()
        self._ours = _group_ticks(spawned_groups()) + _own_ticks()

    def other_cores(self) -> float:
        """Cores' worth of CPU used by other work since L{start}."""
        busy, total = _cpu_times()
        ours = _group_ticks(spawned_groups()) + _own_ticks()
        cores = total - self._total
        if cores <= 0:
            return 0.0
        wall = cores / (os.cpu_count() or 1)  # ticks of one CPU
        other = (busy - self._busy) - (ours - self._ours)
        return max(0.0, other / wall)
