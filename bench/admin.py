"""
admin: the appliance's admin C{/healthz} against nginx answering a static
C{return 200 "ok\\n";}, both on loopback, loaded alternately by wrk.

It measures the floor every HTTP service of the appliance stands on: one
twisted.web request/response on one reactor, with no work behind it.
"""

from __future__ import annotations

import argparse

from bench.common import Cleanup, Result, say
from bench.machine import version_of
from bench.procs import cpu_plan, require_binary
from bench.servers import start_appliance, start_nginx
from bench.wrk import Contender, add_wrk_arguments, side_by_side

NAME = "admin"
SUMMARY = "admin /healthz vs nginx static 'return 200' (wrk, req/s)"
PACKAGES = ("nginx", "wrk")

NGINX_LOCATIONS = """
    location / {
        default_type text/plain;
        return 200 "ok\\n";
    }
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_wrk_arguments(parser)


def run(args: argparse.Namespace) -> Result:
    server_cpus, load_cpus = cpu_plan(args.pin)
    say(f"peer: {version_of([require_binary('nginx'), '-v'])}; "
        f"load: {version_of([require_binary('wrk'), '-v'])}")
    with Cleanup() as cleanup:
        nginx = start_nginx(cleanup, NGINX_LOCATIONS, ready_path="/healthz", cpus=server_cpus)
        appliance = start_appliance(cleanup, cpus=server_cpus)
        say(f"nginx pid {nginx.process.pid}, appliance pid {appliance.process.pid}")
        return side_by_side(
            args, NAME,
            ours=Contender("admin", appliance.url("/healthz")),
            peer=Contender("nginx", nginx.url("/healthz")),
            wrk_cpus=load_cpus,
        )
