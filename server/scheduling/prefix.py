"""Prompt prefixes as the front sees them: chained hashes of fixed-size blocks of text.

The front does not tokenize, so it fingerprints characters: block k's hash stands for the whole
prompt up to the end of block k, as vLLM's block hashes do for tokens. Two requests that share a
system prompt or a conversation share their leading hashes; a worker that was sent those blocks
probably still holds them in its engine's prefix cache.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable


from common.prefix import chained_hashes

BLOCK_CHARS = 256  # below this a shared prefix saves too little prefill to steer by
MAX_BLOCKS = 512  # 128k characters: enough to tell prompts apart, bounded cost per request
MEMORY_BLOCKS = 262_144  # about 64M characters of recent prefixes, over all workers


def prefix_blocks(text: str) -> tuple[int, ...]:
    """Chained hashes of the text's full blocks (none for a text shorter than one block)."""
    return chained_hashes(text[:BLOCK_CHARS * MAX_BLOCKS], BLOCK_CHARS)


class PrefixOwners:
    """Which worker was last sent each prefix block, most recent last, bounded.

    One owner per block: a prefix sent to another worker moves there, so the front's picture
    follows where the prompt was computed last (the worker most likely to still cache it) instead of
    claiming every worker that ever saw it.
    """

    def __init__(self, max_blocks: int = MEMORY_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._owners: collections.OrderedDict[int, Hashable] = collections.OrderedDict()

    def match(self, blocks: tuple[int, ...], worker: Hashable) -> int:
        """How many leading blocks of a prompt were last sent to `worker`."""
        found = 0
        for block in blocks:
            if self._owners.get(block) != worker:
                break
            found += 1
        return found

    def remember(self, blocks: tuple[int, ...], worker: Hashable) -> None:
        for block in blocks:
            self._owners[block] = worker
            self._owners.move_to_end(block)
        while len(self._owners) > self.max_blocks:
            self._owners.popitem(last=False)

    def forget(self, worker: Hashable) -> None:
        """A worker died: its engine's cache is gone with it."""
        for block in [b for b, owner in self._owners.items() if owner == worker]:
            del self._owners[block]
