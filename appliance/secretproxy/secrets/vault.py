"""
HashiCorp Vault, KV secrets engine version 2, with a token.

A secret name is C{PATH#KEY}: C{payments/stripe#api_key} reads the key
C{api_key} of the secret at C{payments/stripe}. Without C{#KEY} the key
C{value} is read. The request is
C{GET {addr}/v1/{mount}/data/{PATH}} with C{X-Vault-Token} (and
C{X-Vault-Namespace} when configured); the answer is
C{{"data": {"data": {KEY: VALUE, ...}, "metadata": {"version": N, ...}}}}
and the version is C{N}.

Path segments are percent-encoded one by one and empty, C{.} and C{..}
segments are refused, so no name can reach another Vault endpoint with
our token.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred, ensureDeferred

from appliance.host.secret import Secret
from appliance.secretproxy.secrets.base import (
    MAX_VALUE,
    SecretNotFound,
    SecretValue,
    StoreUnavailable,
    check_name,
    wall_clock,
)
from appliance.secretproxy.secrets.http import StoreHTTP, status_error

DEFAULT_KEY = "value"
"""The key read when a name has no C{#KEY}."""


def split_name(secret_name: str) -> tuple[list[str], str]:
    """
    C{PATH#KEY} -> (path segments, key).

    @raise SecretNotFound: for names that are not a valid C{PATH[#KEY]}.
    """
    check_name(secret_name)
    path, hashmark, key = secret_name.partition("#")
    if hashmark and not key:
        raise SecretNotFound(secret_name, "empty key after '#'")
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise SecretNotFound(secret_name, "expected PATH#KEY with a path of "
                             "non-empty segments, none of them '.' or '..'")
    return segments, key if hashmark else DEFAULT_KEY


class VaultStore:
    """The L{SecretStore} over Vault KV v2; see the module docstring."""

    def __init__(self, http: StoreHTTP, addr: str, token: Secret,
                 mount: str = "secret", namespace: str | None = None,
                 name: str = "vault", clock: Any = wall_clock) -> None:
        """
        @param http: the client (timeout, TLS, pool).
        @param addr: Vault's address, e.g. C{https://vault.internal:8200}.
        @param token: the Vault token.
        @param mount: where the KV v2 engine is mounted.
        @param namespace: the namespace (Vault Enterprise), or None.
        @param name: the store's name in metrics and logs.
        @param clock: gives C{fetched_at} (a function returning seconds).
        """
        self.name = name
        self.addr = addr.rstrip("/")
        self.mount = mount.strip("/")
        self.namespace = namespace
        self._http = http
        self._token = token
        self._clock = clock
        if any(s in ("", ".", "..") for s in self.mount.split("/")):
            raise ValueError(f"invalid Vault mount {mount!r}")

    def url(self, secret_name: str) -> str:
        """The KV v2 data URL of C{secret_name}'s path."""
        segments, _ = split_name(secret_name)
        mount = "/".join(quote(s, safe="") for s in self.mount.split("/"))
        path = "/".join(quote(s, safe="") for s in segments)
        return f"{self.addr}/v1/{mount}/data/{path}"

    def fetch(self, secret_name: str) -> Deferred[SecretValue]:
        """The value of the key of C{secret_name}, at the latest version."""
        return ensureDeferred(self._fetch(secret_name))

    def check(self) -> Deferred[None]:
        """C{GET /v1/auth/token/lookup-self}: fires when Vault accepts the token."""
        return ensureDeferred(self._check())

    def close(self) -> Deferred[None]:
        """Close pooled connections."""
        return self._http.close()

    async def _fetch(self, secret_name: str) -> SecretValue:
        url = self.url(secret_name)
        _, key = split_name(secret_name)
        answer = await self._http.get(url, self._headers(), self._what())
        if answer.code == 404:
            raise SecretNotFound(secret_name, "no such path in Vault (or deleted)")
        if answer.code != 200:
            raise status_error(answer, self._what())
        data, version = _kv2(answer.json(self._what()), secret_name, self._what())
        value = data.get(key)
        if value is None:
            raise SecretNotFound(secret_name, f"the Vault secret has no key {key!r}")
        if not isinstance(value, str) or not value:
            raise SecretNotFound(secret_name, f"key {key!r} is not a non-empty string")
        if len(value.encode("utf-8")) > MAX_VALUE:
            raise SecretNotFound(secret_name, f"value larger than {MAX_VALUE} bytes")
        return SecretValue(value=value, version=version, fetched_at=self._clock())

    async def _check(self) -> None:
        answer = await self._http.get(f"{self.addr}/v1/auth/token/lookup-self",
                                      self._headers(), self._what())
        if answer.code != 200:
            raise status_error(answer, self._what())

    def _headers(self) -> dict[str, str]:
        headers = {"X-Vault-Token": self._token.reveal(), "X-Vault-Request": "true",
                   "Accept": "application/json"}
        if self.namespace:
            headers["X-Vault-Namespace"] = self.namespace
        return headers

    def _what(self) -> str:
        return f"secret store {self.name} (Vault)"


def _kv2(document: Any, secret_name: str, what: str) -> tuple[dict[str, Any], str | None]:
    outer = document.get("data") if isinstance(document, dict) else None
    if not isinstance(outer, dict):
        raise StoreUnavailable(f"{what}: answer for {secret_name!r} is not a KV v2 read")
    data = outer.get("data")
    if data is None:
        raise SecretNotFound(secret_name, "deleted in Vault")
    if not isinstance(data, dict):
        raise StoreUnavailable(f"{what}: answer for {secret_name!r} is not a KV v2 read")
    metadata = outer.get("metadata")
    version = metadata.get("version") if isinstance(metadata, dict) else None
    return data, (str(version) if isinstance(version, int) else None)
