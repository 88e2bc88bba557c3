"""Prompt prefixes as the front sees them, and which workers hold them.

The front does not tokenize, so it fingerprints characters: fingerprint k stands for the whole
prompt up to the end of block k, as vLLM's block hashes do for tokens. Two requests that share a
system prompt or a conversation share their leading fingerprints.

Which worker holds a prefix comes from two sources. A worker whose engine reports its cache
(`Hello.reports_prefixes`: vLLM's KV events, the mock's own cache; see worker.residency) says
which fingerprints it holds and which it dropped, so several workers may hold one prefix and an
eviction is known. Between a send and that report (one prefill) the front counts the prefix as
held where it sent it. A worker that reports nothing (the http engine) is estimated: the worker
last sent a prefix holds it, and no other estimated worker does, since the front never learns of
its evictions and would otherwise end up counting every worker as holding everything.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable, Set

from common.prefix import BLOCK_CHARS, text_fingerprints

__all__ = ["BLOCK_CHARS", "MAX_BLOCKS", "PrefixHolders", "prefix_blocks"]

MAX_BLOCKS = 512  # 128k characters: enough to tell prompts apart, bounded cost per request
MEMORY_BLOCKS = 262_144  # fingerprints remembered, over all workers: about 64M characters


def prefix_blocks(text: str) -> tuple[int, ...]:
    """Fingerprints of the text's full blocks (none for a text shorter than one block)."""
    return text_fingerprints(text[:BLOCK_CHARS * MAX_BLOCKS], BLOCK_CHARS)


class PrefixHolders:
    """Fingerprint -> the workers holding it, least recently used forgotten first, bounded."""

    def __init__(self, max_blocks: int = MEMORY_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._holders: collections.OrderedDict[int, set[Hashable]] = collections.OrderedDict()
        self.counts: collections.Counter[Hashable] = collections.Counter()  # per worker (/health)

    def longest(self, blocks: tuple[int, ...], worker: Hashable) -> int:
        """How many leading blocks of a prompt `worker` holds: the last fingerprint it holds
        covers everything before it (fingerprints are chained)."""
        for count in range(len(blocks), 0, -1):
            holders = self._holders.get(blocks[count - 1])
            if holders is not None and worker in holders:
                return count
        return 0

    def sent(self, blocks: Iterable[int], worker: Hashable, estimated: Set[Hashable]) -> None:
        """A prompt went to `worker`: it will hold it. `estimated` are the workers that report
        nothing; a prefix sent to one of them leaves the others."""
        for block in blocks:
            holders = self._holders.get(block)
            if holders is None:
                holders = self._holders[block] = set()
            else:
                self._holders.move_to_end(block)
                if worker in estimated:
                    for moved in holders & estimated - {worker}:
                        holders.discard(moved)
                        self.counts[moved] -= 1
            self._add(holders, worker)
        self._bound()

    def held(self, worker: Hashable, blocks: Iterable[int]) -> None:
        """The worker's engine says it holds these."""
        for block in blocks:
            holders = self._holders.get(block)
            if holders is None:
                holders = self._holders[block] = set()
            self._add(holders, worker)
        self._bound()

    def dropped(self, worker: Hashable, blocks: Iterable[int]) -> None:
        """The worker's engine says it no longer holds these (or never took them in)."""
        for block in blocks:
            holders = self._holders.get(block)
            if holders is not None and worker in holders:
                holders.discard(worker)
                self.counts[worker] -= 1
                if not holders:
                    del self._holders[block]

    def forget(self, worker: Hashable) -> None:
        """A worker died or restarted: its engine's cache is gone with it."""
        self.dropped(worker, [b for b, holders in self._holders.items() if worker in holders])
        del self.counts[worker]

    def _add(self, holders: set[Hashable], worker: Hashable) -> None:
        if worker not in holders:
            holders.add(worker)
            self.counts[worker] += 1

    def _bound(self) -> None:
        while len(self._holders) > self.max_blocks:
            self.counts.subtract(self._holders.popitem(last=False)[1])
