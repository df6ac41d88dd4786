"""
Tests for ResilientSecrets with a fake clock and a scripted store: the
hot path, single flight, TTL, rotation, refetch, refresh-ahead, the breaker,
the fetch rate limit, deadlines, the encrypted disk fallback (with
max_stale), readiness, metrics and redaction.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from appliance.host.redact import MASK, redact
from appliance.resilience import BreakerPolicy, BreakerState, Rate
from appliance.secretproxy.secrets import (
    FallbackCache,
    ResilientSecrets,
    SecretNotFound,
    SecretValue,
    StoreUnavailable,
)

STORE = "scripted"


class ScriptedStore:
    """A store whose answers the test controls; records every fetch."""

    name = STORE

    def __init__(self) -> None:
        self.values: dict[str, tuple[str, str]] = {}
        self.calls: list[str] = []
        self.mode = "ok"  # ok | down | hold
        self.held: list[tuple[str, Deferred[SecretValue]]] = []
        self.checks = 0
        self.closed = False

    def fetch(self, name: str) -> Deferred[SecretValue]:
        self.calls.append(name)
        if self.mode == "down":
            return fail(StoreUnavailable(f"secret store {STORE}: down (scripted)"))
        if self.mode == "hold":
            d: Deferred[SecretValue] = Deferred()
            self.held.append((name, d))
            return d
        return self._answer(name)

    def _answer(self, name: str) -> Deferred[SecretValue]:
        if name not in self.values:
            return fail(SecretNotFound(name))
        value, version = self.values[name]
        return succeed(SecretValue(value=value, version=version, fetched_at=-1.0))

    def release(self) -> None:
        held, self.held = self.held, []
        for name, d in held:
            if not d.called:
                self._answer(name).chainDeferred(d)

    def check(self) -> Deferred[None]:
        self.checks += 1
        if self.mode == "down":
            return fail(StoreUnavailable("down (scripted)"))
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def secrets_for(store: ScriptedStore, clock: Clock | None = None, **kw: Any
                ) -> tuple[ResilientSecrets, Clock, CollectorRegistry]:
    """A ResilientSecrets on a fake clock with its own registry."""
    clock = clock or Clock()
    registry = CollectorRegistry()
    kw.setdefault("ttl", 60.0)
    kw.setdefault("health_interval", 0)
    return ResilientSecrets(store, clock, registry=registry, **kw), clock, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric's value (0 when absent)."""
    value = registry.get_sample_value(name, {"store": STORE, **labels})
    return value or 0.0


def outcome(d: Deferred[Any]) -> Any:
    """What a Deferred fired with so far: a value, an exception, or None."""
    seen: list[Any] = []
    d.addCallbacks(seen.append, lambda f: seen.append(f.value))
    return seen[0] if seen else None


def unique(label: str) -> str:
    """A value never used before in this session (so redaction tests are honest)."""
    return f"{label}-{os.urandom(8).hex()}"


# -- hot path, single flight, TTL -------------------------------------------------


def test_single_flight_and_cache_hits() -> None:
    """N concurrent misses make one fetch; later lookups are memory hits."""
    store = ScriptedStore()
    value = unique("single")
    store.values["API_KEY"] = (value, "1")
    store.mode = "hold"
    secrets, _, registry = secrets_for(store)
    assert secrets.get_now("API_KEY") is None
    waiting = [secrets.get("API_KEY") for _ in range(25)]
    assert store.calls == ["API_KEY"]
    store.release()
    assert {outcome(d).value for d in waiting} == {value}
    assert secrets.get_now("API_KEY").value == value  # type: ignore[union-attr]
    assert outcome(secrets.get("API_KEY")).value == value
    assert store.calls == ["API_KEY"]
    assert sample(registry, "appliance_secretproxy_secret_cache_total", result="miss") == 25
    assert sample(registry, "appliance_secretproxy_secret_cache_total", result="hit") == 2
    assert registry.get_sample_value("appliance_secretproxy_secret_fetch_seconds_count",
                                     {"store": STORE}) == 1


