"""
The vocabulary every secret store shares: the value a store returns, the
protocol a store provides, and the two errors callers tell apart.

 - L{SecretNotFound}: the store answered and has no such secret (or the
   name is not valid for it). A configuration problem: never served from
   the fallback cache.
 - L{StoreUnavailable}: the store did not answer usefully (down, timed
   out, refused our credentials, rate limited, corrupt). The proxy answers
   503; the fallback cache may serve instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from typing import Protocol, runtime_checkable

from attrs import field, frozen
from twisted.internet.defer import Deferred

MAX_NAME = 256
"""Longest secret name accepted by any store."""

MAX_VALUE = 64 * 1024
"""Largest secret value accepted (bytes of UTF-8)."""

_NAME = re.compile(r"^[\x21-\x7e]{1,256}$")  # 1..MAX_NAME printable, no space

# A per-process key for the version of stores that have none: a keyed hash
# does not let anyone who sees a version guess a weak value offline.
_VERSION_KEY = os.urandom(32)


class SecretStoreError(Exception):
    """Base class of the errors a store reports."""


class SecretNotFound(SecretStoreError):
    """
    The store answered: no such secret. C{name} is the secret name (never a
    value).
    """

    def __init__(self, name: str, detail: str = "not found") -> None:
        super().__init__(f"secret {name!r}: {detail}")
        self.name = name


class StoreUnavailable(SecretStoreError):
    """
    The store cannot answer now.

    @ivar retry_after: seconds after which trying again makes sense, when
        known (an open circuit, a rate limit), else None.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreIntegrityError(StoreUnavailable):
    """
    The store's data failed authentication or is malformed (tampered,
    wrong key, truncated): unusable until an operator fixes it.
    """


@frozen
class SecretValue:
    """
    One secret as fetched: its value (hidden from C{repr}), the store's
    version of it (None when the store has none) and when it was fetched
    (in the fetching clock's seconds).

    C{from_fallback} is True for a value served from the fallback cache
    while the store was failing.
    """

    value: str = field(repr=lambda _: "<hidden>")
    version: str | None
    fetched_at: float
    from_fallback: bool = False


@runtime_checkable
class SecretStore(Protocol):
    """
    Where secrets come from. Implementations: L{FileStore}, L{EnvStore},
    L{DopplerStore}, L{VaultStore}.
    """

    name: str
    """A fixed, short name (a metric label): C{file}, C{env}, ..."""

    def fetch(self, secret_name: str) -> Deferred[SecretValue]:
        """
        The current value of C{secret_name}; fails with L{SecretNotFound}
        or L{StoreUnavailable}.
        """

    def check(self) -> Deferred[None]:
        """Fires when the store is reachable and accepts our credentials."""

    def close(self) -> Deferred[None]:
        """Release connections and threads' state; fires when done."""


def check_name(name: str) -> str:
    """
    Return C{name} if it is a usable secret name (1-256 printable ASCII
    characters, no spaces).

    @raise SecretNotFound: otherwise.
    """
    if not isinstance(name, str) or _NAME.match(name) is None:
        shown = name[:80] if isinstance(name, str) else type(name).__name__
        raise SecretNotFound(shown, "not a valid secret name (1-256 printable "
                             "ASCII characters, no spaces)")
    return name


def hash_version(value: str) -> str:
    """
    A version for stores without one: a keyed hash of the value, stable
    within this process (so a changed value is noticed as a rotation), and
    useless for guessing the value.
    """
    data = value.encode("utf-8", "surrogateescape")
    digest = hmac.new(_VERSION_KEY, data, hashlib.sha256).hexdigest()
    return "h:" + digest[:16]


def wall_clock() -> float:
    """The default clock of stores used on their own (seconds since the epoch)."""
    return time.time()
