"""Tests for the sd_notify client against a real unix datagram socket."""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from appliance.host.sdnotify import Notifier


def listen(path: Path) -> socket.socket:
    """A datagram socket standing in for systemd's notify socket."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    return server


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    """READY, RELOADING and STOPPING arrive as KEY=value datagrams."""
    server = listen(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    notifier.ready()
    assert server.recv(4096) == b"READY=1\nSTATUS=serving"
    notifier.reloading()
    assert server.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    notifier.stopping()
    assert server.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    notifier.close()


def test_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    """WATCHDOG=1 is sent at once and every WATCHDOG_USEC/2."""
    server = listen(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000"})
    clock = Clock()
    notifier.start_watchdog(clock)
    assert server.recv(4096) == b"WATCHDOG=1"
    clock.advance(2.0)
    assert server.recv(4096) == b"WATCHDOG=1"
    notifier.close()
    assert not clock.getDelayedCalls()


def test_abstract_socket_and_disabled(tmp_path: Path) -> None:
    """An @name socket is the abstract namespace; without NOTIFY_SOCKET nothing is sent."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"appliance-test-{tmp_path.name}"
    server.bind("\0" + name)
    server.settimeout(2)
    Notifier({"NOTIFY_SOCKET": "@" + name}).ready("ok")
    assert server.recv(4096) == b"READY=1\nSTATUS=ok"
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.ready()
    quiet.start_watchdog(Clock())


def test_send_failure_is_logged_not_raised(tmp_path: Path) -> None:
    """A notify socket that went away does not break the service."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    with capturedLogs() as events:
        notifier.ready()
    notifier.close()
    assert [e["log_format"] for e in events] == ["sd_notify failed: {error}"]
