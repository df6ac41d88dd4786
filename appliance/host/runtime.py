"""
What the host shares with every service: handed over, never global.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import frozen
from prometheus_client import CollectorRegistry
from twisted.logger import Logger

if TYPE_CHECKING:
    from appliance.host.audit import AuditLog
    from appliance.host.redis import RedisLink
    from appliance.host.tls_registry import TLSRegistry


@frozen
class Runtime:
    """
    The shared things a service may use.

    @ivar reactor: the reactor (TCP, SSL, UNIX, time, threads).
    @ivar clock: the L{IReactorTime} to schedule with (the reactor, or a
        L{twisted.internet.task.Clock} in tests).
    @ivar metrics: the registry every metric is registered in.
    @ivar redis: the shared Redis link, or None when none is configured.
    @ivar log: the host's logger; services make their own with a namespace.
    @ivar shutdown_timeout: how long draining may take, in seconds.
    @ivar tls: the named TLS contexts (C{[tls:NAME]}, C{[tls-client:NAME]}).
    @ivar audit: the tamper-evident audit log (C{[audit]}), or None.
    """

    reactor: Any
    clock: Any
    metrics: CollectorRegistry
    redis: RedisLink | None
    log: Logger
    shutdown_timeout: float
    tls: TLSRegistry
    audit: AuditLog | None = None
