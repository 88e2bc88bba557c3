"""Chained block hashes: block k's hash stands for everything up to the end of block k.

vLLM keys its prefix cache this way (per block of tokens); the mock engine does the same with its
word tokens, and the front with blocks of characters to tell which worker holds a prompt's prefix.
"""

from __future__ import annotations

from collections.abc import Sequence


def chained_hashes(items: Sequence, size: int) -> tuple[int, ...]:
    """Hashes of `items`' full blocks of `size`, each chained to the one before it."""
    hashes, running = [], 0
    for start in range(0, len(items) - size + 1, size):
        block = items[start:start + size]
        running = hash((running, block if isinstance(block, str) else tuple(block)))
        hashes.append(running)
    return tuple(hashes)