def test_ttl_expiry_refetches_and_rotation_is_counted() -> None:
    """After the TTL the next get fetches; a new version replaces the value and counts."""
    store = ScriptedStore()
    old, new = unique("old"), unique("new")
    store.values["API_KEY"] = (old, "1")
    secrets, clock, registry = secrets_for(store, ttl=30.0)
    assert outcome(secrets.get("API_KEY")).value == old
    store.values["API_KEY"] = (new, "2")
    clock.advance(29.9)
    assert secrets.get_now("API_KEY").value == old  # type: ignore[union-attr]
    clock.advance(0.1)
    assert secrets.get_now("API_KEY") is None
    value = outcome(secrets.get("API_KEY"))
    assert value.value == new and value.version == "2" and value.fetched_at == 30.0
    assert len(store.calls) == 2
    assert sample(registry, "appliance_secretproxy_secret_rotations_total") == 1
    clock.advance(30)
    assert outcome(secrets.get("API_KEY")).value == new  # same version: no rotation
    assert sample(registry, "appliance_secretproxy_secret_rotations_total") == 1


def test_invalidate_and_refetch_after_an_upstream_401() -> None:
    """invalidate forces a fetch; concurrent refetches share one; a refetch right
    after a fetch reuses it."""
    store = ScriptedStore()
    first, second = unique("first"), unique("second")
    store.values["API_KEY"] = (first, "1")
    secrets, clock, registry = secrets_for(store)
    assert outcome(secrets.get("API_KEY")).value == first
    store.values["API_KEY"] = (second, "2")
    secrets.invalidate("API_KEY")
    assert outcome(secrets.get("API_KEY")).value == second
    assert sample(registry, "appliance_secretproxy_secret_rotations_total") == 1
    calls = len(store.calls)
    assert outcome(secrets.refetch("API_KEY")).value == second  # fetched 0s ago: reused
    assert len(store.calls) == calls
    clock.advance(2)
    store.mode = "hold"
    many = [secrets.refetch("API_KEY") for _ in range(10)]
    assert len(store.calls) == calls + 1
    store.release()
    assert {outcome(d).value for d in many} == {second}


def test_refresh_ahead_fetches_in_the_background() -> None:
    """A hit near the end of the TTL starts one background fetch; the old value
    is served meanwhile and replaced when the fetch lands."""
    store = ScriptedStore()
    old, new = unique("old"), unique("new")
    store.values["API_KEY"] = (old, "1")
    secrets, clock, _ = secrets_for(store, ttl=10.0, refresh_ahead=3.0)
    outcome(secrets.get("API_KEY"))
    clock.advance(6.9)
    secrets.get_now("API_KEY")
    assert len(store.calls) == 1
    clock.advance(0.2)
    store.mode = "hold"
    store.values["API_KEY"] = (new, "2")
    for _ in range(5):
        assert secrets.get_now("API_KEY").value == old  # type: ignore[union-attr]
    assert len(store.calls) == 2
    store.release()
    clock.advance(9.0)  # 16.1s after the first fetch, 9s after the refresh
    assert secrets.get_now("API_KEY").value == new  # type: ignore[union-attr]


def test_not_found_is_not_cached_and_names_are_checked() -> None:
    """SecretNotFound reaches the caller each time; invalid names fail without a fetch."""
    store = ScriptedStore()
    secrets, _, _ = secrets_for(store)
    assert isinstance(outcome(secrets.get("MISSING")), SecretNotFound)
    assert isinstance(outcome(secrets.get("MISSING")), SecretNotFound)
    assert store.calls == ["MISSING", "MISSING"]
    assert isinstance(outcome(secrets.get("bad name")), SecretNotFound)
    assert isinstance(outcome(secrets.get("x" * 300)), SecretNotFound)
    assert store.calls == ["MISSING", "MISSING"]


# -- breaker, rate limit, deadline ---------------------------------------------------


