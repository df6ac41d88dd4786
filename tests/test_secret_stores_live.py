"""
ResilientSecrets in front of real stores on real sockets (the
Doppler-compatible server, the file store built from an ini file): the
server sees one request for concurrent misses, none for cache hits and none
while the breaker is open; a stopped server is covered by the disk
fallback across a restart.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet.defer import gatherResults
from twisted.logger import capturedLogs, formatEvent

from appliance.host.ini import ConfigProblem, ConfigReader, read_ini
from appliance.host.redact import MASK, redact
from appliance.host.secret import Secret
from appliance.resilience import BreakerPolicy
from appliance.secretproxy.secrets import (
    DopplerStore,
    FallbackCache,
    ResilientSecrets,
    StoreFile,
    StoreHTTP,
    StoreUnavailable,
    build_secrets,
    parse_store,
)
from tests.secret_servers import FakeDoppler, SecretServer

TOKEN = "dp.st.prd." + "L" * 40


@pytest_twisted.async_yield_fixture
async def doppler(reactor: Any) -> AsyncIterator[SecretServer]:
    """A Doppler-compatible server with a service token."""
    fake = FakeDoppler()
    fake.service_tokens[TOKEN] = ("payments", "prd")
    server = SecretServer(fake, reactor).start()
    yield server
    await server.stop()


def resilient(reactor: Any, server: SecretServer, registry: CollectorRegistry,
              **kw: Any) -> ResilientSecrets:
    """ResilientSecrets over a DopplerStore to C{server}, on the real clock."""
    store = DopplerStore(StoreHTTP(reactor, kw.pop("timeout", 2.0)),
                         Secret("${env:DOPPLER_TOKEN}", TOKEN), server.url)
    kw.setdefault("health_interval", 0)
    return ResilientSecrets(store, reactor, registry=registry, **kw)


def set_secret(server: SecretServer, name: str, value: str) -> None:
    """Create or change a secret on the fake Doppler."""
    fake: FakeDoppler = server.fake  # type: ignore[assignment]
    fake.set_secret("payments", "prd", name, value)


def new_value(label: str) -> str:
    """A value never seen before."""
    return f"{label}-{os.urandom(10).hex()}"


@pytest_twisted.ensureDeferred
async def test_concurrent_misses_make_one_request(reactor: Any, doppler: SecretServer) -> None:
    """20 concurrent gets of one secret: one request at the server; then hits
    cost nothing; after invalidate the rotated value arrives."""
    value, rotated = new_value("live"), new_value("live-rotated")
    set_secret(doppler, "STRIPE_KEY", value)
    doppler.fake.etag = True  # type: ignore[attr-defined]
    registry = CollectorRegistry()
    secrets = resilient(reactor, doppler, registry)
    try:
        results = await gatherResults([secrets.get("STRIPE_KEY") for _ in range(20)])
        assert {r.value for r in results} == {value}
        assert len(doppler.fake.requests) == 1
        for _ in range(100):
            assert secrets.get_now("STRIPE_KEY").value == value  # type: ignore[union-attr]
        assert (await secrets.get("STRIPE_KEY")).value == value
        assert len(doppler.fake.requests) == 1
        set_secret(doppler, "STRIPE_KEY", rotated)
        assert secrets.get_now("STRIPE_KEY").value == value  # type: ignore[union-attr]
        secrets.invalidate("STRIPE_KEY")
        fresh = await secrets.get("STRIPE_KEY")
        assert fresh.value == rotated and fresh.version == 'W/"2"'
        assert registry.get_sample_value("appliance_secretproxy_secret_rotations_total",
                                         {"store": "doppler"}) == 1
        assert redact(f"{value} {rotated}") == f"{MASK} {MASK}"
    finally:
        await secrets.stop()


@pytest_twisted.ensureDeferred
async def test_breaker_open_means_no_requests(reactor: Any, doppler: SecretServer) -> None:
    """After 3 server errors the breaker opens and the server sees nothing more."""
    set_secret(doppler, "STRIPE_KEY", new_value("breaker"))
    doppler.fake.fail_with = 500
    secrets = resilient(reactor, doppler, CollectorRegistry(),
                        breaker_policy=BreakerPolicy(failure_threshold=3, open_base=30))
    try:
        for _ in range(3):
            error = await _failure(secrets.get("STRIPE_KEY"))
            assert isinstance(error, StoreUnavailable) and "server error (500)" in str(error)
        assert len(doppler.fake.requests) == 3
        for _ in range(50):
            error = await _failure(secrets.get("STRIPE_KEY"))
            assert "circuit open" in str(error)
        assert len(doppler.fake.requests) == 3
    finally:
        await secrets.stop()


@pytest_twisted.ensureDeferred
async def test_stopped_server_served_from_disk_after_restart(
        reactor: Any, doppler: SecretServer, tmp_path: Path) -> None:
    """The server stops and the appliance restarts: the encrypted fallback on
    disk serves the last value, with the metric and a warning line."""
    value = new_value("disk")
    set_secret(doppler, "STRIPE_KEY", value)
    key = os.urandom(32)
    folder = str(tmp_path / "fallback")
    first = resilient(reactor, doppler, CollectorRegistry(),
                      fallback=FallbackCache(folder, key, reactor, "doppler"))
    assert (await first.get("STRIPE_KEY")).value == value
    await first.stop()
    await doppler.stop()

    registry = CollectorRegistry()
    second = resilient(reactor, doppler, registry, timeout=0.5,
                       fallback=FallbackCache(folder, key, reactor, "doppler"))
    await second.start()
    try:
        with capturedLogs() as events:
            served = await second.get("STRIPE_KEY")
        assert served.value == value and served.from_fallback
        assert registry.get_sample_value("appliance_secretproxy_secret_fallback_total",
                                         {"store": "doppler"}) == 1
        lines = [formatEvent(e) for e in events]
        warning = [line for line in lines if "serving secret STRIPE_KEY" in line]
        assert warning and "(disk" in warning[0] and value not in "".join(lines)
        assert second.readiness()[0]
    finally:
        await second.stop()

    third = resilient(reactor, doppler, CollectorRegistry(), timeout=0.5)
    try:
        error = await _failure(third.get("STRIPE_KEY"))
        assert isinstance(error, StoreUnavailable) and "no answer" in str(error)
    finally:
        await third.stop()


@pytest_twisted.ensureDeferred
async def test_file_store_built_from_an_ini_file(reactor: Any, tmp_path: Path) -> None:
    """[secretproxy] store = file with relative paths, through parse_store and
    build_secrets, serves a value written by StoreFile, with the fallback."""
    key = os.urandom(32)
    (tmp_path / "store.key").write_bytes(base64.b64encode(key))
    (tmp_path / "store.key").chmod(0o600)
    (tmp_path / "fallback.key").write_bytes(os.urandom(32))
    (tmp_path / "fallback.key").chmod(0o400)
    store_file = StoreFile(str(tmp_path / "secrets.json"), key)
    store_file.create()
    value = new_value("ini")
    store_file.put("STRIPE_KEY", value)
    ini = tmp_path / "appliance.ini"
    ini.write_text("[secretproxy]\nstore = file\nstore_path = secrets.json\n"
                   "store_key_file = store.key\nsecret_cache_ttl = 1m\n"
                   "fallback_dir = fallback\nfallback_key_file = fallback.key\n"
                   "fallback_max_stale = 2h\n")
    problems: list[ConfigProblem] = []
    reader = ConfigReader(read_ini(str(ini), problems), problems)
    config = parse_store(reader.section("secretproxy"))
    reader.finish()
    assert problems == []
    secrets = build_secrets(config, reactor, reactor, CollectorRegistry())
    await secrets.start()
    try:
        assert (await secrets.get("STRIPE_KEY")).value == value
        assert secrets.ttl == 60 and secrets.max_stale == 7200
        assert secrets.fallback is not None
        await secrets.fallback.wait()
        assert len(os.listdir(tmp_path / "fallback")) == 1
        assert secrets.readiness()[0]
    finally:
        await secrets.stop()


async def _failure(d: Any) -> BaseException:
    try:
        result = await d
    except Exception as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")
