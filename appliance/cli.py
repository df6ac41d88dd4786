"""
The C{appliance} command: operator tools that run without the reactor
(C{check-config}, C{audit-verify}, C{secrets}).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from appliance.host.config import EX_CONFIG, ApplianceConfig, load_config
from appliance.host.ini import ConfigError
from appliance.host.plugin import discover_plugins


def report_config_error(error: ConfigError, stream: TextIO) -> None:
    """Print every problem, one per line, then a count."""
    for problem in error.problems:
        print(f"error: {problem}", file=stream)
    count = len(error.problems)
    print(f"{count} problem{'s' if count != 1 else ''} found; nothing was started",
          file=stream)


def describe_config(config: ApplianceConfig) -> str:
    """One line summarising a valid config."""
    services = ", ".join(s.name for s in config.services) or "none"
    return (f"{config.path}: OK ({len(config.files)} file(s); "
            f"services: {services}; admin: {config.admin.listen})")


def check_config(path: str) -> int:
    """Validate C{path}; print the result; return the exit status."""
    try:
        config = load_config(path, discover_plugins())
    except ConfigError as error:
        report_config_error(error, sys.stderr)
        return EX_CONFIG
    print(describe_config(config))
    return 0


def audit_verify(paths: Sequence[str]) -> int:
    """Verify audit log files; print the result; return 0, 1 (damaged) or 2 (unreadable)."""
    from appliance.host.audit_verify import verify

    result = verify(paths)
    if result.ok:
        print(result.describe())
        for note in result.notes:
            print(f"note: {note}")
    else:
        print(result.describe(), file=sys.stderr)
    return result.exit_status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Operator tools for the appliance. Run the appliance itself "
                    "with: twistd -n appliance --config FILE",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", metavar="FILE")
    audit = commands.add_parser(
        "audit-verify", help="check the hash chain of audit log files (any order)")
    audit.add_argument("files", metavar="FILE", nargs="+")
    secrets = commands.add_parser(
        "secrets", help="manage the secret proxy's encrypted secret store "
                        "(init, put, rotate, delete, list, verify; values from stdin)",
        add_help=False)
    secrets.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the C{appliance} console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["secrets"]:  # its own parser, options and help
        from appliance.secretproxy.secrets.cli import main as secrets_main

        return secrets_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "audit-verify":
        return audit_verify(args.files)
    raise AssertionError(args.command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
