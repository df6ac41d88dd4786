"""
The contract between the host and a service, and how services are found.

A service is a Twisted plugin providing L{IServicePlugin}: drop a module
declaring one into a C{twisted/plugins/} folder on C{sys.path} and the host
finds it. Plugin objects are cheap (L{ServicePlugin} imports the service's
module only when its section is present), because plugin discovery imports
every drop-in module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from attrs import field, frozen
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from appliance.host.ini import Section
    from appliance.host.runtime import Runtime


@frozen
class Readiness:
    """
    Whether a service can take traffic now, and if not, why.
    """

    ready: bool
    reason: str = ""


READY = Readiness(True)


class IServicePlugin(Interface):
    """
    A service the appliance can host.
    """

    name = Attribute("The ini section the service owns, e.g. 'pow'.")
    order = Attribute(
        "Start position (int): lower starts earlier and stops later."
    )
    description = Attribute("One line saying what the service does.")

    def parse(section: Section) -> Any:
        """
        Validate the service's section (and its C{[name.kind:label]}
        children) into a frozen config object. Record problems on the
        section (C{section.get} does that) rather than raising.
        """

    def build(config: Any, runtime: Runtime) -> IHostedService:
        """
        Return the service for C{config}, not yet started.
        """


class IHostedService(IService):
    """
    A service the host can start, drain, probe and reload.

    C{startService} binds every listener synchronously and raises if one
    cannot be bound. Dependencies that come and go (upstreams, Redis) are
    reported through L{readiness}, never by failing the start.
    """

    def readiness() -> Readiness:
        """Whether the service can take traffic now."""

    def status() -> dict[str, Any]:
        """JSON-ready details for C{/status}: listeners, dependencies."""

    def stop_listening() -> Deferred[None]:
        """Stop accepting new connections; live ones carry on."""

    def drain(timeout: float) -> Deferred[None]:
        """
        Let in-flight work finish for up to C{timeout} seconds, close what
        remains, flush what the service owes, and release its resources.
        """

    def reload(config: Any) -> Deferred[None] | None:
        """
        Apply a new config without dropping in-flight work; raise
        L{ReloadNotSupported} for changes that need a restart.
        """


class ReloadNotSupported(Exception):
    """
    The service cannot apply this config change without a restart.
    """


@implementer(IPlugin, IServicePlugin)
@frozen
class ServicePlugin:
    """
    A lazy service plugin: C{module} provides C{parse} and C{build}.
    """

    name: str
    module: str
    order: int
    description: str
    _loaded: list[ModuleType] = field(factory=list, eq=False, repr=False)

    def _module(self) -> ModuleType:
        if not self._loaded:
            self._loaded.append(importlib.import_module(self.module))
        return self._loaded[0]

    def parse(self, section: Section) -> Any:
        """Delegate to the service module's C{parse}."""
        return self._module().parse(section)

    def build(self, config: Any, runtime: Runtime) -> IHostedService:
        """Delegate to the service module's C{build}."""
        return self._module().build(config, runtime)  # type: ignore[no-any-return]


def discover_plugins(package: ModuleType | None = None) -> list[IServicePlugin]:
    """
    Find every L{IServicePlugin}, ordered by C{(order, name)}.

    Raises L{ValueError} when two plugins claim the same section.
    """
    found = list(getPlugins(IServicePlugin, package))
    names: dict[str, IServicePlugin] = {}
    for plugin in found:
        if plugin.name in names or plugin.name in RESERVED_SECTIONS:
            raise ValueError(f"two services claim the section [{plugin.name}]")
        names[plugin.name] = plugin
    return sorted(found, key=lambda plugin: (plugin.order, plugin.name))


RESERVED_SECTIONS = frozenset({"appliance", "admin", "audit"})
