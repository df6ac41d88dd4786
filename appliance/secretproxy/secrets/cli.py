"""
Manage the encrypted store file: C{appliance secrets COMMAND}.

    init             create the key file (if missing) and an empty store
    put NAME         add a secret; the value is read from stdin
    rotate NAME      replace a secret's value (stdin) and bump its version
    list             names, versions and dates (never values)
    delete NAME      remove a secret
    verify           check that every entry decrypts with the key

Options (before or after the command): C{--store PATH}, C{--key-file PATH}.
Values never come from the command line (it ends up in shell history and
C{ps}); extra arguments are refused without being echoed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from appliance.secretproxy.secrets.base import MAX_VALUE, SecretStoreError
from appliance.secretproxy.secrets.crypto import load_key_file, new_key_file
from appliance.secretproxy.secrets.filestore import (
    DEFAULT_KEY_FILE,
    DEFAULT_STORE_PATH,
    StoreFile,
)

PROG = "appliance secrets"


class _Parser(argparse.ArgumentParser):
    """An argument parser that never echoes unexpected arguments (a pasted value)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message = ("unexpected extra arguments (secret values are read from stdin, "
                       "never from the command line)")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The parser of C{appliance secrets}."""
    common = _Parser(add_help=False)
    common.add_argument("--store", default=argparse.SUPPRESS,
                        help=f"the store file (default {DEFAULT_STORE_PATH})")
    common.add_argument("--key-file", default=argparse.SUPPRESS,
                        help=f"the key file (default {DEFAULT_KEY_FILE})")
    parser = _Parser(prog=PROG, parents=[common],
                     description="Manage the appliance's encrypted secret store file.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("init", parents=[common],
                        help="create the key file (if missing) and an empty store")
    for name, text in (("put", "add a secret (value from stdin)"),
                       ("rotate", "replace a secret's value (stdin), bumping its version"),
                       ("delete", "remove a secret")):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("name", help="the secret's name")
    commands.add_parser("list", parents=[common],
                        help="names, versions and update times (never values)")
    commands.add_parser("verify", parents=[common],
                        help="check that every entry decrypts with the key")
    return parser


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failed, 2 usage)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        options = build_parser().parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    store_path = getattr(options, "store", DEFAULT_STORE_PATH)
    key_path = getattr(options, "key_file", DEFAULT_KEY_FILE)
    try:
        return _run(options.command, getattr(options, "name", None), store_path, key_path,
                    stdin, stdout)
    except (SecretStoreError, ValueError, OSError) as error:
        print(f"{PROG}: error: {_message(error)}", file=stderr)
        return 1


def _run(command: str, name: str | None, store_path: str, key_path: str,
         stdin: TextIO, stdout: TextIO) -> int:
    if command == "init":
        if os.path.exists(store_path):
            raise ValueError(f"store file {store_path} already exists")
        if os.path.exists(key_path):
            key = load_key_file(key_path)
            print(f"using the existing key file {key_path}", file=stdout)
        else:
            key = new_key_file(key_path)
            print(f"created key file {key_path} (mode 0600; back it up apart from the "
                  "store)", file=stdout)
        StoreFile(store_path, key).create()
        print(f"created store file {store_path}", file=stdout)
        return 0
    store = StoreFile(store_path, load_key_file(key_path))
    if command == "list":
        entries = list(store.read().entries.values())
        width = max([len("NAME")] + [len(e.name) for e in entries])
        print(f"{'NAME':<{width}}  VERSION  UPDATED", file=stdout)
        for entry in sorted(entries, key=lambda e: e.name):
            print(f"{entry.name:<{width}}  {entry.version:>7}  {entry.updated_at}",
                  file=stdout)
        return 0
    if command == "verify":
        bad = store.verify()
        for failed in bad:
            print(f"{failed}: failed authentication", file=stdout)
        count = len(store.read().entries)
        print(f"{count - len(bad)} of {count} entries decrypt", file=stdout)
        return 1 if bad else 0
    assert name is not None
    if command == "delete":
        store.delete(name)
        print(f"deleted {name}", file=stdout)
        return 0
    value = _read_value(name, stdin)
    entry = store.put(name, value) if command == "put" else store.rotate(name, value)
    print(f"stored {name} version {entry.version}", file=stdout)
    return 0


def _read_value(name: str, stdin: TextIO) -> str:
    """The value from stdin (a prompt without echo on a terminal)."""
    if stdin.isatty():
        value = getpass.getpass(f"value for {name}: ")
        if getpass.getpass("again: ") != value:
            raise ValueError("the two values differ")
    else:
        value = stdin.read(MAX_VALUE + 3)
        if value.endswith("\n"):
            value = value[:-1]
            if value.endswith("\r"):
                value = value[:-1]
    if not value:
        raise ValueError("empty value on stdin")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("the value is not valid UTF-8") from None
    if size > MAX_VALUE:
        raise ValueError(f"value larger than {MAX_VALUE} bytes")
    return value


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
