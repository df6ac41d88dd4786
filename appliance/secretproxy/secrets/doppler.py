"""
Doppler (REST API v3) with a service token.

One secret per request: C{GET {base}/v3/configs/config/secret?name=NAME}
with C{Authorization: Bearer TOKEN}. A service token implies its project
and config; C{project} and C{config} are sent when configured (personal or
service-account tokens need them). The answer is
C{{"name": ..., "value": {"raw": ..., "computed": ..., "note": ...}}} (the
shape of Doppler's own SDK models); the same object wrapped as
C{{"secret": {...}}} is accepted too. The computed value (references
resolved) is used, the raw one when there is no computed value. The version is the C{ETag}
header when Doppler sends one, else a keyed hash of the value.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from appliance.host.secret import Secret
from appliance.secretproxy.secrets.base import (
    MAX_VALUE,
    SecretNotFound,
    SecretValue,
    StoreUnavailable,
    check_name,
    hash_version,
    wall_clock,
)
from appliance.secretproxy.secrets.http import StoreHTTP, status_error

DEFAULT_URL = "https://api.doppler.com"


class DopplerStore:
    """The L{SecretStore} over Doppler's API; see the module docstring."""

    def __init__(self, http: StoreHTTP, token: Secret, base_url: str = DEFAULT_URL,
                 project: str | None = None, config: str | None = None,
                 name: str = "doppler", clock: Any = wall_clock) -> None:
        """
        @param http: the client (timeout, TLS, pool).
        @param token: the service token.
        @param base_url: the API root, without C{/v3}.
        @param project: the project slug (None: implied by the token).
        @param config: the config name (None: implied by the token).
        @param name: the store's name in metrics and logs.
        @param clock: gives C{fetched_at} (a function returning seconds).
        """
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.project = project
        self.config = config
        self._http = http
        self._token = token
        self._clock = clock

    def fetch(self, secret_name: str) -> Deferred[SecretValue]:
        """The computed value of C{secret_name}."""
        return ensureDeferred(self._fetch(secret_name))

    def check(self) -> Deferred[None]:
        """C{GET /v3/me}: fires when Doppler accepts the token."""
        return ensureDeferred(self._check())

    def close(self) -> Deferred[None]:
        """Close pooled connections."""
        return self._http.close()

    async def _fetch(self, secret_name: str) -> SecretValue:
        check_name(secret_name)
        params = {"name": secret_name}
        if self.project:
            params["project"] = self.project
        if self.config:
            params["config"] = self.config
        answer = await self._http.get(f"{self.base_url}/v3/configs/config/secret",
                                      self._headers(), self._what(), params)
        if answer.code == 404:
            raise SecretNotFound(secret_name, "not found in Doppler")
        if answer.code != 200:
            raise status_error(answer, self._what())
        value = _computed(answer.json(self._what()), secret_name, self._what())
        version = answer.header("ETag") or hash_version(value)
        return SecretValue(value=value, version=version[:128], fetched_at=self._clock())

    async def _check(self) -> None:
        answer = await self._http.get(f"{self.base_url}/v3/me", self._headers(),
                                      self._what())
        if answer.code != 200:
            raise status_error(answer, self._what())

    def _headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + self._token.reveal(),
                "Accept": "application/json"}

    def _what(self) -> str:
        return f"secret store {self.name} (Doppler)"


def _computed(document: Any, secret_name: str, what: str) -> str:
    secret = document
    if isinstance(document, dict) and isinstance(document.get("secret"), dict):
        secret = document["secret"]
    value = secret.get("value") if isinstance(secret, dict) else None
    if not isinstance(value, dict):
        raise StoreUnavailable(f"{what}: answer for {secret_name!r} lacks secret.value")
    computed = value.get("computed")
    if computed is None:
        computed = value.get("raw")
    if not isinstance(computed, str):
        raise StoreUnavailable(f"{what}: answer for {secret_name!r} has no string value")
    if not computed:
        raise SecretNotFound(secret_name, "empty in Doppler")
    if len(computed.encode("utf-8")) > MAX_VALUE:
        raise SecretNotFound(secret_name, f"value larger than {MAX_VALUE} bytes")
    return computed

