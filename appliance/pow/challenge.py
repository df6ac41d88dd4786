"""
Stateless, HMAC-signed proof-of-work challenges, sans-IO.

The signature covers every field the server relies on, so a client can
neither lower the difficulty, nor extend the expiry, nor move a challenge to
another address. The work: for each sub-puzzle C{i}, find a 64-bit nonce
such that SHA-256(canonical || u8(i) || u64be(nonce)) has at least
C{difficulty} leading zero bits.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any, NamedTuple

from appliance.pow.frames import ErrorCode, ProtocolError

PROTOCOL = "pow1"
ALGORITHM = "sha256"
MAX_DIFFICULTY = 64
MAX_PUZZLES = 64
NONCE_LIMIT = 1 << 64
_FIELDS = ("v", "alg", "difficulty", "issued_at", "expires_at", "salt", "address",
           "kid", "puzzles")
_FIELD_SET = frozenset(_FIELDS)
_INTS = ("v", "difficulty", "issued_at", "expires_at", "puzzles")
_TEXTS = ("alg", "salt", "address", "kid")
SALT_BYTES = 16


class Challenge(NamedTuple):
    """
    One challenge. Times are integers in milliseconds since the epoch. A
    tuple: two are built per session, and a tuple is the cheapest immutable
    record to build.
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
        return (f"{PROTOCOL}|{self.alg}|{self.difficulty}|{self.issued_at}|"
                f"{self.expires_at}|{self.salt}|{self.address}|{self.kid}|"
                f"{self.puzzles}").encode("ascii")

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object."""
        return {"v": self.v, "alg": self.alg, "difficulty": self.difficulty,
                "issued_at": self.issued_at, "expires_at": self.expires_at,
                "salt": self.salt, "address": self.address, "kid": self.kid,
                "puzzles": self.puzzles}

    @classmethod
    def from_json(cls, data: Any) -> Challenge:
        """Parse a challenge object; raise L{ProtocolError} (bad_frame) if malformed."""
        if (type(data) is not dict and not isinstance(data, Mapping)) \
                or data.keys() != _FIELD_SET:
            raise ProtocolError(ErrorCode.BAD_FRAME, "challenge must have exactly the fields "
                                + ", ".join(_FIELDS))
        difficulty, puzzles = data["difficulty"], data["puzzles"]
        issued_at, expires_at = data["issued_at"], data["expires_at"]
        salt, address, kid = data["salt"], data["address"], data["kid"]
        # Every check in one expression (one per solution, on the hot path);
        # what it refuses, _malformed() names.
        if (data["v"] == 1 and type(data["v"]) is int and data["alg"] == ALGORITHM
                and type(difficulty) is int and 0 <= difficulty <= MAX_DIFFICULTY
                and type(puzzles) is int and 1 <= puzzles <= MAX_PUZZLES
                and type(issued_at) is int and type(expires_at) is int
                and type(salt) is str and 0 < len(salt) <= 64 and salt.isascii()
                and "|" not in salt
                and type(address) is str and 0 < len(address) <= 64 and address.isascii()
                and "|" not in address
                and type(kid) is str and 0 < len(kid) <= 64 and kid.isascii()
                and "|" not in kid):
            return cls(difficulty, issued_at, expires_at, salt, address, kid, puzzles)
        raise _malformed(data)


def _malformed(data: Mapping[str, Any]) -> ProtocolError:
    """The error naming what is wrong with a challenge object that has every field."""
    for name in _INTS:
        if type(data[name]) is not int:
            return ProtocolError(ErrorCode.BAD_FRAME, f"challenge {name} must be an integer")
    for name in _TEXTS:
        value = data[name]
        if type(value) is not str or not 0 < len(value) <= 64 or not value.isascii() \
                or "|" in value:
            return ProtocolError(ErrorCode.BAD_FRAME,
                                 f"challenge {name} must be a short ASCII string")
    if data["v"] != 1 or data["alg"] != ALGORITHM:
        return ProtocolError(ErrorCode.BAD_FRAME, "unsupported challenge version or algorithm")
    return ProtocolError(ErrorCode.BAD_FRAME, "challenge difficulty or puzzles out of range")


def offer_json(challenge: Challenge, signature: str) -> str:
    """
    The CHALLENGE payload, C{{"challenge": {...}, "signature": "..."}}, as
    compact JSON: the same text the generic encoder makes of
    C{{"challenge": challenge.to_json(), "signature": signature}}, formatted
    directly (the generic encoder cost about as much as issuing and signing
    the challenge). The integers are ints by construction; the strings are
    JSON-quoted by the C{json} module's own quoting.
    """
    quote = encode_basestring
    return (f'{{"challenge":{{"v":{challenge.v},"alg":{quote(challenge.alg)},'
            f'"difficulty":{challenge.difficulty},"issued_at":{challenge.issued_at},'
            f'"expires_at":{challenge.expires_at},"salt":{quote(challenge.salt)},'
            f'"address":{quote(challenge.address)},"kid":{quote(challenge.kid)},'
            f'"puzzles":{challenge.puzzles}}},"signature":{quote(signature)}}}')


class SaltPool:
    """
    Random salts cut from one larger C{os.urandom} read: a system call per
    challenge was a measurable share of issuing one, and the bytes are the
    same kernel CSPRNG output either way.
    """

    def __init__(self, salts_per_read: int = 256) -> None:
        self._size = SALT_BYTES * salts_per_read
        self._bytes = b""
        self._offset = 0

    def next_hex(self) -> str:
        """A fresh random salt, hex encoded."""
        if self._offset >= len(self._bytes):
            self._bytes, self._offset = os.urandom(self._size), 0
        start = self._offset
        self._offset = start + SALT_BYTES
        return self._bytes[start:start + SALT_BYTES].hex()


class ChallengeSigner:
    """
    Issues and authenticates challenges with HMAC-SHA-256 keys by id.

    New challenges use C{current}; every key in C{keys} still verifies, so a
    key can be rotated without failing challenges issued under the old one.
    """

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ValueError(f"current key {current!r} is not among the keys")
        # A keyed HMAC state per key, copied per use: cheaper than keying
        # anew, and cheaper than the one-shot hmac.digest (measured).
        self._keys = {kid: hmac.new(key, digestmod=hashlib.sha256) for kid, key in keys.items()}
        self.current = current
        self._salts = SaltPool()

    def issue(self, address: str, difficulty: int, now_ms: int, lifetime_ms: int,
              puzzles: int = 1) -> tuple[Challenge, str]:
        """A new challenge bound to C{address} and its hex signature."""
        challenge = Challenge(difficulty, now_ms, now_ms + lifetime_ms, self._salts.next_hex(),
                              address, self.current, puzzles)
        return challenge, self.sign(challenge)

    def sign(self, challenge: Challenge, canonical: bytes | None = None) -> str:
        """The hex HMAC of a challenge under its key id."""
        mac = self._keys[challenge.kid].copy()
        mac.update(challenge.canonical() if canonical is None else canonical)
        return mac.hexdigest()

    def authentic(self, challenge: Challenge, signature: Any,
                  canonical: bytes | None = None) -> bool:
        """
        Whether C{signature} is this server's, exactly as issued (lower-case
        hex), compared in constant time. Only the issued spelling passes: the
        signature is also the replay key, and an upper-case copy of a
        redeemed one must not count as new.
        """
        if (challenge.kid not in self._keys or type(signature) is not str
                or len(signature) != 64 or not signature.isascii()):
            return False  # compare_digest refuses non-ASCII text with an exception
        return hmac.compare_digest(self.sign(challenge, canonical), signature)


@functools.cache
def target(difficulty: int) -> bytes:
    """A digest is good when it is lexicographically below this value."""
    if difficulty <= 0:
        return b"\xff" * 32 + b"\x00"  # anything passes
    return (1 << (256 - difficulty)).to_bytes(33, "big")[1:]


def puzzle_prefix(challenge: Challenge, index: int, canonical: bytes | None = None) -> bytes:
    """What sub-puzzle C{index} hashes before its nonce (C{canonical}: if known)."""
    return (challenge.canonical() if canonical is None else canonical) + bytes((index,))


def work_is_done(challenge: Challenge, nonces: Sequence[Any],
                 canonical: bytes | None = None) -> bool:
    """Whether every sub-puzzle's nonce gives enough leading zero bits."""
    if (type(nonces) is not list and not isinstance(nonces, Sequence)) \
            or len(nonces) != challenge.puzzles:
        return False
    goal = target(challenge.difficulty)
    if canonical is None:
        canonical = challenge.canonical()
    for index, nonce in enumerate(nonces):
        if type(nonce) is not int or not 0 <= nonce < NONCE_LIMIT:
            return False
        digest = hashlib.sha256(puzzle_prefix(challenge, index, canonical)
                                + nonce.to_bytes(8, "big")).digest()
        if digest >= goal:
            return False
    return True


def leading_zero_bits(digest: bytes) -> int:
    """How many leading zero bits a digest has (for reporting)."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()
