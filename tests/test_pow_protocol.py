"""
Tests for the pow protocol and engine with in-memory transports and a fake
clock: phases and deadlines, drain, replay, adaptive difficulty, limits.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from appliance.host.config import load_config
from appliance.host.drain import ConnectionTracker
from appliance.host.plugin import discover_plugins
from appliance.pow.challenge import Challenge, ChallengeSigner
from appliance.pow.difficulty import (
    BUCKETS,
    DifficultyController,
    DifficultyPolicy,
    client_group,
)
from appliance.pow.engine import PowEngine, PowMetrics, memory_replay
from appliance.pow.frames import HEADER, FrameDecoder, MessageType, encode
from appliance.pow.quotes import QuoteSource
from appliance.pow.replay import MemoryReplaySet, ReplaySetFull
from appliance.pow.server import PowFactory, PowProtocol
from appliance.pow.solver import solve
from appliance.resilience import MemoryLimiter, Quota, Rate

KEY = "k" * 40


def pow_config(tmp_path: Path, extra: str = "") -> Any:
    """A parsed [pow] config with a key from the environment."""
    path = tmp_path / "pow.ini"
    path.write_text("[pow]\nlisten = tcp:0:interface=127.0.0.1\ndifficulty = 8\n"
                    "min_difficulty = 4\nmax_difficulty = 20\n" + extra +
                    "\n[pow.key:k1]\nsecret = ${env:POW_TEST_KEY}\n")
    config = load_config(str(path), discover_plugins(), {"POW_TEST_KEY": KEY})
    service = config.service("pow")
    assert service is not None
    return service.config


class Harness:
    """An engine and factory on a fake clock, and helpers to talk to it."""

    def __init__(self, config: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        registry = CollectorRegistry()
        self.config = config
        self.quotes = QuoteSource(config.quotes, registry, self.clock)
        limiter = MemoryLimiter("pow", self.clock, Quota("gcra", config.rate_limit,
                                                         config.rate_limit_burst))
        self.engine = PowEngine(config, self.clock,
                                DifficultyController(config.difficulty, self.clock),
                                limiter, memory_replay(config, self.clock), self.quotes,
                                PowMetrics(registry))
        self.registry = registry
        self.tracker = ConnectionTracker(self.clock, "pow")
        self.factory = PowFactory(self.engine, self.clock, self.tracker)
        self.factory.doStart()  # the deadline sweep runs on the fake clock

    def connect(self, host: str = "127.0.0.1") -> tuple[Any, StringTransport]:
        """A protocol on a StringTransport from C{host}."""
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol = self.factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return protocol, transport

    def rejected(self, reason: str) -> float:
        """The rejection counter for C{reason}."""
        return self.registry.get_sample_value("appliance_pow_rejections_total",
                                              {"reason": reason}) or 0


def frames_of(transport: StringTransport) -> list[Any]:
    """Decode what the server wrote."""
    return FrameDecoder(1024 * 1024).feed(transport.value())


def challenge_of(harness: Harness, protocol: Any, transport: StringTransport) -> dict:
    """Ask for a challenge and return its payload."""
    protocol.dataReceived(encode(MessageType.CHALLENGE_REQUEST, {}))
    frame = frames_of(transport)[-1]
    assert frame.type == MessageType.CHALLENGE, frame
    transport.clear()
    return frame.payload


def solution_for(payload: dict) -> dict:
    """Solve a challenge payload and build the SOLUTION payload."""
    nonces, _ = solve(Challenge.from_json(payload["challenge"]))
    return {"challenge": payload["challenge"], "signature": payload["signature"],
            "nonces": nonces}


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    """An engine with difficulty 8, one round per connection."""
    return Harness(pow_config(tmp_path))


def test_full_round_serves_one_quote_then_closes(harness: Harness) -> None:
    """challenge -> solution -> quote, then the connection closes (one round)."""
    protocol, transport = harness.connect()
    payload = challenge_of(harness, protocol, transport)
    assert payload["challenge"]["difficulty"] == 8 and payload["challenge"]["address"] \
        == "127.0.0.1"
    protocol.dataReceived(encode(MessageType.SOLUTION, solution_for(payload)))
    [quote] = frames_of(transport)
    assert quote.type == MessageType.QUOTE and quote.payload["quote"]
    assert transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_a_request_waiting_at_accept_is_answered(harness: Harness) -> None:
    """
    A client that sends its CHALLENGE_REQUEST before the server accepts (real
    loopback TCP) gets its challenge from the read made at accept time.
    """
    from twisted.internet import reactor

    answered_at_accept = []

    class Recording(PowProtocol):
        def connectionMade(self) -> None:  # noqa: N802 (Twisted naming)
            super().connectionMade()
            answered_at_accept.append(self._awaiting_solution)

    harness.factory.protocol = Recording
    port = reactor.listenTCP(0, harness.factory, interface="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        sock.sendall(encode(MessageType.CHALLENGE_REQUEST, {}))
        data = await deferToThread(_read_frames, sock, 1)
        [frame] = FrameDecoder(1024 * 1024).feed(data)
        assert frame.type == MessageType.CHALLENGE
        assert frame.payload["challenge"]["address"] == "127.0.0.1"
        assert answered_at_accept == [True]  # no second reactor turn was needed
    finally:
        sock.close()
        await port.stopListening()


def _read_frames(sock: socket.socket, count: int) -> bytes:
    """Read from a blocking socket until C{count} whole frames have come."""
    data = b""
    while True:
        try:
            if len(FrameDecoder(1024 * 1024).feed(data)) >= count:
                return data
        except Exception:
            return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_several_rounds_when_configured(tmp_path: Path) -> None:
    """With rounds_per_connection = 2 a second round runs on the same connection."""
    harness = Harness(pow_config(tmp_path, "rounds_per_connection = 2\n"))
    protocol, transport = harness.connect()
    for round_number in (1, 2):
        payload = challenge_of(harness, protocol, transport)
        protocol.dataReceived(encode(MessageType.SOLUTION, solution_for(payload)))
        assert frames_of(transport)[-1].type == MessageType.QUOTE
        assert transport.disconnecting == (round_number == 2)
        transport.clear()


@pytest.mark.parametrize("phase,timeout", [("first_byte", 5.0), ("frame", 5.0),
                                           ("solution", 60.0)])
def test_each_phase_has_a_deadline(harness: Harness, phase: str, timeout: float) -> None:
    """Silence before the first byte, inside a frame, or while solving ends in a timeout."""
    protocol, transport = harness.connect()
    if phase == "frame":
        protocol.dataReceived(HEADER.pack(1, 1, 10) + b"{")
    elif phase == "solution":
        challenge_of(harness, protocol, transport)
    sweep = harness.factory.sweep_interval
    harness.clock.pump([sweep] * round((timeout - 0.01) // sweep))
    assert not transport.disconnecting
    harness.clock.pump([sweep] * 2)  # the deadline, then at most one sweep late
    [error] = frames_of(transport)
    assert error.payload["code"] == "timeout" and transport.disconnecting
    assert harness.rejected("timeout") == 1


def test_slow_drip_frame_is_cut_off(harness: Harness) -> None:
    """A frame dribbled a byte at a time does not reset the frame deadline."""
    protocol, transport = harness.connect()
    data = encode(MessageType.CHALLENGE_REQUEST, {"pad": "x" * 50})
    for byte in data[:-1]:
        protocol.dataReceived(bytes([byte]))
        harness.clock.advance(0.1)
    assert transport.disconnecting
    assert frames_of(transport)[0].payload["code"] == "timeout"


def test_bad_input_is_typed(harness: Harness) -> None:
    """Oversized, unknown type, bad JSON and server-only types give their error codes."""
    cases = [(HEADER.pack(1, 2, 10**6), "too_large"), (HEADER.pack(1, 77, 0), "unknown_type"),
             (HEADER.pack(1, 1, 3) + b"{{{", "bad_frame"),
             (encode(MessageType.QUOTE, {}), "bad_frame"),
             (encode(MessageType.SOLUTION, {"nonsense": 1}), "bad_frame")]
    for data, code in cases:
        protocol, transport = harness.connect()
        protocol.dataReceived(data)
        assert frames_of(transport)[0].payload["code"] == code
        assert transport.disconnecting
        protocol.connectionLost(None)
    assert harness.engine.connections == 0


def test_verification_failures(harness: Harness) -> None:
    """Tampered signature, another address, expiry, too little work, replay."""
    signer = ChallengeSigner({"k1": KEY.encode()}, "k1")
    now_ms = int(harness.clock.seconds() * 1000)

    def submit(payload: dict, host: str = "127.0.0.1") -> str:
        protocol, transport = harness.connect(host)
        protocol.dataReceived(encode(MessageType.SOLUTION, payload))
        frame = frames_of(transport)[0]
        protocol.connectionLost(None)
        return frame.payload.get("code", "quote")

    protocol, transport = harness.connect()
    good = solution_for(challenge_of(harness, protocol, transport))
    tampered = {**good, "challenge": {**good["challenge"], "difficulty": 1}}
    assert submit(tampered) == "bad_signature"
    assert submit(good, host="127.0.0.2") == "wrong_address"
    old, old_sig = signer.issue("127.0.0.1", 4, now_ms - 120_000, 60_000)
    assert submit({"challenge": old.to_json(), "signature": old_sig,
                   "nonces": solve(old)[0]}) == "expired"
    hard, hard_sig = signer.issue("127.0.0.1", 30, now_ms, 60_000)
    assert submit({"challenge": hard.to_json(), "signature": hard_sig,
                   "nonces": [0]}) == "insufficient_work"
    assert submit(good) == "quote"
    assert submit(good) == "replayed"


def test_simultaneous_submissions_serve_once(harness: Harness) -> None:
    """Two connections submitting one solution in the same tick: exactly one quote."""
    protocol, transport = harness.connect()
    good = solution_for(challenge_of(harness, protocol, transport))
    pairs = [harness.connect() for _ in range(2)]
    data = encode(MessageType.SOLUTION, good)
    for connection, _ in pairs:
        connection.dataReceived(data)
    kinds = sorted(frames_of(t)[0].type.name for _, t in pairs)
    assert kinds == ["ERROR", "QUOTE"]


def test_a_solution_resent_in_another_spelling_is_not_served_again(harness: Harness
                                                                     ) -> None:
    """
    The signature is also the replay key: a redeemed solution resent with
    its hex signature in upper case (it used to pass the check, which
    lower-cased it) is refused, as is a non-ASCII one (it used to raise).
    """
    protocol, transport = harness.connect()
    good = solution_for(challenge_of(harness, protocol, transport))
    protocol.dataReceived(encode(MessageType.SOLUTION, good))
    assert frames_of(transport)[0].type == MessageType.QUOTE
    for signature in (good["signature"].upper(), good["signature"].title(), "é" * 64):
        again, again_transport = harness.connect()
        again.dataReceived(encode(MessageType.SOLUTION, dict(good, signature=signature)))
        [error] = frames_of(again_transport)
        assert error.type == MessageType.ERROR and error.payload["code"] == "bad_signature"
    assert harness.rejected("bad_signature") == 3 and harness.rejected("busy") == 0


def test_connection_limits_per_client_group(tmp_path: Path) -> None:
    """Past max_connections_per_client the group gets busy; other clients still get in."""
    harness = Harness(pow_config(tmp_path, "max_connections_per_client = 2\n"
                                           "client_prefix_v4 = 24\n"))
    harness.connect("10.0.0.1")
    harness.connect("10.0.0.2")
    _, refused = harness.connect("10.0.0.3")  # same /24
    assert frames_of(refused)[0].payload["code"] == "busy" and refused.disconnecting
    _, other = harness.connect("10.0.1.1")
    assert other.value() == b"" and not other.disconnecting


def test_rate_limit_per_client(tmp_path: Path) -> None:
    """Challenges beyond the rate are refused with rate_limited."""
    harness = Harness(pow_config(tmp_path, "rate_limit = 2/s\nrounds_per_connection = 5\n"))
    protocol, transport = harness.connect()
    challenge_of(harness, protocol, transport)
    challenge_of(harness, protocol, transport)
    protocol.dataReceived(encode(MessageType.CHALLENGE_REQUEST, {}))
    assert frames_of(transport)[0].payload["code"] == "rate_limited"


def test_drain_lets_a_solving_client_finish(harness: Harness) -> None:
    """Draining closes idle connections at once; a client mid-solve may still submit."""
    idle, idle_transport = harness.connect()
    protocol, transport = harness.connect()
    payload = challenge_of(harness, protocol, transport)
    harness.tracker.drain(30.0)
    assert idle_transport.disconnecting and not transport.disconnecting
    protocol.dataReceived(encode(MessageType.SOLUTION, solution_for(payload)))
    assert frames_of(transport)[0].type == MessageType.QUOTE and transport.disconnecting


def test_difficulty_adapts_and_is_bounded() -> None:
    """A flooding client pays more; everyone else rises by a bounded amount; it falls back."""
    clock = Clock()
    policy = DifficultyPolicy(base=10, minimum=8, maximum=26, window=10.0, target_rate=10,
                              max_connections=1000, client_threshold=5, client_extra_max=8,
                              per_client_cap=5)
    controller = DifficultyController(policy, clock)
    assert controller.difficulty_for("10.0.0.1") == 10
    for _ in range(200):
        controller.record("10.0.0.1")
    assert controller.difficulty_for("10.0.0.1") == 10 + 0 + 6  # 200/5 = 40x -> 6 bits
    assert controller.difficulty_for("10.0.0.99") == 10  # capped share: 5 of 100/window
    for index in range(100):  # many distinct clients (real load)
        controller.record(f"10.1.{index}.1")
    assert controller.global_difficulty() > 10
    assert controller.difficulty_for("10.0.0.1") <= policy.maximum
    clock.advance(11)
    assert controller.difficulty_for("10.0.0.1") == 10 and controller.global_difficulty() == 10


def test_difficulty_memory_is_bounded_per_client() -> None:
    """A client at any rate costs the controller a bounded number of slices;
    its count covers the last window only."""
    clock = Clock()
    policy = DifficultyPolicy(base=10, minimum=8, maximum=26, window=10.0, target_rate=10,
                              max_connections=1000, client_threshold=5, client_extra_max=8,
                              per_client_cap=5)
    controller = DifficultyController(policy, clock)
    for _ in range(3000):  # 100 per second for 30 seconds
        controller.issue("10.0.0.1")
        clock.advance(0.01)
    client = controller._clients["10.0.0.1/32"]
    assert len(client.slices) <= BUCKETS
    assert 900 <= client.total <= 1000  # the window's 90-100%
    assert controller.load() == pytest.approx(5 / 10.0 / 10)  # one client counts for its cap


def test_client_groups() -> None:
    """IPv4 groups by /32 or /24, IPv6 by /64 or /48; v4-mapped v6 is v4."""
    assert client_group("10.1.2.3", 24) == "10.1.2.0/24"
    assert client_group("10.1.2.3") == "10.1.2.3/32"
    assert client_group("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:2:3::4", prefix_v6=48) == "2001:db8:1::/48"
    assert client_group("::ffff:10.1.2.3") == "10.1.2.3/32"


def test_memory_replay_set_never_forgets_live_entries() -> None:
    """A full set refuses new claims instead of evicting live ones; expiry frees room."""
    clock = Clock()
    spent = MemoryReplaySet(2, clock)
    assert spent.claim("a", 10) and spent.claim("b", 10)
    assert not spent.claim("a", 10)
    with pytest.raises(ReplaySetFull):
        spent.claim("c", 10)
    clock.advance(10)
    assert spent.claim("c", 20) and len(spent) == 1


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_random_input_never_breaks_the_protocol(harness: Harness, chunks: list[bytes]) -> None:
    """Random bytes yield only typed ERROR frames (or nothing yet), never an exception."""
    protocol, transport = harness.connect()
    for chunk in chunks:
        protocol.dataReceived(chunk)
    for frame in frames_of(transport):
        assert frame.type in (MessageType.ERROR, MessageType.CHALLENGE)
    protocol.connectionLost(None)
    assert harness.engine.connections == 0


def test_rate_object() -> None:
    """The default rate limit is 20 challenges per second per client."""
    assert Rate(20, 1.0).per_second == 20


def test_deadline_sweep_stops_after_the_last_connection(harness: Harness) -> None:
    """Once the listener stopped and the last connection is gone, no sweep is left running."""
    protocol, transport = harness.connect()
    harness.factory.doStop()
    harness.clock.advance(harness.factory.sweep_interval)
    assert harness.clock.getDelayedCalls()  # a connection remains: still sweeping
    protocol.connectionLost(None)
    harness.clock.advance(harness.factory.sweep_interval)
    assert not harness.clock.getDelayedCalls()


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=70),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["challenge", "signature", "nonces", "extra"]),
       inner=st.none() | st.sampled_from(["v", "alg", "difficulty", "issued_at", "expires_at",
                                          "salt", "address", "kid", "puzzles"]),
       value=_JSON)
def test_any_malformed_solution_gets_a_typed_error(harness: Harness, field: str,
                                                   inner: str | None, value: Any) -> None:
    """
    A SOLUTION with one part replaced by any JSON value (the challenge, one of
    its fields, the signature, the nonces, or an extra key) is answered with a
    typed error, never an internal one, and never a quote.
    """
    harness.clock.advance(1)  # the same harness serves every example: let the limiter refill
    protocol, transport = harness.connect()
    good = solution_for(challenge_of(harness, protocol, transport))
    protocol.connectionLost(None)  # the solution comes on a connection of its own
    protocol, transport = harness.connect()
    if field == "challenge" and inner is not None:
        bad = dict(good, challenge=dict(good["challenge"], **{inner: value}))
    else:
        bad = dict(good, **{field: value})
    if bad == good:
        protocol.connectionLost(None)
        return
    protocol.dataReceived(encode(MessageType.SOLUTION, bad))
    protocol.connectionLost(None)
    [answer] = frames_of(transport)
    assert answer.type == MessageType.ERROR
    assert answer.payload["code"] in ("bad_frame", "bad_signature", "wrong_address", "expired",
                                      "insufficient_work")
    assert harness.rejected("busy") == 0
