"""Tests for the ini value converters."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.host.values import (
    in_range,
    one_of,
    parse_bool,
    parse_duration,
    parse_endpoint,
    parse_int,
    parse_list,
    parse_size,
    resolve_secret,
)


@pytest.mark.parametrize("text,seconds", [
    ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1.5h", 5400.0), ("2d", 172800.0),
    (" 10s ", 10.0),
])
def test_durations(text: str, seconds: float) -> None:
    """Durations with a unit convert to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "s", "-1s", "1x", "", "1 0s", "1e3s"])
def test_bad_durations(text: str) -> None:
    """A duration without a known unit is refused with what was expected."""
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text,size", [
    ("512", 512), ("512B", 512), ("16KiB", 16384), ("10MiB", 10 * 1024**2),
    ("1GiB", 1024**3), ("2kB", 2000), ("1.5MiB", 1572864),
])
def test_sizes(text: str, size: int) -> None:
    """Sizes convert to bytes with binary and decimal units."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "5 TiB", "-1", "1mib"])
def test_bad_sizes(text: str) -> None:
    """An unknown size is refused."""
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


def test_bools_and_lists() -> None:
    """Booleans accept the usual words; lists split on commas and newlines."""
    assert parse_bool("Yes") is True and parse_bool("off") is False
    with pytest.raises(ValueError, match="true or false"):
        parse_bool("maybe")
    assert parse_list("a, b,,c\n d") == ("a", "b", "c", "d")
    assert parse_list("") == ()


def test_numbers_and_choices() -> None:
    """Integers, ranges and choices explain what they expected."""
    assert parse_int(" 42 ") == 42
    with pytest.raises(ValueError, match="an integer"):
        parse_int("4.2")
    bounded = in_range(parse_int, 1, 10)
    assert bounded("10") == 10
    with pytest.raises(ValueError, match="at most 10"):
        bounded("11")
    with pytest.raises(ValueError, match="at least 1"):
        bounded("0")
    assert one_of("json", "text")("JSON") == "json"
    with pytest.raises(ValueError, match="one of json, text"):
        one_of("json", "text")("xml")


@pytest.mark.parametrize("text", [
    "tcp:8080:interface=127.0.0.1", "tcp:0", "unix:/tmp/x.sock",
    "systemd:domain=INET:index=0", "systemd:domain=INET6:name=web",
])
def test_endpoints(text: str) -> None:
    """Valid endpoint strings pass, systemd ones without socket activation too."""
    assert parse_endpoint(text) == text


@pytest.mark.parametrize("text", [
    "tcp:notaport", "nosuchtype:1", "systemd:domain=INET", "systemd:domain=FOO:index=0",
    "", "tcp:8080:bogus=1",
])
def test_bad_endpoints(text: str) -> None:
    """Endpoint strings that do not parse are refused at load."""
    with pytest.raises(ValueError, match="expected"):
        parse_endpoint(text)


def test_secret_from_env() -> None:
    """${env:NAME} resolves; the Secret's repr shows only the reference."""
    secret = resolve_secret("${env:SOME_TOKEN}", {"SOME_TOKEN": "s3cr3t-value"})
    assert secret.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in str(secret)
    assert secret.matches("s3cr3t-value") and not secret.matches("s3cr3t-valuE")


def test_secret_errors(tmp_path: os.PathLike[str]) -> None:
    """Literal secrets, missing variables and loose file modes are refused."""
    with pytest.raises(ValueError, match="secret reference"):
        resolve_secret("hunter2")
    with pytest.raises(ValueError, match="MISSING_X is not set"):
        resolve_secret("${env:MISSING_X}", {})
    path = os.path.join(tmp_path, "token")
    with open(path, "w") as handle:
        handle.write("file-secret-value\n")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="group or others"):
        resolve_secret(f"file:{path}")
    os.chmod(path, 0o600)
    assert resolve_secret(f"file:{path}").reveal() == "file-secret-value"
    with pytest.raises(ValueError, match="cannot read secret file"):
        resolve_secret(f"file:{path}.missing")


@given(st.text(max_size=40))
def test_converters_only_raise_value_error(text: str) -> None:
    """Any text gives a value or a ValueError, never another exception."""
    for convert in (parse_duration, parse_size, parse_bool, parse_int, parse_endpoint,
                    parse_list):
        try:
            convert(text)
        except ValueError:
            pass
