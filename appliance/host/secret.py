"""
A secret value that never shows itself in reprs, logs or error texts.
"""

from __future__ import annotations

import hmac

from attrs import field, frozen


@frozen(repr=False)
class Secret:
    """
    A resolved secret: the reference it came from and its value.

    C{repr} and C{str} show only the reference, so a secret that ends up in a
    log line or an exception message reveals nothing.
    """

    reference: str
    value: str = field(eq=False)

    def reveal(self) -> str:
        """
        Return the secret value; call only where it is actually used.
        """
        return self.value

    def matches(self, candidate: str | bytes) -> bool:
        """
        Compare C{candidate} to the secret in constant time.
        """
        if isinstance(candidate, str):
            candidate = candidate.encode("utf-8")
        return hmac.compare_digest(self.value.encode("utf-8"), candidate)

    def __repr__(self) -> str:
        return f"Secret({self.reference})"

    __str__ = __repr__