def test_breaker_opens_and_the_store_sees_nothing_while_open() -> None:
    """After 5 failures the breaker opens: calls fail fast without reaching the
    store; after the open period one probe closes it again."""
    store = ScriptedStore()
    store.values["API_KEY"] = (unique("v"), "1")
    store.mode = "down"
    secrets, clock, registry = secrets_for(store, breaker_policy=BreakerPolicy(
        failure_threshold=5, open_base=10.0))
    for _ in range(5):
        assert isinstance(outcome(secrets.get("API_KEY")), StoreUnavailable)
    assert secrets.breaker.state is BreakerState.OPEN and len(store.calls) == 5
    for _ in range(20):
        error = outcome(secrets.get("API_KEY"))
        assert isinstance(error, StoreUnavailable) and "circuit open" in str(error)
        assert error.retry_after is not None and error.retry_after > 0
    assert len(store.calls) == 5
    assert registry.get_sample_value("appliance_breaker_state",
                                     {"breaker": f"secretstore-{STORE}"}) == 1
    assert secrets.readiness() == (False, f"secret store {STORE} is failing: "
                                   f"secret store {STORE}: down (scripted)")
    clock.advance(10)
    store.mode = "ok"
    assert outcome(secrets.get("API_KEY")).version == "1"
    assert secrets.breaker.state is BreakerState.CLOSED and len(store.calls) == 6
    assert secrets.readiness()[0] is True


def test_not_found_does_not_trip_the_breaker() -> None:
    """The store answering 'no such secret' is a healthy store."""
    store = ScriptedStore()
    secrets, _, _ = secrets_for(store, breaker_policy=BreakerPolicy(failure_threshold=2))
    for _ in range(10):
        assert isinstance(outcome(secrets.get("MISSING")), SecretNotFound)
    assert secrets.breaker.state is BreakerState.CLOSED and len(store.calls) == 10


def test_fetch_rate_limit_fails_fast() -> None:
    """Beyond store_fetch_rate fetches fail with StoreUnavailable without a call
    and without counting against the breaker."""
    store = ScriptedStore()
    for n in range(5):
        store.values[f"K{n}"] = (unique("k"), "1")
    secrets, clock, _ = secrets_for(store, fetch_rate=Rate(2, 1.0),
                                    breaker_policy=BreakerPolicy(failure_threshold=1))
    assert outcome(secrets.get("K0")).version == "1"
    assert outcome(secrets.get("K1")).version == "1"
    error = outcome(secrets.get("K2"))
    assert isinstance(error, StoreUnavailable) and "rate limit (2/s)" in str(error)
    assert error.retry_after == pytest.approx(0.5)
    assert store.calls == ["K0", "K1"] and secrets.breaker.state is BreakerState.CLOSED
    clock.advance(0.5)
    assert outcome(secrets.get("K2")).version == "1"


def test_a_hung_store_times_out() -> None:
    """A fetch without an answer fails after the timeout and is cancelled."""
    store = ScriptedStore()
    store.mode = "hold"
    secrets, clock, _ = secrets_for(store, timeout=2.0)
    d = secrets.get("API_KEY")
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    error = outcome(d)
    assert isinstance(error, StoreUnavailable) and "no answer within 2s" in str(error)
    assert store.held[0][1].called  # cancelled
    assert not clock.getDelayedCalls()


# -- fallback ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_store_down_served_from_the_fallback(reactor: Any, tmp_path: Path) -> None:
    """While the store fails, the last value is served (memory, then disk after a
    restart) with the metric and a warning naming the secret, never the value."""
    store = ScriptedStore()
    value = unique("fallback")
    store.values["API_KEY"] = (value, "7")
    key = os.urandom(32)
    folder = str(tmp_path / "fallback")
    fallback = FallbackCache(folder, key, reactor, STORE)
    secrets, clock, registry = secrets_for(store, ttl=60.0, fallback=fallback,
                                           max_stale=3600.0)
    assert (await secrets.get("API_KEY")).value == value
    await fallback.wait()
    store.mode = "down"
    clock.advance(61)
    with capturedLogs() as events:
        served = await secrets.get("API_KEY")
    assert served.value == value and served.from_fallback and served.version == "7"
    assert sample(registry, "appliance_secretproxy_secret_fallback_total") == 1
    warnings = [formatEvent(e) for e in events if "fallback cache" in formatEvent(e)]
    assert len(warnings) == 1 and "API_KEY" in warnings[0] and value not in warnings[0]
    assert "(memory" in warnings[0]
    assert secrets.get_now("API_KEY").from_fallback  # type: ignore[union-attr]
    assert sample(registry, "appliance_secretproxy_secret_cache_total", result="stale") == 2

    # A restart: nothing in memory, the store still down -> the disk copy.
    restarted, _, registry2 = secrets_for(store, clock=clock, fallback=FallbackCache(
        folder, key, reactor, STORE), max_stale=3600.0)
    assert restarted.readiness()[0] is False
    await restarted.start()
    ready, reason = restarted.readiness()
    assert ready and "fallback cache is usable" in reason
    with capturedLogs() as events:
        served = await restarted.get("API_KEY")
    assert served.value == value and served.from_fallback
    assert any("(disk" in formatEvent(e) for e in events)
    assert sample(registry2, "appliance_secretproxy_secret_fallback_total") == 1
    assert redact(f"header={value}") == f"header={MASK}"
    await restarted.stop()


