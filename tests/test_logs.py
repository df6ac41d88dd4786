"""Tests for the log observers, the redaction step and correlation IDs."""

from __future__ import annotations

import io
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel, LogPublisher

from appliance.host.logs import (
    RedactingLineObserver,
    correlated,
    correlation_id_from,
    new_correlation_id,
)
from appliance.host.redact import MASK, redact, remember_secret


def emit(json_lines: bool, format: str, **fields: object) -> str:
    """Log one event through a RedactingLineObserver and return its line."""
    stream = io.StringIO()
    publisher = LogPublisher(RedactingLineObserver(stream, json_lines))
    Logger(namespace="test", observer=publisher).info(format, **fields)
    return stream.getvalue()


def test_json_lines_are_flat_objects() -> None:
    """Each event is one JSON object with time, level, namespace, message and fields."""
    line = emit(True, "served {count} quotes", count=3)
    record = json.loads(line)
    assert line.endswith("\n") and line.count("\n") == 1
    assert record["message"] == "served 3 quotes"
    assert record["level"] == "info" and record["namespace"] == "test"
    assert record["count"] == 3


def test_known_secrets_are_masked_everywhere() -> None:
    """A remembered secret is masked in the message, in fields and in text output."""
    remember_secret("very-secret-value-42")
    line = emit(True, "got {value}", value="very-secret-value-42", other=["very-secret-value-42"])
    assert "very-secret-value-42" not in line
    assert MASK in json.loads(line)["message"]
    assert "very-secret-value-42" not in emit(False, "got {v}", v="very-secret-value-42")


def test_credential_patterns_are_masked() -> None:
    """Authorization headers, bearer tokens, DSN and URL passwords are masked."""
    samples = {
        "Authorization: Bearer abc.def.ghi": "abc.def.ghi",
        "proxy-authorization=Basic dXNlcjpwYXNz": "dXNlcjpwYXNz",
        "postgresql://app:pa55word@db:5432/x": "pa55word",
        "host=db user=app password=pa55word dbname=x": "pa55word",
        "redis://:topsecret@127.0.0.1:6379/0": "topsecret",
        "token: zzz-token-zzz": "zzz-token-zzz",
    }
    for text, secret in samples.items():
        assert secret not in redact(text), text


def test_secret_named_fields_are_masked() -> None:
    """A field whose name says it is a credential is masked whatever its value."""
    record = json.loads(emit(True, "login", password="x1", api_key="x2", user="alice"))
    assert record["password"] == MASK and record["api_key"] == MASK
    assert record["user"] == "alice"


def test_failures_are_rendered_and_redacted() -> None:
    """A logged failure carries its traceback, redacted."""
    stream = io.StringIO()
    log = Logger(namespace="t", observer=LogPublisher(RedactingLineObserver(stream)))
    remember_secret("secret-in-exception")
    try:
        raise ValueError("bad secret-in-exception")
    except ValueError:
        log.failure("it broke")
    record = json.loads(stream.getvalue())
    assert "ValueError" in record["failure"]
    assert "secret-in-exception" not in stream.getvalue()


def test_correlation_ids() -> None:
    """Plain caller IDs are kept; odd ones are replaced; loggers tag events."""
    assert correlation_id_from("req-123_abc") == "req-123_abc"
    assert correlation_id_from(b"abc") == "abc"
    replaced = correlation_id_from("bad id\nwith newline")
    assert len(replaced) == 32 and replaced != new_correlation_id()
    assert len(correlation_id_from("x" * 65)) == 32
    stream = io.StringIO()
    base = Logger(namespace="t", observer=LogPublisher(RedactingLineObserver(stream)))
    correlated(base, "cid-1").emit(LogLevel.warn, "hello")
    assert json.loads(stream.getvalue())["correlation_id"] == "cid-1"


@given(st.text(max_size=60), st.text(min_size=0, max_size=60))
def test_redaction_masks_remembered_values_in_any_text(prefix: str, suffix: str) -> None:
    """A remembered secret never survives redaction, whatever surrounds it."""
    remember_secret("Zq9-remembered-secret")
    assert "Zq9-remembered-secret" not in redact(prefix + "Zq9-remembered-secret" + suffix)


def test_long_tokens_are_redacted_in_linear_time() -> None:
    """A megabyte-long run of letters (a blob in a log line) does not stall redaction."""
    blob = "a" * (1 << 20)
    assert redact(blob + " https://user:pw@host/") == blob + " https://user:[REDACTED]@host/"
