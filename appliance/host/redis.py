"""
The optional shared Redis connection.

txredisapi queues calls made while Redis is down and waits forever, so every
call goes through L{RedisLink.call}, which bounds it with a timeout. A PING
every second keeps C{state} honest for C{/status} and readiness; the lazy
connection reconnects on its own with backoff.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from appliance.host.config import RedisConfig


class RedisUnavailable(Exception):
    """
    A Redis call failed or timed out; the caller applies its fallback.
    """


class RedisLink(Service):
    """
    One lazy, reconnecting Redis connection shared by every service.
    """

    log = Logger()
    ping_interval = 1.0

    def __init__(self, config: RedisConfig, clock: Any) -> None:
        self.setName("redis")
        self.config = config
        self._clock = clock
        self._client: Any = None
        self.state = "connecting"
        self.last_error = ""
        self._ping = LoopingCall(self._check)
        self._ping.clock = clock
        self._listeners: list[Callable[[str], None]] = []

    def startService(self) -> None:
        """Open the lazy connection and start health checks."""
        Service.startService(self)
        # txredisapi imports the global reactor; import it only when used.
        import txredisapi

        self._client = txredisapi.lazyConnection(
            host=self.config.host,
            port=self.config.port,
            dbid=self.config.db,
            reconnect=True,
            password=(self.config.password.reveal() if self.config.password else None),
            connectTimeout=self.config.timeout,
            replyTimeout=self.config.timeout,
            convertNumbers=True,
        )
        self._ping.start(self.ping_interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        """Stop health checks and close the connection."""
        Service.stopService(self)
        if self._ping.running:
            self._ping.stop()
        client, self._client = self._client, None
        if client is not None:
            d = client.disconnect()
            if isinstance(d, Deferred):
                d.addErrback(lambda _: None)
                return d
        return None

    @property
    def up(self) -> bool:
        """Whether the last health check succeeded."""
        return self.state == "up"

    def on_state_change(self, listener: Callable[[str], None]) -> None:
        """Call C{listener(state)} whenever the state changes."""
        self._listeners.append(listener)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Call a txredisapi method, failing with L{RedisUnavailable} on any
        error or after the configured timeout.
        """
        if self._client is None:
            return _failed("redis link is not running")
        try:
            d = getattr(self._client, method)(*args, **kwargs)
        except Exception as error:
            return _failed(f"redis {method} failed: {error}")
        d.addTimeout(self.config.timeout, self._clock)

        def translate(failure: Any) -> None:
            if failure.check(TimeoutError):
                raise RedisUnavailable(f"redis {method} timed out")
            raise RedisUnavailable(f"redis {method} failed: {failure.getErrorMessage()}")

        d.addErrback(translate)
        return d

    def _check(self) -> Deferred[None]:
        d = self.call("ping")
        d.addCallbacks(lambda _: self._set_state("up", ""),
                       lambda f: self._set_state("down", f.getErrorMessage()))
        return d

    def _set_state(self, state: str, error: str) -> None:
        self.last_error = error
        if state == self.state:
            return
        previous, self.state = self.state, state
        if state == "up":
            self.log.info("redis at {address} is up", address=self.config.address)
        else:
            self.log.warn("redis at {address} is {state}: {error}",
                          address=self.config.address, state=state, error=error)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                self.log.failure("redis state listener failed (was {previous})",
                                 previous=previous)

    def status(self) -> dict[str, Any]:
        """JSON-ready state for C{/status}."""
        return {"state": self.state, "address": self.config.address,
                "required": self.config.required, "error": self.last_error}


def _failed(message: str) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(RedisUnavailable(message))
    return d