@pytest_twisted.ensureDeferred
async def test_fallback_older_than_max_stale_is_refused(reactor: Any, tmp_path: Path) -> None:
    """A fallback value fetched longer than max_stale ago is not served (503)."""
    store = ScriptedStore()
    store.values["API_KEY"] = (unique("stale"), "1")
    fallback = FallbackCache(str(tmp_path / "fb"), os.urandom(32), reactor, STORE)
    secrets, clock, registry = secrets_for(store, ttl=60.0, fallback=fallback,
                                           max_stale=600.0)
    await secrets.get("API_KEY")
    await fallback.wait()
    store.mode = "down"
    clock.advance(601)
    error = await _failure(secrets.get("API_KEY"))
    assert isinstance(error, StoreUnavailable)
    assert "is 601s old, beyond max_stale (600s)" in str(error)
    assert sample(registry, "appliance_secretproxy_secret_fallback_total") == 0
    assert secrets.readiness()[0] is False


@pytest_twisted.ensureDeferred
async def test_fallback_copy_expires_from_memory_by_max_stale(reactor: Any,
                                                             tmp_path: Path) -> None:
    """A fallback value kept in memory stops being served once max_stale is reached."""
    store = ScriptedStore()
    store.values["API_KEY"] = (unique("edge"), "1")
    fallback = FallbackCache(str(tmp_path / "fb"), os.urandom(32), reactor, STORE)
    secrets, clock, _ = secrets_for(store, ttl=10.0, fallback=fallback, max_stale=12.0,
                                    fallback_ttl=5.0)
    await secrets.get("API_KEY")
    await fallback.wait()
    store.mode = "down"
    clock.advance(10)
    assert (await secrets.get("API_KEY")).from_fallback
    clock.advance(1.9)
    assert secrets.get_now("API_KEY") is not None  # capped to the 2s left of max_stale
    clock.advance(0.2)
    assert secrets.get_now("API_KEY") is None
    assert isinstance(await _failure(secrets.get("API_KEY")), StoreUnavailable)


def test_store_down_without_fallback_fails() -> None:
    """Without a fallback a failing store is an error, even for a value seen before."""
    store = ScriptedStore()
    store.values["API_KEY"] = (unique("nofb"), "1")
    secrets, clock, _ = secrets_for(store, ttl=5.0)
    outcome(secrets.get("API_KEY"))
    store.mode = "down"
    clock.advance(6)
    error = outcome(secrets.get("API_KEY"))
    assert isinstance(error, StoreUnavailable) and "down (scripted)" in str(error)


@pytest_twisted.ensureDeferred
async def test_not_found_is_never_served_from_the_fallback(reactor: Any,
                                                           tmp_path: Path) -> None:
    """A secret deleted in the store is gone: its fallback file is removed too."""
    store = ScriptedStore()
    store.values["API_KEY"] = (unique("deleted"), "1")
    fallback = FallbackCache(str(tmp_path / "fb"), os.urandom(32), reactor, STORE)
    secrets, clock, _ = secrets_for(store, ttl=5.0, fallback=fallback)
    await secrets.get("API_KEY")
    await fallback.wait()
    assert os.path.exists(fallback.path("API_KEY"))
    del store.values["API_KEY"]
    clock.advance(6)
    assert isinstance(await _failure(secrets.get("API_KEY")), SecretNotFound)
    await fallback.wait()
    assert not os.path.exists(fallback.path("API_KEY"))
    store.mode = "down"
    error = await _failure(secrets.get("API_KEY"))
    assert isinstance(error, StoreUnavailable) and "no fallback value" in str(error)


