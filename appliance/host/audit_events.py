"""
Audit events as the chain records them: checked, redacted and serialised
fields, sans-IO (the log itself is L{appliance.host.audit}).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from appliance.host.redact import MASK, redact_value

RESERVED_FIELDS = frozenset({"seq", "time", "prev"})
"""Field names the chain owns; an event using one is refused."""

MAX_EVENT_CHARS = 16384
"""Most characters of text (keys and strings) one event may carry."""

_CREDENTIAL_KEY = re.compile(
    r"password|passwd|passphrase|secret|token|authorization|apikey|accesskey"
    r"|privatekey|credential|cookie"
)
_OPAQUE_RUN = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z0-9+.-]{128,}")
_SEPARATOR = "\x00"
_MAX_DEPTH = 32


class AuditError(Exception):
    """Base class of the audit log's errors."""


class AuditEventError(AuditError, ValueError):
    """The event cannot be recorded (wrong type, reserved field, too large)."""


class AuditQueueFull(AuditError):
    """The writer is behind by C{queue_size} lines; the event was not recorded."""


class AuditWriteError(AuditError):
    """The event was not recorded because writing or syncing the file failed."""


class AuditClosed(AuditError):
    """The audit log is not running."""


class AuditOpenError(AuditError):
    """The existing log cannot be continued safely; an operator must look."""


@functools.lru_cache(maxsize=4096)
def credential_key(name: str) -> bool:
    """Whether a field name looks like it holds a credential (its value is masked)."""
    return _CREDENTIAL_KEY.search(re.sub(r"[^a-z0-9]", "", name.lower())) is not None


def encode_fields(event: Mapping[str, Any]) -> bytes:
    """
    Redact and serialise an event's fields (sorted, compact, ASCII), without
    the surrounding braces. Raises L{AuditEventError}.

    Every string (keys included) passes through L{redact_value}; values of
    credential-like keys become C{[REDACTED]}; runs of 128 or more
    letters, digits and C{+.-} (tokens, keys, blobs) are masked first, which
    also keeps the redaction patterns' cost bounded.
    """
    if type(event) is dict:
        flat = _encode_flat(event)
        if flat is not None:
            return flat
    if not isinstance(event, Mapping):
        raise AuditEventError("an audit event is a mapping of field names to values")
    for key in event:
        if key in RESERVED_FIELDS:
            raise AuditEventError(f"field {key!r} is reserved for the audit chain")
    texts: list[str] = []
    template = _collect(event, 0, texts)
    if sum(len(text) for text in texts) > MAX_EVENT_CHARS:
        raise AuditEventError(f"event text longer than {MAX_EVENT_CHARS} characters")
    cleaned = _fill(template, _redact_all(texts))
    text = json.dumps(cleaned, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=True, allow_nan=False)
    return text[1:-1].encode("ascii")


_FLAT_TYPES = frozenset({str, int, bool, type(None)})


def _encode_flat(event: dict[str, Any]) -> bytes | None:
    """
    The common case, fast: a flat event of short strings and plain numbers
    that redaction leaves unchanged. Returns None for anything else (the
    general path then checks and redacts it field by field).
    """
    texts = []
    for key, value in event.items():
        kind = type(value)
        if type(key) is not str or key in RESERVED_FIELDS or credential_key(key):
            return None
        if kind is float:
            if not math.isfinite(value):
                return None
        elif kind not in _FLAT_TYPES:
            return None
        elif kind is int and not -(2**63) <= value < 2**63:
            return None
        elif kind is str:
            texts.append(value)
        texts.append(key)
    joined = _SEPARATOR.join(texts)
    if (len(joined) > MAX_EVENT_CHARS or _SEPARATOR in "".join(texts)
            or _OPAQUE_RUN.search(joined) or redact_value(joined) != joined):
        return None
    return _ENCODER.encode(event)[1:-1].encode("ascii")


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True,
                            allow_nan=False)


def _redact_all(texts: list[str]) -> list[str]:
    """
    Redact every text. Fast path: when the texts joined by NUL (which every
    pattern treats like the start or end of a text) come out of redaction
    unchanged, no text alone would change either, and the texts are kept.
    Otherwise each text is redacted on its own (cost: one pass per text).
    """
    if not any(_SEPARATOR in text for text in texts):
        joined = _SEPARATOR.join(texts)
        if redact_value(_OPAQUE_RUN.sub(MASK, joined)) == joined:
            return texts
    return [str(redact_value(_OPAQUE_RUN.sub(MASK, text))) for text in texts]


class _Slot:
    """Where the redacted text number C{index} goes."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Fields:
    """A mapping's (key slot, value template) pairs."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[_Slot, Any]]) -> None:
        self.items = items


def _collect(value: Any, depth: int, texts: list[str]) -> Any:
    """Check C{value} and return a template with every text replaced by a slot."""
    if depth > _MAX_DEPTH:
        raise AuditEventError(f"event nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, (str, bytes)):
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        texts.append(value)
        return _Slot(len(texts) - 1)
    if type(value) is dict or isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditEventError(f"field names must be strings, got {type(key).__name__}")
            slot = _collect(key, depth, texts)
            items.append((slot, MASK if credential_key(key)
                          else _collect(item, depth + 1, texts)))
        return _Fields(items)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise AuditEventError("cannot record an integer outside the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditEventError("cannot record a NaN or infinite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_collect(item, depth + 1, texts) for item in value]
    raise AuditEventError(f"cannot record a value of type {type(value).__name__}")


def _fill(template: Any, texts: list[str]) -> Any:
    if isinstance(template, _Slot):
        return texts[template.index]
    if isinstance(template, _Fields):
        return {texts[slot.index]: _fill(item, texts) for slot, item in template.items}
    if isinstance(template, list):
        return [_fill(item, texts) for item in template]
    return template  # a number, a boolean, None or MASK
