"""Tests for the secret store keys of [secretproxy]: parse_store and build_store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from appliance.host.ini import ConfigProblem, ConfigReader, read_ini
from appliance.resilience import Rate
from appliance.secretproxy.secrets import (
    DopplerStore,
    EnvStore,
    FileStore,
    StoreConfig,
    StoreFile,
    VaultStore,
    build_store,
    parse_store,
)
from appliance.secretproxy.secrets.config import parse_store_url


def parse(tmp_path: Path, text: str, environ: dict[str, str] | None = None
          ) -> tuple[StoreConfig, list[str]]:
    """Parse [secretproxy] from an ini text; return the config and the problems."""
    path = tmp_path / "a.ini"
    path.write_text("[secretproxy]\n" + text)
    problems: list[ConfigProblem] = []
    reader = ConfigReader(read_ini(str(path), problems), problems, environ=environ or {})
    config = parse_store(reader.section("secretproxy"))
    reader.finish()
    return config, [str(p).split(": ", 1)[1] for p in problems]


def key_file(path: Path, mode: int = 0o600) -> Path:
    """A valid raw key file."""
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    return path


def file_store(tmp_path: Path) -> None:
    """store.key + secrets.json in tmp_path."""
    key = key_file(tmp_path / "store.key")
    StoreFile(str(tmp_path / "secrets.json"), key.read_bytes()).create()


def test_file_store_defaults_and_relative_paths(tmp_path: Path) -> None:
    """store = file is the default; paths are relative to the ini file's folder."""
    file_store(tmp_path)
    config, problems = parse(tmp_path, "store_path = secrets.json\n"
                             "store_key_file = store.key\n")
    assert problems == []
    assert config == StoreConfig(kind="file", store_path=str(tmp_path / "secrets.json"),
                                 store_key_file=str(tmp_path / "store.key"))
    assert config.timeout == 2.0 and config.cache_ttl == 300 and config.cache_size == 1000
    assert config.fetch_rate == Rate(50, 1.0) and config.fallback_dir is None
    assert config.fallback_max_stale == 86400
    assert isinstance(build_store(config, Clock()), FileStore)


def test_file_store_problems(tmp_path: Path) -> None:
    """A missing store, a loose key file and keys of other stores are reported together."""
    key_file(tmp_path / "loose.key", mode=0o644)
    _, problems = parse(tmp_path, "store_path = nothing.json\nstore_key_file = loose.key\n"
                        "vault_addr = https://vault:8200\ndoppler_token = ${env:X}\n")
    assert any("nothing.json does not exist" in p and "appliance secrets init" in p
               for p in problems)
    assert any(p.startswith("[secretproxy] store_key_file: key file") and "chmod 600" in p
               for p in problems)
    assert "[secretproxy] vault_addr: applies only to store = vault" in problems
    assert "[secretproxy] doppler_token: applies only to store = doppler" in problems


def test_every_common_key(tmp_path: Path) -> None:
    """Timeouts, cache, rate, refresh-ahead and fallback keys are read and converted."""
    file_store(tmp_path)
    key_file(tmp_path / "fb.key")
    config, problems = parse(tmp_path, "store_path = secrets.json\nstore_key_file = store.key\n"
                             "store_timeout = 500ms\nsecret_cache_ttl = 10m\n"
                             "secret_cache_size = 50\nstore_fetch_rate = 600/m\n"
                             "secret_refresh_ahead = 30s\nfallback_dir = fb\n"
                             "fallback_key_file = fb.key\nfallback_max_stale = 2h\n")
    assert problems == []
    assert (config.timeout, config.cache_ttl, config.cache_size) == (0.5, 600.0, 50)
    assert config.fetch_rate == Rate(600, 60.0) and config.refresh_ahead == 30.0
    assert config.fallback_dir == str(tmp_path / "fb")
    assert config.fallback_key_file == str(tmp_path / "fb.key")
    assert config.fallback_max_stale == 7200


