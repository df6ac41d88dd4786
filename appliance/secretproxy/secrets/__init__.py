"""
Where the secret proxy gets the API keys it injects: stores (an encrypted
local file, the environment, Doppler, Vault) behind L{ResilientSecrets}
(memory cache with single-flight loading, rate limit, circuit breaker,
encrypted on-disk fallback). See C{docs/secret-stores.md}.

The hot path is C{ResilientSecrets.get_now(name)}: a synchronous memory
lookup; C{get(name)} fetches on a miss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.secretproxy.secrets.base import (
        SecretNotFound,
        SecretStore,
        SecretStoreError,
        SecretValue,
        StoreIntegrityError,
        StoreUnavailable,
    )
    from appliance.secretproxy.secrets.config import (
        StoreConfig,
        build_secrets,
        build_store,
        parse_store,
    )
    from appliance.secretproxy.secrets.doppler import DopplerStore
    from appliance.secretproxy.secrets.envstore import EnvStore
    from appliance.secretproxy.secrets.fallback import FallbackCache
    from appliance.secretproxy.secrets.filestore import FileStore, StoreFile
    from appliance.secretproxy.secrets.http import StoreHTTP
    from appliance.secretproxy.secrets.resilient import ResilientSecrets
    from appliance.secretproxy.secrets.vault import VaultStore

# Names are imported on first use, so that the CLI (which needs only the
# file store) starts without loading treq, twisted.web and prometheus.
_WHERE = {
    "SecretNotFound": "base", "SecretStore": "base", "SecretStoreError": "base",
    "SecretValue": "base", "StoreIntegrityError": "base", "StoreUnavailable": "base",
    "StoreConfig": "config", "build_secrets": "config", "build_store": "config",
    "parse_store": "config", "DopplerStore": "doppler", "EnvStore": "envstore",
    "FallbackCache": "fallback", "FileStore": "filestore", "StoreFile": "filestore",
    "StoreHTTP": "http", "ResilientSecrets": "resilient", "VaultStore": "vault",
}

__all__ = [
    "DopplerStore",
    "EnvStore",
    "FallbackCache",
    "FileStore",
    "ResilientSecrets",
    "SecretNotFound",
    "SecretStore",
    "SecretStoreError",
    "SecretValue",
    "StoreConfig",
    "StoreFile",
    "StoreHTTP",
    "StoreIntegrityError",
    "StoreUnavailable",
    "VaultStore",
    "build_secrets",
    "build_store",
    "parse_store",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