@pytest_twisted.ensureDeferred
async def test_fallback_files_are_private_hashed_and_encrypted(reactor: Any,
                                                               tmp_path: Path) -> None:
    """Files are named by an HMAC (no secret name), mode 0600 in a 0700 folder,
    encrypted; tampered or renamed files are not used."""
    folder = tmp_path / "fb"
    fallback = FallbackCache(str(folder), os.urandom(32), reactor, STORE)
    values = {name: unique(name) for name in ("STRIPE_KEY", "GITHUB_TOKEN")}
    for name, value in values.items():
        await fallback.write(name, SecretValue(value=value, version="3", fetched_at=5.0))
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    files = sorted(folder.iterdir())
    assert len(files) == 2
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert len(path.stem) == 64 and path.suffix == ".secret"
        data = path.read_bytes()
        for name, value in values.items():
            assert name not in path.name and name.encode() not in data
            assert value.encode() not in data
    read = await fallback.read("STRIPE_KEY")
    assert read is not None and read.value == values["STRIPE_KEY"] and read.fetched_at == 5.0
    assert await fallback.read("UNKNOWN") is None

    # Swap the two files: each now fails authentication under the other's name.
    a, b = fallback.path("STRIPE_KEY"), fallback.path("GITHUB_TOKEN")
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    with capturedLogs() as events:
        assert await fallback.read("STRIPE_KEY") is None
    assert any("failed authentication" in formatEvent(e) for e in events)
    # Flip one byte: refused too.
    data = bytearray(Path(b).read_bytes())
    data[-1] ^= 1
    Path(b).write_bytes(bytes(data))
    assert await fallback.read("GITHUB_TOKEN") is None
    # Another key cannot read the folder.
    stranger = FallbackCache(str(folder), os.urandom(32), reactor, STORE)
    assert await stranger.scan() == 0


def test_fallback_folder_with_loose_mode_refused(tmp_path: Path) -> None:
    """A fallback folder others can enter is refused at construction."""
    folder = tmp_path / "loose"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(ValueError, match="chmod 700"):
        FallbackCache(str(folder), os.urandom(32), None, STORE)


# -- readiness, status, health, redaction -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_readiness_health_checks_and_status(reactor: Any) -> None:
    """start() checks the store periodically; readiness follows the last outcome;
    status holds no value."""
    store = ScriptedStore()
    value = unique("status")
    store.values["API_KEY"] = (value, "1")
    secrets, clock, _ = secrets_for(store, health_interval=10.0)
    assert secrets.readiness() == (False, f"secret store {STORE} not reached yet")
    await secrets.start()
    assert store.checks == 1 and secrets.readiness()[0]
    store.mode = "down"
    clock.advance(10)
    assert store.checks == 2 and secrets.readiness()[0] is False
    store.mode = "ok"
    clock.advance(10)
    assert secrets.readiness()[0]
    await secrets.get("API_KEY")
    status = secrets.status()
    assert status["store"] == STORE and status["ready"] and status["fallback"] is None
    assert value not in repr(status)
    await secrets.stop()
    assert store.closed and not clock.getDelayedCalls()


def test_every_fetched_value_is_redacted() -> None:
    """Values fetched (first and rotated) are masked by redact() from then on."""
    store = ScriptedStore()
    first, second = unique("redact-one"), unique("redact-two")
    store.values["API_KEY"] = (first, "1")
    secrets, _, _ = secrets_for(store)
    assert redact(f"x {second} y") == f"x {second} y"  # not known yet
    outcome(secrets.get("API_KEY"))
    store.values["API_KEY"] = (second, "2")
    secrets.invalidate("API_KEY")
    outcome(secrets.get("API_KEY"))
    assert redact(f"a {first} b {second} c") == f"a {MASK} b {MASK} c"


async def _failure(d: Deferred[Any]) -> BaseException:
    try:
        result = await d
    except Exception as error:
        return error
    raise AssertionError(f"expected a failure, got {result!r}")