@pytest.mark.parametrize("text,expected", [
    ("store = redis\n", "expected one of file, env, doppler, vault"),
    ("store = env\nstore_timeout = forever\n", "expected a duration"),
    ("store = env\nstore_fetch_rate = lots\n", "expected a rate such as 100/s"),
    ("store = env\nsecret_cache_size = 0\n", "expected at least 1"),
    ("store = env\nsecret_cache_ttl = 1m\nsecret_refresh_ahead = 1m\n",
     "must be shorter than secret_cache_ttl"),
    ("store = env\nfallback_dir = fb\n", "needs fallback_key_file"),
    ("store = env\nfallback_key_file = fb.key\n", "needs fallback_dir"),
    ("store = env\nstore_ca = ca.pem\n", "applies only to store = doppler or vault"),
    ("store = env\nsurprise = 1\n", "unknown key"),
])
def test_problems(tmp_path: Path, text: str, expected: str) -> None:
    """Each bad value is reported with what was expected."""
    _, problems = parse(tmp_path, text)
    assert any(expected in p for p in problems), problems


def test_loose_fallback_folder_reported(tmp_path: Path) -> None:
    """A fallback folder others can enter is a config problem."""
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb").chmod(0o755)
    key_file(tmp_path / "fb.key")
    _, problems = parse(tmp_path, "store = env\nfallback_dir = fb\nfallback_key_file = fb.key\n")
    assert any("chmod 700" in p for p in problems)


def test_env_store(tmp_path: Path) -> None:
    """store = env reads its prefix."""
    config, problems = parse(tmp_path, "store = env\nenv_prefix = APP_\n"
                             "env_uppercase = false\n")
    assert problems == []
    store = build_store(config, Clock())
    assert isinstance(store, EnvStore) and store.prefix == "APP_" and not store.uppercase


def test_doppler_store(tmp_path: Path) -> None:
    """store = doppler needs a token reference; project and config come together."""
    token = "dp.st.prd." + "C" * 40
    config, problems = parse(tmp_path, "store = doppler\ndoppler_token = ${env:DOPPLER_TOKEN}\n"
                             "doppler_project = payments\ndoppler_config = prd\n",
                             environ={"DOPPLER_TOKEN": token})
    assert problems == []
    assert config.doppler_url == "https://api.doppler.com"
    assert config.doppler_token is not None and config.doppler_token.reveal() == token
    assert token not in repr(config)
    store: Any = build_store(config, Clock())
    assert isinstance(store, DopplerStore) and store.project == "payments"
    _, problems = parse(tmp_path, "store = doppler\ndoppler_token = dp.st.literal\n"
                        "doppler_project = payments\n")
    assert any("doppler_token: expected a secret reference" in p for p in problems)
    assert any("set both doppler_project and doppler_config" in p for p in problems)


def test_vault_store(tmp_path: Path) -> None:
    """store = vault needs an address and a token; mount and namespace are optional."""
    config, problems = parse(tmp_path, "store = vault\nvault_addr = https://vault.internal:8200/\n"
                             "vault_token = ${env:VAULT_TOKEN}\nvault_mount = /kv/apps/\n"
                             "vault_namespace = team-a\n",
                             environ={"VAULT_TOKEN": "hvs." + "C" * 40})
    assert problems == []
    assert config.vault_addr == "https://vault.internal:8200" and config.vault_mount == "kv/apps"
    store: Any = build_store(config, Clock())
    assert isinstance(store, VaultStore) and store.namespace == "team-a"
    assert store.url("p#k") == "https://vault.internal:8200/v1/kv/apps/data/p"
    _, problems = parse(tmp_path, "store = vault\n")
    assert "[secretproxy] vault_addr: is required" in problems
    assert "[secretproxy] vault_token: is required" in problems


@pytest.mark.parametrize("url,ok", [
    ("https://vault.internal:8200", True),
    ("http://127.0.0.1:8200", True),
    ("http://[::1]:8200", True),
    ("http://localhost:8200/", True),
    ("http://vault.internal:8200", False),
    ("https://user:pw@vault.internal", False),
    ("https://vault.internal/?token=x", False),
    ("ftp://vault.internal", False),
    ("https://vault.internal:99999", False),
    ("vault.internal", False),
])
def test_store_urls(url: str, ok: bool) -> None:
    """https anywhere; plain http only to loopback; no credentials in the URL."""
    if ok:
        assert parse_store_url(url) == url.rstrip("/")
    else:
        with pytest.raises(ValueError):
            parse_store_url(url)
