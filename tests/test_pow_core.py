"""Tests for the pow wire format, challenges and solver, with bytes only."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.pow.challenge import (
    Challenge,
    ChallengeSigner,
    leading_zero_bits,
    offer_json,
    puzzle_prefix,
    target,
    work_is_done,
)
from appliance.pow.frames import (
    HEADER,
    ErrorCode,
    FrameDecoder,
    MessageType,
    ProtocolError,
    _to_json,
    encode,
)
from appliance.pow.solver import solve

SIGNER = ChallengeSigner({"k1": b"a" * 32, "k0": b"b" * 32}, current="k1")


def test_frames_round_trip_split_anywhere() -> None:
    """Frames decode the same whatever the read boundaries."""
    data = encode(MessageType.CHALLENGE_REQUEST, {}) + encode(MessageType.QUOTE, {"quote": "q"})
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert [f.type for f in frames] == [MessageType.CHALLENGE_REQUEST, MessageType.QUOTE]
        assert frames[1].payload == {"quote": "q"}
        assert not decoder.partial


@pytest.mark.parametrize("data,code", [
    (HEADER.pack(1, 1, 10**9), ErrorCode.TOO_LARGE),
    (HEADER.pack(2, 1, 0), ErrorCode.BAD_FRAME),
    (HEADER.pack(1, 99, 0), ErrorCode.UNKNOWN_TYPE),
    (HEADER.pack(1, 1, 3) + b"{x}", ErrorCode.BAD_FRAME),
    (HEADER.pack(1, 1, 2) + b"[]", ErrorCode.BAD_FRAME),
    (HEADER.pack(1, 1, 2) + b"\xff\xfe", ErrorCode.BAD_FRAME),
])
def test_bad_frames_are_typed(data: bytes, code: str) -> None:
    """Each kind of bad frame raises a ProtocolError with its code."""
    with pytest.raises(ProtocolError) as caught:
        FrameDecoder(max_frame=1024).feed(data)
    assert caught.value.code == code


def test_oversized_length_is_refused_before_the_body() -> None:
    """A huge length field is refused from the header alone (nothing is buffered for it)."""
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError, match="exceeds 100"):
        decoder.feed(HEADER.pack(1, 3, 101))


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_give_frames_or_typed_errors(data: bytes) -> None:
    """Any bytes decode to frames, wait for more, or raise a typed ProtocolError."""
    decoder = FrameDecoder(max_frame=256)
    try:
        for frame in decoder.feed(data):
            assert isinstance(frame.payload, dict)
    except ProtocolError as error:
        assert error.code in ErrorCode.ALL


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "alg", "difficulty", "issued_at", "expires_at",
                                        "salt", "address", "kid", "puzzles", "x"]),
                       st.one_of(st.integers(), st.text(max_size=70), st.none(),
                                 st.booleans())))
def test_random_challenges_parse_or_raise_bad_frame(data: dict) -> None:
    """Random challenge objects are accepted only when well formed."""
    try:
        Challenge.from_json(data)
    except ProtocolError as error:
        assert error.code == ErrorCode.BAD_FRAME


def test_signature_covers_every_field() -> None:
    """Changing any field (difficulty, expiry, address, key id...) breaks the signature."""
    challenge, signature = SIGNER.issue("10.0.0.1", 12, now_ms=1_000, lifetime_ms=60_000)
    assert SIGNER.authentic(challenge, signature)
    data = challenge.to_json()
    for field, value in (("difficulty", 1), ("expires_at", 10**13), ("address", "10.0.0.2"),
                         ("salt", "00" * 16), ("issued_at", 2), ("puzzles", 2), ("kid", "k0")):
        tampered = Challenge.from_json({**data, field: value})
        assert not SIGNER.authentic(tampered, signature), field
    assert not SIGNER.authentic(challenge, signature[:-1] + "0" if signature[-1] != "0"
                                else signature[:-1] + "1")
    assert not SIGNER.authentic(challenge, 12345)
    unknown = Challenge.from_json({**data, "kid": "nope"})
    assert not SIGNER.authentic(unknown, signature)


def test_rotated_key_still_verifies() -> None:
    """A challenge signed with an older key verifies while that key is configured."""
    old = ChallengeSigner({"k0": b"b" * 32}, current="k0")
    challenge, signature = old.issue("::1", 8, 0, 1000)
    assert SIGNER.authentic(challenge, signature)
    assert not ChallengeSigner({"k1": b"a" * 32}, "k1").authentic(challenge, signature)


@pytest.mark.parametrize("puzzles", [1, 3])
def test_solver_finds_valid_nonces(puzzles: int) -> None:
    """The solver's nonces pass verification; wrong ones do not."""
    challenge, _ = SIGNER.issue("127.0.0.1", 12, 0, 1000, puzzles=puzzles)
    nonces, hashes = solve(challenge)
    assert nonces is not None and hashes > 0
    assert work_is_done(challenge, nonces)
    for index, nonce in enumerate(nonces):
        digest = hashlib.sha256(puzzle_prefix(challenge, index) + nonce.to_bytes(8, "big"))
        assert leading_zero_bits(digest.digest()) >= 12
    assert not work_is_done(challenge, [n + 1 for n in nonces]) or puzzles == 0
    assert not work_is_done(challenge, nonces[:-1] if puzzles > 1 else [])
    assert not work_is_done(challenge, ["1"] * puzzles)
    assert not work_is_done(challenge, [-1] * puzzles)


