"""
The secret store part of C{[secretproxy]}: L{parse_store} reads its keys
(collecting problems, like every parser here) into a L{StoreConfig}, and
L{build_secrets} turns that into a running L{ResilientSecrets}.

Keys of a store other than the selected one are reported, so a typo in
C{store =} does not silently ignore the operator's Vault settings.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from prometheus_client import CollectorRegistry

from appliance.host.ini import INVALID, Section
from appliance.host.secret import Secret
from appliance.host.values import in_range, one_of, parse_bool, parse_duration, parse_int
from appliance.resilience import Rate, parse_rate
from appliance.secretproxy.secrets.base import SecretStore
from appliance.secretproxy.secrets.crypto import KeyFileError, load_key_file
from appliance.secretproxy.secrets.doppler import DEFAULT_URL as DOPPLER_URL
from appliance.secretproxy.secrets.doppler import DopplerStore
from appliance.secretproxy.secrets.envstore import EnvStore
from appliance.secretproxy.secrets.fallback import FallbackCache
from appliance.secretproxy.secrets.filestore import (
    DEFAULT_KEY_FILE,
    DEFAULT_STORE_PATH,
    FileStore,
)
from appliance.secretproxy.secrets.http import StoreHTTP, load_ca_bundle
from appliance.secretproxy.secrets.resilient import ResilientSecrets
from appliance.secretproxy.secrets.vault import VaultStore

STORES = ("file", "env", "doppler", "vault")

_ONLY_FOR = {
    "store_path": "file", "store_key_file": "file",
    "env_prefix": "env", "env_uppercase": "env",
    "doppler_url": "doppler", "doppler_token": "doppler", "doppler_project": "doppler",
    "doppler_config": "doppler",
    "vault_addr": "vault", "vault_token": "vault", "vault_namespace": "vault",
    "vault_mount": "vault",
    "store_ca": "doppler or vault",
}


@frozen
class StoreConfig:
    """The secret store settings of C{[secretproxy]}; see docs/secret-stores.md."""

    kind: str = "file"
    store_path: str | None = DEFAULT_STORE_PATH
    store_key_file: str | None = DEFAULT_KEY_FILE
    env_prefix: str = ""
    env_uppercase: bool = True
    doppler_url: str = DOPPLER_URL
    doppler_token: Secret | None = None
    doppler_project: str | None = None
    doppler_config: str | None = None
    vault_addr: str | None = None
    vault_token: Secret | None = None
    vault_namespace: str | None = None
    vault_mount: str = "secret"
    ca_file: str | None = None
    timeout: float = 2.0
    cache_ttl: float = 300.0
    cache_size: int = 1000
    fetch_rate: Rate = Rate(50, 1.0)
    refresh_ahead: float | None = None
    fallback_dir: str | None = None
    fallback_key_file: str | None = None
    fallback_max_stale: float = 86400.0


def parse_store(section: Section) -> StoreConfig:
    """Read the store keys of C{section}; problems are recorded on it."""
    kind = section.get("store", one_of(*STORES), "file")
    values: dict[str, Any] = {}
    if kind == "file":
        values["store_path"] = section.get("store_path", _path(section, "store_path"),
                                           DEFAULT_STORE_PATH)
        values["store_key_file"] = section.get(
            "store_key_file", _path(section, "store_key_file"), DEFAULT_KEY_FILE)
        _check_key(section, "store_key_file", values["store_key_file"])
        if _ok(values["store_path"]) and not os.path.exists(values["store_path"]):
            section.problem("store_path", f"{values['store_path']} does not exist (create "
                            "it with `appliance secrets init`)")
    elif kind == "env":
        values["env_prefix"] = section.get("env_prefix", str, "").strip()
        values["env_uppercase"] = section.get("env_uppercase", parse_bool, True)
    elif kind == "doppler":
        values["doppler_url"] = section.get("doppler_url", parse_store_url, DOPPLER_URL)
        values["doppler_token"] = section.secret("doppler_token")
        project = section.get("doppler_project", _word, None)
        config = section.get("doppler_config", _word, None)
        if (project is None) != (config is None):
            section.problem("doppler_project" if project is None else "doppler_config",
                            "set both doppler_project and doppler_config, or neither "
                            "(a service token implies both)")
        values.update(doppler_project=project, doppler_config=config)
    elif kind == "vault":
        values["vault_addr"] = section.get("vault_addr", parse_store_url)
        values["vault_token"] = section.secret("vault_token")
        values["vault_namespace"] = section.get("vault_namespace", _word, None)
        values["vault_mount"] = section.get("vault_mount", _mount, "secret")
    if kind in ("doppler", "vault"):
        ca = values["ca_file"] = section.get("store_ca", _path(section, "store_ca"), None)
        if _ok(ca) and ca is not None:
            try:
                load_ca_bundle(ca)
            except ValueError as error:
                section.problem("store_ca", str(error))
    _report_foreign(section, kind)
    values["timeout"] = section.get("store_timeout", in_range(parse_duration, 0.01, 300), 2.0)
    values["cache_ttl"] = section.get("secret_cache_ttl", in_range(parse_duration, 0.001),
                                      300.0)
    values["cache_size"] = section.get("secret_cache_size", in_range(parse_int, 1, 10**7),
                                       1000)
    values["fetch_rate"] = section.get("store_fetch_rate", parse_rate, Rate(50, 1.0))
    ahead = values["refresh_ahead"] = section.get(
        "secret_refresh_ahead", in_range(parse_duration, 0.001), None)
    if _ok(ahead) and ahead is not None and _ok(values["cache_ttl"]) \
            and ahead >= values["cache_ttl"]:
        section.problem("secret_refresh_ahead", "must be shorter than secret_cache_ttl")
    _parse_fallback(section, values)
    if kind is INVALID or any(value is INVALID for value in values.values()):
        return StoreConfig()  # never built: the problems stop the start
    return StoreConfig(kind=kind, **values)


def build_store(config: StoreConfig, reactor: Any) -> SecretStore:
    """The configured store (HTTP stores get their own connection pool)."""
    if config.kind == "file":
        assert config.store_path is not None and config.store_key_file is not None
        return FileStore(config.store_path, load_key_file(config.store_key_file), reactor)
    if config.kind == "env":
        return EnvStore(prefix=config.env_prefix, uppercase=config.env_uppercase)
    http = StoreHTTP(reactor, config.timeout, config.ca_file)
    if config.kind == "doppler":
        assert config.doppler_token is not None
        return DopplerStore(http, config.doppler_token, config.doppler_url,
                            config.doppler_project, config.doppler_config)
    assert config.vault_addr is not None and config.vault_token is not None
    return VaultStore(http, config.vault_addr, config.vault_token, config.vault_mount,
                      config.vault_namespace)


def build_secrets(config: StoreConfig, clock: Any, reactor: Any,
                  registry: CollectorRegistry | None) -> ResilientSecrets:
    """
    The L{ResilientSecrets} for C{config}; call its C{start()} when the
    service starts and C{stop()} when it stops.

    @raise ValueError: a key file or the fallback folder is unusable.
    """
    store = build_store(config, reactor)
    fallback = None
    if config.fallback_dir is not None:
        assert config.fallback_key_file is not None
        fallback = FallbackCache(config.fallback_dir, load_key_file(config.fallback_key_file),
                                 reactor, store.name)
    return ResilientSecrets(
        store, clock, ttl=config.cache_ttl, max_entries=config.cache_size,
        timeout=config.timeout, fetch_rate=config.fetch_rate, fallback=fallback,
        max_stale=config.fallback_max_stale, refresh_ahead=config.refresh_ahead,
        registry=registry)


def parse_store_url(text: str) -> str:
    """
    An API root: C{https://host[:port][/path]}; C{http://} only to a
    loopback address (the token would cross the network in clear).
    """
    url = text.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ValueError(f"expected a URL such as https://vault.internal:8200, got {text!r}"
                         ) from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"expected an https:// URL, got {text!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("the URL must not hold credentials, a query or a fragment "
                         "(tokens are read from *_token)")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError(f"plain http is allowed only to a loopback address, got {text!r}")
    return url


def _parse_fallback(section: Section, values: dict[str, Any]) -> None:
    folder = values["fallback_dir"] = section.get(
        "fallback_dir", _path(section, "fallback_dir"), None)
    key_file = values["fallback_key_file"] = section.get(
        "fallback_key_file", _path(section, "fallback_key_file"), None)
    values["fallback_max_stale"] = section.get(
        "fallback_max_stale", in_range(parse_duration, 1), 86400.0)
    if folder is None and key_file is not None:
        section.problem("fallback_key_file", "needs fallback_dir")
    if folder is not None and key_file is None:
        section.problem("fallback_dir", "needs fallback_key_file (the key that "
                        "encrypts the fallback files)")
    if _ok(key_file) and key_file is not None:
        _check_key(section, "fallback_key_file", key_file)
    if _ok(folder) and folder is not None and os.path.exists(folder):
        mode = os.stat(folder).st_mode
        if mode & 0o077:
            section.problem("fallback_dir", f"{folder} is accessible by group or others "
                            f"(mode {mode & 0o777:04o}); chmod 700 it")


def _report_foreign(section: Section, kind: Any) -> None:
    for key, owner in _ONLY_FOR.items():
        if section.has(key) and kind not in owner.split(" or "):
            section.mark_read(key)
            if kind is not INVALID:
                section.problem(key, f"applies only to store = {owner}")


def _check_key(section: Section, key: str, path: Any) -> None:
    if not _ok(path):
        return
    try:
        load_key_file(path)
    except KeyFileError as error:
        section.problem(key, str(error))


def _path(section: Section, key: str) -> Any:
    raw = section.raw.values.get(key)
    base = os.path.dirname(raw.file if raw is not None else section.file)

    def convert(text: str) -> str:
        path = text.strip()
        if not path:
            raise ValueError("expected a path")
        return os.path.normpath(os.path.join(base, path))

    return convert


def _word(text: str) -> str:
    word = text.strip()
    if not word or any(c.isspace() or not c.isprintable() for c in word):
        raise ValueError(f"expected a name without spaces, got {text!r}")
    return word


def _mount(text: str) -> str:
    mount = text.strip().strip("/")
    if any(part in ("", ".", "..") for part in mount.split("/")):
        raise ValueError(f"expected a Vault mount path such as secret, got {text!r}")
    return mount


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ok(value: Any) -> bool:
    return value is not INVALID
