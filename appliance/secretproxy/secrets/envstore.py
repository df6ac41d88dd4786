"""
Secrets from the process environment: secret C{name} is the variable
C{prefix + NAME} (upper-cased unless told otherwise). For containers and
systemd C{Environment=}/credentials setups where something else injects
the values.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from twisted.internet.defer import Deferred, fail, succeed

from appliance.secretproxy.secrets.base import (
    MAX_VALUE,
    SecretNotFound,
    SecretValue,
    check_name,
    hash_version,
    wall_clock,
)

_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvStore:
    """
    The L{SecretStore} over environment variables. Versions are keyed
    hashes of the values (see L{hash_version}).
    """

    def __init__(self, prefix: str = "", environ: Mapping[str, str] | None = None,
                 uppercase: bool = True, name: str = "env") -> None:
        """
        @param prefix: put before the (upper-cased) secret name.
        @param environ: the variables (default: C{os.environ}, read at each
            fetch).
        @param uppercase: whether to upper-case secret names.
        @param name: the store's name in metrics and logs.
        """
        self.name = name
        self.prefix = prefix
        self.uppercase = uppercase
        self._environ = environ if environ is not None else os.environ

    def variable(self, secret_name: str) -> str:
        """
        The variable that holds C{secret_name}.

        @raise SecretNotFound: when it cannot be a variable name.
        """
        check_name(secret_name)
        variable = self.prefix + (secret_name.upper() if self.uppercase else secret_name)
        if _VARIABLE.match(variable) is None:
            raise SecretNotFound(secret_name, f"{variable!r} is not a valid environment "
                                 "variable name (letters, digits, underscores)")
        return variable

    def fetch(self, secret_name: str) -> Deferred[SecretValue]:
        """The variable's value; L{SecretNotFound} when it is unset or empty."""
        try:
            variable = self.variable(secret_name)
            value = self._environ.get(variable)
            if not value:
                raise SecretNotFound(secret_name, f"environment variable {variable} "
                                     "is not set")
            if len(value.encode("utf-8", "surrogateescape")) > MAX_VALUE:
                raise SecretNotFound(secret_name, f"value larger than {MAX_VALUE} bytes")
        except SecretNotFound:
            return fail()
        return succeed(SecretValue(value=value, version=hash_version(value),
                                   fetched_at=wall_clock()))

    def check(self) -> Deferred[None]:
        """Always healthy."""
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)
