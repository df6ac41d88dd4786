"""
The fast solver: hash the challenge prefix once, then for each nonce copy
that hash state and add only the nonce's 8 bytes.

The nonce space is cut into blocks of 65,536: the high 6 bytes are added to
a copy once per block, the low 2 bytes come from a precomputed table, so the
inner loop is copy + update + digest + compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from appliance.pow.challenge import Challenge, puzzle_prefix, target

BLOCK = 1 << 16
_LOW = tuple(i.to_bytes(2, "big") for i in range(BLOCK))


def search(prefix: bytes, difficulty: int, blocks: Iterable[int],
           should_stop: Callable[[], bool] | None = None) -> tuple[int | None, int]:
    """
    Try every nonce in the given blocks (block C{b} covers
    C{b*65536 .. b*65536+65535}). Return (nonce or None, hashes tried).
    """
    goal = target(difficulty)
    base = hashlib.sha256(prefix)
    tried = 0
    for block in blocks:
        state = base.copy()
        state.update((block).to_bytes(6, "big"))
        copy = state.copy
        for low_index, low in enumerate(_LOW):
            attempt = copy()
            attempt.update(low)
            if attempt.digest() < goal:
                return block * BLOCK + low_index, tried + low_index + 1
        tried += BLOCK
        if should_stop is not None and should_stop():
            break
    return None, tried


def solve(challenge: Challenge, start_block: int = 0, stride: int = 1,
          should_stop: Callable[[], bool] | None = None) -> tuple[list[int] | None, int]:
    """
    Solve every sub-puzzle in one process, scanning blocks
    C{start_block, start_block+stride, ...}. Returns (nonces or None, hashes).
    """
    nonces: list[int] = []
    total = 0
    for index in range(challenge.puzzles):
        blocks = range(start_block, 1 << 48, stride)
        nonce, tried = search(puzzle_prefix(challenge, index), challenge.difficulty, blocks,
                              should_stop)
        total += tried
        if nonce is None:
            return None, total
        nonces.append(nonce)
    return nonces, total
