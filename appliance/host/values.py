"""
Converters for ini values: durations, sizes, booleans, lists, integers,
endpoint strings and secret references.

Each converter takes the raw text and returns the typed value, or raises
L{ValueError} whose message says what was expected; the config reader adds
file, section and key.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping

from twisted.internet.endpoints import serverFromString

from appliance.host.redact import remember_secret
from appliance.host.secret import Secret

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})

_ENV_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
_FILE_REF = "file:"


def parse_duration(text: str) -> float:
    """
    Parse C{250ms}, C{30s}, C{5m}, C{1.5h} or C{2d} into seconds.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"expected a duration such as 250ms, 30s, 5m or 1h, got {text!r}"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    """
    Parse C{512}, C{16KiB}, C{10MiB} or C{1GB} into a number of bytes.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"expected a size such as 512B, 16KiB, 10MiB or 1GiB, got {text!r}"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_bool(text: str) -> bool:
    """
    Parse true/false, yes/no, on/off, 1/0 (any case).
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_list(text: str) -> tuple[str, ...]:
    """
    Parse a comma- or newline-separated list; blank items are dropped.
    """
    items = re.split(r"[,\n]", text)
    return tuple(item.strip() for item in items if item.strip())


def parse_int(text: str) -> int:
    """
    Parse a decimal integer.
    """
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def parse_float(text: str) -> float:
    """
    Parse a decimal number.
    """
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def in_range(
    convert: Callable[[str], int | float],
    low: float | None = None,
    high: float | None = None,
) -> Callable[[str], int | float]:
    """
    Wrap a numeric converter so values outside C{[low, high]} are refused.
    """

    def checked(text: str) -> int | float:
        value = convert(text)
        if low is not None and value < low:
            raise ValueError(f"expected at least {low}, got {text.strip()!r}")
        if high is not None and value > high:
            raise ValueError(f"expected at most {high}, got {text.strip()!r}")
        return value

    return checked


def one_of(*choices: str) -> Callable[[str], str]:
    """
    Build a converter accepting only the given words (case-insensitive).
    """

    def checked(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return lowered

    return checked


_SYSTEMD_ENDPOINT = re.compile(
    r"^systemd:domain=(INET|INET6|UNIX):(index=\d+|name=[A-Za-z0-9_.:-]+)$"
)


def parse_endpoint(text: str) -> str:
    """
    Validate a Twisted server endpoint string and return it stripped.

    C{systemd:} endpoints are only checked for syntax: their descriptors
    exist only when systemd started us, and C{check-config} runs without them.
    """
    description = text.strip()
    if description.startswith("systemd:"):
        if _SYSTEMD_ENDPOINT.match(description) is None:
            raise ValueError(
                "expected systemd:domain=INET|INET6|UNIX:index=N (or name=NAME), "
                f"got {description!r}"
            )
        return description
    try:
        # Parsing builds an endpoint object without touching the reactor.
        serverFromString(_NO_REACTOR, description)
    except Exception as error:
        raise ValueError(
            "expected a Twisted endpoint such as tcp:8080:interface=127.0.0.1 "
            f"or unix:/run/appliance.sock, got {description!r} ({error})"
        ) from None
    return description


_NO_REACTOR = object()


def resolve_secret(text: str, environ: Mapping[str, str] | None = None,
                   base: str | None = None) -> Secret:
    """
    Resolve a secret reference: C{${env:NAME}} or C{file:/path}.

    Literal values are refused so that no secret ever sits in an ini file.
    A secret file must not be readable or writable by group or others; a
    relative path is taken from C{base} (the config file's folder).
    """
    environ = os.environ if environ is None else environ
    reference = text.strip()
    env_match = _ENV_REF.match(reference)
    if env_match is not None:
        name = env_match.group(1)
        if name not in environ:
            raise ValueError(f"environment variable {name} is not set")
        value = environ[name]
    elif reference.startswith(_FILE_REF):
        path = reference[len(_FILE_REF) :]
        if base is not None and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(base, path))
        value = _read_secret_file(path)
    else:
        raise ValueError(
            "expected a secret reference ${env:NAME} or file:/path; "
            "secrets are never written into the config itself"
        )
    if not value:
        raise ValueError(f"the secret referenced by {reference} is empty")
    remember_secret(value)
    return Secret(reference=reference, value=value)


def _read_secret_file(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError as error:
        raise ValueError(f"cannot read secret file {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"secret file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ValueError(
            f"secret file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read secret file {path}: {error}") from None
