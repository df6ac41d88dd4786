"""Tests for loading and validating the whole configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.host.config import load_config
from appliance.host.ini import ConfigError
from appliance.host.plugin import discover_plugins

PLUGINS = discover_plugins()


def write(path: Path, text: str) -> Path:
    """Write an ini file for a test."""
    path.write_text(text)
    return path


def problems_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    """The problems loading C{path} reports, as text."""
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), PLUGINS, environ or {})
    return [str(problem) for problem in caught.value.problems]


def test_shipped_config_is_valid() -> None:
    """etc/appliance.ini loads with echo enabled on loopback."""
    config = load_config("etc/appliance.ini", PLUGINS)
    assert [s.name for s in config.services] == ["echo", "pow"]
    assert config.admin.listen.endswith("interface=127.0.0.1")
    assert config.host.shutdown_timeout == 30.0
    assert config.host.redis is None


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes in one file are all reported, each with file, section and key."""
    path = write(tmp_path / "a.ini", """
[appliance]
shutdown_timeout = forever
redis = http://localhost

[admin]
listen = tcp:notaport
token = plain-text-token

[echo]
delay = 3 parsecs
max_conections = 5

[ehco]
listen = tcp:1
""")
    found = problems_of(path)
    joined = "\n".join(found)
    assert len(found) == 7, joined
    assert f"{path}: [appliance] shutdown_timeout: expected a duration" in joined
    assert "[appliance] redis: expected redis://HOST:PORT/DB" in joined
    assert "[admin] listen: expected a Twisted endpoint" in joined
    assert "[admin] token: expected a secret reference" in joined
    assert "[echo] delay: expected a duration" in joined
    assert "[echo] max_conections: unknown key; did you mean max_connections?" in joined
    assert "[ehco]: unknown section; did you mean [echo]?" in joined


def test_includes_override_and_name_their_file(tmp_path: Path) -> None:
    """Included files override keys and problems name the included file."""
    (tmp_path / "conf.d").mkdir()
    main = write(tmp_path / "main.ini", "[appliance]\ninclude = conf.d/*.ini\n"
                 "shutdown_timeout = 10s\n[echo]\nlisten = tcp:0\n")
    write(tmp_path / "conf.d" / "10-time.ini", "[appliance]\nshutdown_timeout = 5s\n")
    config = load_config(str(main), PLUGINS, {})
    assert config.host.shutdown_timeout == 5.0
    assert len(config.files) == 2
    bad = write(tmp_path / "conf.d" / "20-bad.ini", "[echo]\ndelay = soon\n")
    assert problems_of(main) == [f"{bad}: [echo] delay: expected a duration such as "
                                 "250ms, 30s, 5m or 1h, got 'soon'"]


def test_missing_include_and_syntax_errors(tmp_path: Path) -> None:
    """A missing included file and a line that is not key = value are both reported."""
    main = write(tmp_path / "main.ini", "[appliance]\ninclude = other.ini\n")
    assert "included file" in problems_of(main)[0]
    broken = write(tmp_path / "broken.ini", "[echo]\nthis is not a pair\n")
    assert "expected 'key = value'" in problems_of(broken)[0]
    headless = write(tmp_path / "headless.ini", "key = value\n")
    assert "before any [section]" in problems_of(headless)[0]
    assert "cannot read" in problems_of(tmp_path / "absent.ini")[0]


def test_secret_file_permissions(tmp_path: Path) -> None:
    """A token file readable by others is refused; a 0600 one is accepted."""
    token = write(tmp_path / "token", "admin-token-value\n")
    os.chmod(token, 0o640)
    main = write(tmp_path / "main.ini", f"[admin]\ntoken = file:{token}\n")
    assert "accessible by group or others" in problems_of(main)[0]
    os.chmod(token, 0o600)
    config = load_config(str(main), PLUGINS, {})
    assert config.admin.token is not None
    assert config.admin.token.reveal() == "admin-token-value"


def test_redis_settings(tmp_path: Path) -> None:
    """Redis is a URL without a password; the password comes by reference."""
    main = write(tmp_path / "r.ini", "[appliance]\nredis = redis://127.0.0.1:6390/2\n"
                 "redis_password = ${env:RPW}\n")
    config = load_config(str(main), PLUGINS, {"RPW": "redis-password"})
    assert config.host.redis is not None
    assert (config.host.redis.port, config.host.redis.db) == (6390, 2)
    inline = write(tmp_path / "i.ini", "[appliance]\nredis = redis://:pw@127.0.0.1:6390/0\n")
    assert "without a password" in problems_of(inline)[0]


def test_disabled_service_is_not_validated(tmp_path: Path) -> None:
    """enabled = false skips a service and does not validate its keys."""
    main = write(tmp_path / "d.ini", "[echo]\nenabled = false\ndelay = broken\n")
    assert load_config(str(main), PLUGINS, {}).services == ()


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_random_files_give_config_or_config_error(tmp_path: Path, text: str) -> None:
    """Whatever a file holds, loading returns a config or raises ConfigError."""
    path = tmp_path / "fuzz.ini"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(str(path), PLUGINS, {})
    except ConfigError as error:
        assert error.problems


def test_examples_are_valid(tmp_path: Path) -> None:
    """Every commented example in etc/examples/ loads without a problem (the secret
    store's files are made for the test, where the example points at /var and /etc)."""
    from appliance.secretproxy.secrets.cli import main as secrets

    store, key = tmp_path / "secrets.json", tmp_path / "secrets.key"
    assert secrets(["init", "--store", str(store), "--key-file", str(key)]) == 0
    environ = {"APPLIANCE_POW_KEY": "k" * 40, "BILLING_SESSION_SECRET": "s" * 24}
    examples = sorted(Path("etc/examples").glob("*.ini"))
    assert len(examples) >= 3
    for example in examples:
        text = example.read_text().replace("/var/lib/appliance/secrets.json", str(store))
        copy = tmp_path / example.name
        copy.write_text(text.replace("/etc/appliance/secrets.key", str(key)))
        config = load_config(str(copy), PLUGINS, environ)
        assert config.services, example
