"""
Log output: flat JSON lines (or readable text on a terminal), every line
passed through the redaction step, and correlation-ID helpers.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

from appliance.host.redact import MASK, redact, redact_value

_SECRET_FIELD = re.compile(
    r"(?i)(password|passwd|secret|token|authorization|api[_-]?key|cookie|credential)"
)

# Set once per process by the observer factory; the config's log_level
# adjusts it after the config is loaded.
LEVELS = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def set_log_level(level: str) -> None:
    """
    Set the minimum level (debug, info, warn, error) for every namespace.
    """
    LEVELS.setLogLevelForNamespace("", LogLevel.levelWithName(level))


@implementer(ILogObserver)
class RedactingLineObserver:
    """
    Write each event as one line (JSON or text) after redaction.
    """

    def __init__(self, stream: IO[str], json_lines: bool = True) -> None:
        self._stream = stream
        self._json = json_lines

    def __call__(self, event: dict[str, Any]) -> None:
        line = event_as_json(event) if self._json else event_as_text(event)
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log stream must not crash the service


def event_as_json(event: dict[str, Any]) -> str:
    """
    Render an event as one flat, redacted JSON object.
    """
    record: dict[str, Any] = {
        "time": _timestamp(event),
        "level": _level_name(event),
        "namespace": event.get("log_namespace", "-"),
        "message": redact(formatEvent(event) or ""),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in ("format", "message", "time", "system",
                                             "isError", "printed", "why", "failure"):
            continue
        record[key] = MASK if _SECRET_FIELD.search(key) else redact_value(_jsonable(value))
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = redact(_failure_text(failure))
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def event_as_text(event: dict[str, Any]) -> str:
    """
    Render an event as one readable, redacted line (for terminals).
    """
    stamp = _timestamp(event)
    text = f"{stamp} [{event.get('log_namespace', '-')}#{_level_name(event)}] " + (
        formatEvent(event) or ""
    )
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + _failure_text(failure)
    return redact(text)


def _timestamp(event: dict[str, Any]) -> str:
    when = event.get("log_time")
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")


def _level_name(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    return level.name if isinstance(level, type(LogLevel.info)) else "info"


def _failure_text(failure: Any) -> str:
    try:
        return str(failure.getTraceback())
    except Exception:
        return repr(failure)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _make_observer(json_lines: bool) -> ILogObserver:
    # Capture the real stdout now: twistd redirects sys.stdout into the log
    # right after creating the observer.
    return FilteringLogObserver(RedactingLineObserver(sys.stdout, json_lines), [LEVELS])


def json_observer() -> ILogObserver:
    """
    A twistd C{--logger} factory: redacted JSON lines on stdout.
    """
    return _make_observer(json_lines=True)


def text_observer() -> ILogObserver:
    """
    A twistd C{--logger} factory: redacted readable lines on stdout.
    """
    return _make_observer(json_lines=False)


_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_correlation_id() -> str:
    """
    Return a fresh random correlation ID (32 hex digits).
    """
    return secrets.token_hex(16)


def correlation_id_from(value: str | bytes | None) -> str:
    """
    Accept a caller-supplied correlation ID if it is short and plain;
    otherwise mint a new one (so a header cannot inject into logs).
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value and _CORRELATION_ID.match(value):
        return value
    return new_correlation_id()


class CorrelatedLogger(Logger):
    """
    A L{Logger} that adds C{correlation_id} to every event it emits.
    """

    def __init__(self, correlation_id: str, namespace: str | None = None,
                 source: object = None, observer: ILogObserver | None = None) -> None:
        super().__init__(namespace=namespace, source=source, observer=observer)
        self.correlation_id = correlation_id

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("correlation_id", self.correlation_id)
        super().emit(level, format, **kwargs)


def correlated(log: Logger, correlation_id: str) -> CorrelatedLogger:
    """
    Return a logger like C{log} that tags events with C{correlation_id}.
    """
    return CorrelatedLogger(correlation_id, namespace=log.namespace, source=log.source,
                            observer=log.observer)
