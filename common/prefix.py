"""Chained block hashes: block k's hash stands for everything up to the end of block k.

vLLM keys its prefix cache this way (per block of tokens); the mock engine does the same with its
word tokens, and the front with blocks of characters to tell which worker holds a prompt's prefix.
The front's fingerprints travel to the workers, which report back which of them their engine
holds, so they are keyed hashes every process computes alike (Python's `hash` of a string is
salted per process: two fronts, or a front and a worker, would not agree).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

BLOCK_CHARS = 256  # the front's unit: below it a shared prefix saves too little prefill to steer by


def chained_hashes(items: Sequence, size: int) -> tuple[int, ...]:
    """Hashes of `items`' full blocks of `size`, each chained to the one before it (this
    process's own hash: for keys that never leave it, like the mock engine's cache)."""
    hashes, running = [], 0
    for start in range(0, len(items) - size + 1, size):
        block = items[start:start + size]
        running = hash((running, block if isinstance(block, str) else tuple(block)))
        hashes.append(running)
    return tuple(hashes)


def text_fingerprints(text: str, size: int) -> tuple[int, ...]:
    """Fingerprints of `text`'s full blocks of `size` characters, each chained to the one before
    it: 8 bytes of BLAKE2b, a signed 64-bit integer as msgpack carries it, the same in every
    process."""
    fingerprints, running = [], b""
    for start in range(0, len(text) - size + 1, size):
        running = hashlib.blake2b(text[start:start + size].encode("utf-8", "surrogatepass"),
                                  digest_size=8, key=running).digest()
        fingerprints.append(int.from_bytes(running, "big", signed=True))
    return tuple(fingerprints)
