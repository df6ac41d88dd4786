"""
The twistd plugin's options and service maker: C{twistd -n appliance}.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from appliance.cli import describe_config, report_config_error
from appliance.host.build import build_appliance
from appliance.host.config import EX_CONFIG, load_config
from appliance.host.ini import ConfigError
from appliance.host.plugin import discover_plugins
from appliance.host.sdnotify import Notifier
from appliance.host.service import ApplianceService

DEFAULT_CONFIG = "/etc/appliance/appliance.ini"

_OBSERVERS = {
    "json": "appliance.host.logs.json_observer",
    "text": "appliance.host.logs.text_observer",
}


class Options(usage.Options):
    """Command line of C{twistd appliance}."""

    synopsis = "[--config FILE] [--check] [--log-format json|text|auto]"
    longdesc = ("Run the appliance: every service enabled in the config, one "
                "reactor, one admin port.")
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The ini file to run."],
        ["log-format", None, "auto",
         "json (one object per line), text, or auto (text on a terminal)."],
    ]
    optFlags = [["check", None, "Validate the config and exit (78 when invalid)."]]

    def postOptions(self) -> None:
        if self["log-format"] not in ("json", "text", "auto"):
            raise usage.UsageError("--log-format must be json, text or auto")
        parent = getattr(self, "parent", None)
        # Unless --logger was given, twistd logs through our redacting
        # observer: set it here, before twistd builds its logger.
        if parent is not None and not parent.get("logger"):
            fmt = self["log-format"]
            if fmt == "auto":
                fmt = "text" if sys.stdout.isatty() else "json"
            parent["logger"] = _OBSERVERS[fmt]


def makeService(options: Options, reactor: Any = None) -> ApplianceService:
    """
    Validate the config and build the appliance; exit 78 when invalid.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    plugins = discover_plugins()
    try:
        config = load_config(options["config"], plugins)
    except ConfigError as error:
        report_config_error(error, sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    if options["check"]:
        print(describe_config(config))
        raise SystemExit(0)
    root = build_appliance(config, reactor, plugins=plugins, notifier=Notifier(),
                           exit_on_start_failure=True)
    reactor.callWhenRunning(root.install_signal_handlers)
    return root