def test_strided_solvers_split_the_space() -> None:
    """Two workers with stride 2 scan disjoint blocks; one of them finds a solution."""
    challenge, _ = SIGNER.issue("127.0.0.1", 10, 0, 1000)
    results = [solve(challenge, start_block=k, stride=2)[0] for k in (0, 1)]
    assert all(r is not None and work_is_done(challenge, r) for r in results)
    assert (results[0][0] // 65536) % 2 == 0 and (results[1][0] // 65536) % 2 == 1


def test_target_boundaries() -> None:
    """Difficulty 0 accepts anything; 256-bit comparisons are exact."""
    assert target(8) == b"\x01" + b"\x00" * 31
    assert b"\xff" * 32 < target(0)
    assert b"\x00\xff" + b"\xff" * 30 < target(8)
    assert not b"\x01" + b"\x00" * 31 < target(8)


@settings(max_examples=300)
@given(difficulty=st.integers(0, 64), issued=st.integers(0, 2**63), lifetime=st.integers(0, 2**40),
       salt=st.text(min_size=1, max_size=64), address=st.text(min_size=1, max_size=64),
       kid=st.text(min_size=1, max_size=64), puzzles=st.integers(1, 64),
       signature=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
def test_offer_json_is_the_generic_encoding(difficulty: int, issued: int, lifetime: int,
                                            salt: str, address: str, kid: str, puzzles: int,
                                            signature: str) -> None:
    """The directly formatted CHALLENGE payload is byte for byte what the JSON encoder
    makes of it, whatever the strings hold (quotes, backslashes, controls, non-ASCII)."""
    challenge = Challenge(difficulty, issued, issued + lifetime, salt, address, kid, puzzles)
    text = offer_json(challenge, signature)
    assert text == _to_json({"challenge": challenge.to_json(), "signature": signature})
    assert json.loads(text) == {"challenge": challenge.to_json(), "signature": signature}


def _field_is_valid(name: str, value: object) -> bool:
    """What docs/pow.md says each challenge field may hold."""
    if name in ("v", "difficulty", "issued_at", "expires_at", "puzzles"):
        if type(value) is not int:
            return False
        return {"v": value == 1, "difficulty": 0 <= value <= 64,
                "puzzles": 1 <= value <= 64}.get(name, True)
    if type(value) is not str or not 0 < len(value) <= 64 or not value.isascii() \
            or "|" in value:
        return False
    return name != "alg" or value == "sha256"


@settings(max_examples=500)
@given(st.sampled_from(["v", "alg", "difficulty", "issued_at", "expires_at", "salt",
                        "address", "kid", "puzzles"]),
       st.one_of(st.integers(-5, 70), st.integers(), st.booleans(), st.none(),
                 st.floats(allow_nan=False), st.text(max_size=70), st.just("sha256"),
                 st.lists(st.integers(), max_size=2)))
def test_one_changed_field_is_accepted_exactly_when_valid(name: str, value: object) -> None:
    """A valid challenge with one field replaced parses, field for field, exactly when
    the new value is valid; otherwise it is a bad_frame."""
    challenge, _ = SIGNER.issue("10.0.0.1", 12, now_ms=1_000, lifetime_ms=60_000)
    data = {**challenge.to_json(), name: value}
    if _field_is_valid(name, value):
        parsed = Challenge.from_json(data)
        assert parsed.to_json() == data
        assert all(type(parsed.to_json()[key]) is type(data[key]) for key in data)
    else:
        with pytest.raises(ProtocolError) as raised:
            Challenge.from_json(data)
        assert raised.value.code == ErrorCode.BAD_FRAME
