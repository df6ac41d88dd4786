"""
Stateless, HMAC-signed proof-of-work challenges, sans-IO.

The signature covers every field the server relies on, so a client can
neither lower the difficulty, nor extend the expiry, nor move a challenge to
another address. The work: for each sub-puzzle C{i}, find a 64-bit nonce
such that SHA-256(canonical || u8(i) || u64be(nonce)) has at least
C{difficulty} leading zero bits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen

from appliance.pow.frames import ErrorCode, ProtocolError

PROTOCOL = "pow1"
ALGORITHM = "sha256"
MAX_DIFFICULTY = 64
MAX_PUZZLES = 64
NONCE_LIMIT = 1 << 64
_FIELDS = ("v", "alg", "difficulty", "issued_at", "expires_at", "salt", "address",
           "kid", "puzzles")


@frozen
class Challenge:
    """
    One challenge. Times are integers in milliseconds since the epoch.
    """

    difficulty: int
    issued_at: int
    expires_at: int
    salt: str
    address: str
    kid: str
    puzzles: int = 1
    alg: str = ALGORITHM
    v: int = 1

    def canonical(self) -> bytes:
        """The bytes the signature and the work are computed over."""
        return "|".join((PROTOCOL, self.alg, str(self.difficulty), str(self.issued_at),
                         str(self.expires_at), self.salt, self.address, self.kid,
                         str(self.puzzles))).encode("ascii")

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_json(cls, data: Any) -> Challenge:
        """Parse a challenge object; raise L{ProtocolError} (bad_frame) if malformed."""
        if not isinstance(data, Mapping) or set(data) != set(_FIELDS):
            raise ProtocolError(ErrorCode.BAD_FRAME, "challenge must have exactly the fields "
                                + ", ".join(_FIELDS))
        ints = ("v", "difficulty", "issued_at", "expires_at", "puzzles")
        for name in ints:
            if type(data[name]) is not int:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"challenge {name} must be an integer")
        for name in ("alg", "salt", "address", "kid"):
            value = data[name]
            if not isinstance(value, str) or not value.isascii() or "|" in value or \
                    not 0 < len(value) <= 64:
                raise ProtocolError(ErrorCode.BAD_FRAME,
                                    f"challenge {name} must be a short ASCII string")
        if data["v"] != 1 or data["alg"] != ALGORITHM:
            raise ProtocolError(ErrorCode.BAD_FRAME, "unsupported challenge version or algorithm")
        if not (0 <= data["difficulty"] <= MAX_DIFFICULTY and 1 <= data["puzzles"] <= MAX_PUZZLES):
            raise ProtocolError(ErrorCode.BAD_FRAME, "challenge difficulty or puzzles out of range")
        return cls(**{name: data[name] for name in _FIELDS})


class ChallengeSigner:
    """
    Issues and authenticates challenges with HMAC-SHA-256 keys by id.

    New challenges use C{current}; every key in C{keys} still verifies, so a
    key can be rotated without failing challenges issued under the old one.
    """

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ValueError(f"current key {current!r} is not among the keys")
        # A keyed HMAC state per key, copied per use (cheaper than re-keying).
        self._keys = {kid: hmac.new(key, digestmod=hashlib.sha256) for kid, key in keys.items()}
        self.current = current

    def issue(self, address: str, difficulty: int, now_ms: int, lifetime_ms: int,
              puzzles: int = 1) -> tuple[Challenge, str]:
        """A new challenge bound to C{address} and its hex signature."""
        challenge = Challenge(
            difficulty=difficulty, issued_at=now_ms, expires_at=now_ms + lifetime_ms,
            salt=secrets.token_hex(16), address=address, kid=self.current, puzzles=puzzles)
        return challenge, self.sign(challenge)

    def sign(self, challenge: Challenge) -> str:
        """The hex HMAC of a challenge under its key id."""
        mac = self._keys[challenge.kid].copy()
        mac.update(challenge.canonical())
        return mac.hexdigest()

    def authentic(self, challenge: Challenge, signature: Any) -> bool:
        """Whether C{signature} is this server's, compared in constant time."""
        keyed = self._keys.get(challenge.kid)
        if keyed is None or not isinstance(signature, str) or len(signature) != 64:
            return False
        mac = keyed.copy()
        mac.update(challenge.canonical())
        return hmac.compare_digest(mac.hexdigest(), signature.lower())


def target(difficulty: int) -> bytes:
    """A digest is good when it is lexicographically below this value."""
    if difficulty <= 0:
        return b"\xff" * 32 + b"\x00"  # anything passes
    return (1 << (256 - difficulty)).to_bytes(33, "big")[1:]


def puzzle_prefix(challenge: Challenge, index: int) -> bytes:
    """What sub-puzzle C{index} hashes before its nonce."""
    return challenge.canonical() + bytes((index,))


def work_is_done(challenge: Challenge, nonces: Sequence[Any]) -> bool:
    """Whether every sub-puzzle's nonce gives enough leading zero bits."""
    if not isinstance(nonces, Sequence) or len(nonces) != challenge.puzzles:
        return False
    goal = target(challenge.difficulty)
    for index, nonce in enumerate(nonces):
        if type(nonce) is not int or not 0 <= nonce < NONCE_LIMIT:
            return False
        digest = hashlib.sha256(puzzle_prefix(challenge, index)
                                + nonce.to_bytes(8, "big")).digest()
        if digest >= goal:
            return False
    return True


def leading_zero_bits(digest: bytes) -> int:
    """How many leading zero bits a digest has (for reporting)."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()
