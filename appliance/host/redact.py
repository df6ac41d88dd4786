"""
The one redaction step between the appliance and anything it writes out.

Two layers: every secret resolved from the config is remembered and masked
wherever it appears, and patterns mask credentials that never went through
the config (Authorization headers, bearer tokens, DSN passwords,
C{password=} pairs).
"""

from __future__ import annotations

import re
import threading
from typing import Any

MASK = "[REDACTED]"

# Secrets shorter than this are not masked by value: masking "a" or "1"
# everywhere would shred every log line, and such values are refused as
# too weak by the services that take them.
_MIN_REMEMBERED = 4

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization / Proxy-Authorization / Cookie header values.
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-api-key)"
            r"(\s*[:=]\s*)([^\r\n,;]+)"
        ),
        r"\1\2" + MASK,
    ),
    # Bearer/Basic tokens wherever they appear.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + MASK),
    # URL userinfo passwords: scheme://user:password@host
    # (The lookbehind makes each run of scheme characters start a match at most
    # once; without it a long token costs quadratic time.)
    (re.compile(r"(?i)((?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s/]+)(@)"),
     r"\1" + MASK + r"\3"),
    # key=value or key: value pairs for password-like keys (libpq DSNs too).
    (
        re.compile(
            r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key"
            r"|client[_-]?secret|sslpassword)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|[^\s&,;]+)"
        ),
        r"\1\2" + MASK,
    ),
)


def remember_secret(value: str) -> None:
    """
    Register a secret value so that L{redact} masks it from now on.
    """
    global _secret_pattern
    if len(value) < _MIN_REMEMBERED:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # Longest first so that a secret containing another is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))


# A cheap over-approximation of "some credential pattern could match": most
# text fails it and skips the patterns (a regex alternation here costs more
# than the patterns themselves).
_KEYWORDS = ("authorization", "cookie", "x-api-key", "password", "passwd", "pwd", "secret",
             "token", "key")


def _needs_patterns(text: str) -> bool:
    if "://" in text:
        return True
    lowered = text.lower()
    if "bearer" in lowered or "basic" in lowered:
        return True
    for separator in ("=", ":"):
        index = lowered.find(separator)
        while index >= 0:
            if lowered[max(0, index - 24):index].rstrip().endswith(_KEYWORDS):
                return True
            index = lowered.find(separator, index + 1)
    return False


def redact(text: str) -> str:
    """
    Return C{text} with every known secret and credential pattern masked.
    """
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if not _needs_patterns(text):
        return text
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


def redact_value(value: Any) -> Any:
    """
    Redact strings inside a JSON-like value (str, list, tuple, dict).
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(item) for item in value]
    return value
