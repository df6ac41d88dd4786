"""
The two glob dialects of the builtin rules, translated to regular
expressions once, when the rules are loaded.

 - B{name globs} (identity, namespace, service account, upstream): C{*}
   matches any run of characters (C{/} included), C{?} one character; the
   same as L{fnmatch.fnmatchcase} restricted to these two wildcards.
 - B{path globs}: C{*} matches within one segment (no C{/}), C{?} one
   character of a segment, and C{**}, which must be a whole segment, matches
   zero or more segments: C{/public/**} matches C{/public}, C{/public/} and
   C{/public/a/b}, never C{/publicity}.

Character classes, braces and backslashes are refused rather than guessed
at, and so is whitespace. Matching is case-sensitive.
"""

from __future__ import annotations

import re

_FORBIDDEN = re.compile(r"[\[\]{}\\\s]")

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
"""The methods a rule may name (written in any case)."""


def _check(pattern: str) -> None:
    if not pattern:
        raise ValueError("an empty pattern")
    bad = _FORBIDDEN.search(pattern)
    if bad is not None:
        raise ValueError(
            f"{pattern!r}: {bad.group()!r} is not supported (only * and ? are wildcards)"
        )


def _segment(text: str) -> str:
    return "".join(
        "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
        for char in text
    )


def name_glob_regex(pattern: str) -> str:
    """
    The regular expression (for C{fullmatch}, with C{re.DOTALL}) of a name
    glob; raises L{ValueError} for an unsupported pattern.
    """
    _check(pattern)
    return "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char)
        for char in pattern
    )


def path_glob_regex(pattern: str) -> str:
    """
    The regular expression (for C{fullmatch}) of a path glob; raises
    L{ValueError} for an unsupported pattern.
    """
    _check(pattern)
    if not pattern.startswith("/"):
        raise ValueError(f"{pattern!r}: a path pattern starts with /")
    segments = pattern[1:].split("/")
    parts = []
    for position, segment in enumerate(segments):
        if segment in (".", ".."):
            raise ValueError(
                f"{pattern!r}: a dot segment never matches a normalised path"
            )
        if segment == "**":
            last = position == len(segments) - 1
            parts.append("(?:/.*)?" if last else "(?:/[^/]*)*")
        elif "**" in segment:
            raise ValueError(f"{pattern!r}: ** must be a whole path segment")
        else:
            parts.append("/" + _segment(segment))
    return "".join(parts)


def check_method(method: str) -> str:
    """An HTTP method in upper case; raises L{ValueError} for an unknown one."""
    upper = method.upper()
    if upper not in HTTP_METHODS:
        raise ValueError(
            f"unknown method {method!r} (expected {', '.join(sorted(HTTP_METHODS))})"
        )
    return upper
