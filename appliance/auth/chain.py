"""
A chain of authentication methods, as configured for one upstream.

Methods are tried in order; the first one whose credential is present
decides. A present but invalid credential fails the request: it never falls
through to the next method (a caller with a bad token must not get in with
a certificate it happened to present, nor be judged by a weaker method).
Only when no method finds its credential is the result C{missing}.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed

from appliance.auth.model import MISSING, NOTHING_PRESENTED, AuthMethod, AuthRequest, AuthResult


class Authenticator:
    """
    Authenticates requests with an ordered list of methods; see the module
    docstring.

    On the hot path call L{authenticate_now}; only when it returns None
    (a credential that needs a lookup) call L{authenticate}.
    """

    def __init__(self, methods: Sequence[AuthMethod]) -> None:
        """
        @param methods: the methods in the order they are tried (at least
            one, each at most once).
        """
        if not methods:
            raise ValueError("an authenticator needs at least one method")
        names = [method.name for method in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"a method appears twice in {names}")
        self.methods = tuple(methods)
        self._missing = methods[0].metrics.counter("none", MISSING)

    @property
    def names(self) -> tuple[str, ...]:
        """The method names, in order."""
        return tuple(method.name for method in self.methods)

    def authenticate_now(self, request: AuthRequest) -> AuthResult | None:
        """
        The result when it can be had without I/O, else None (then call
        L{authenticate}, which does the lookup).
        """
        for method in self.methods:
            result = method.authenticate_now(request)
            if result is None:
                return None
            if result.failure != MISSING:
                return result
        self._missing.inc()
        return NOTHING_PRESENTED

    def authenticate(self, request: AuthRequest) -> Deferred[AuthResult]:
        """The result, looking up what needs looking up; never fails."""
        for method in self.methods:
            result = method.authenticate_now(request)
            if result is None:
                return method.authenticate(request)
            if result.failure != MISSING:
                return succeed(result)
        self._missing.inc()
        return succeed(NOTHING_PRESENTED)
