"""
The systemd notification protocol (sd_notify) without a dependency: one
datagram per state change to the socket named by C{$NOTIFY_SOCKET}.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Notifier:
    """
    Sends READY, RELOADING, STOPPING, STATUS and WATCHDOG messages to
    systemd; does nothing when C{NOTIFY_SOCKET} is unset.
    """

    log = Logger()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self._address = address or None
        self._socket: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(environ)
        self._watchdog: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications."""
        return self._address is not None

    def send(self, **fields: str | int) -> None:
        """
        Send C{KEY=value} lines; errors are logged, never raised.
        """
        if self._address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode("utf-8"), self._address)
        except OSError as error:
            self.log.warn("sd_notify failed: {error}", error=str(error))

    def ready(self, status: str = "serving") -> None:
        """All listeners are bound."""
        self.send(ready=1, status=status)

    def reloading(self) -> None:
        """A reload began; L{ready} ends it."""
        self.send(reloading=1, monotonic_usec=time.monotonic_ns() // 1000)

    def stopping(self) -> None:
        """Shutdown began."""
        self.send(stopping=1, status="draining")

    def start_watchdog(self, clock: object) -> None:
        """
        Ping the watchdog at half the interval systemd gave us, if any.
        """
        if self._address is None or self.watchdog_interval is None:
            return
        self._watchdog = LoopingCall(self.send, watchdog=1)
        self._watchdog.clock = clock  # type: ignore[assignment]
        self._watchdog.start(self.watchdog_interval / 2, now=True)

    def stop_watchdog(self) -> None:
        """Stop pinging the watchdog."""
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None

    def close(self) -> None:
        """Stop the watchdog and close the socket."""
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
