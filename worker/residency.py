"""Which of the fronts' prefix fingerprints this worker's engine holds, from the engine's own cache.

The front fingerprints prompts by blocks of characters (it does not tokenize); the engine caches
blocks of tokens and says so in events: a block stored (its hash, its parent's, its tokens) or
removed, or the whole cache cleared (vLLM's KV cache events; the mock emits the same). This
module joins the two. Stored blocks are indexed by (parent, tokens), the way the engine chains
them, so a request's prompt tokens walk to the engine blocks that hold it without knowing how the
engine hashes. A fingerprint k covers the first k * BLOCK_CHARS characters of a prompt of
`prompt_chars`; the share of the prompt's tokens that stands for is held once every block before
it is stored, and it is no longer held when the last of those blocks is removed. Each change goes
to every front's link (`listen`), which sends it with its next `out` or heartbeat.

A prompt linked before its blocks' events arrived (the engine publishes them beside its outputs,
not in order with them) waits to be linked again after the next events; past `max_pending` such
prompts the oldest is given up and its fingerprints said dropped, so a front never keeps a guess
the engine did not confirm. A block removed from the middle of a chain while its descendants stay
is rare (engines evict the leaves of least recently used prompts first); its descendants'
fingerprints are then still said held until their own blocks go.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from common.prefix import BLOCK_CHARS

MAX_FINGERPRINTS = 1 << 20  # held fingerprints remembered (some 30 MB of dicts at most)
MAX_PENDING = 256  # prompts waiting for their blocks' events


@dataclass
class Changes:
    """What one front has not been told yet: fingerprints newly held, and newly not held."""

    held: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)

    def take(self) -> tuple[list[int], list[int]]:
        held, dropped = list(self.held), list(self.dropped)
        self.held.clear()
        self.dropped.clear()
        return held, dropped


@dataclass
class Prompt:
    """A request's prompt as linking needs it; `left` are its fingerprints not linked yet."""

    fingerprints: Sequence[int]
    chars: int
    tokens: Sequence[Hashable]
    left: dict[int, int] = field(default_factory=dict)  # fingerprint -> engine blocks it needs


class Residency:
    """The engine's stored blocks, indexed by (parent, tokens), and the fingerprints they hold."""

    def __init__(self, max_fingerprints: int = MAX_FINGERPRINTS,
                 max_pending: int = MAX_PENDING) -> None:
        self.max_fingerprints = max_fingerprints
        self.max_pending = max_pending
        self.block_size = 0  # tokens per engine block, from the first event
        self._chain: dict[int, Hashable] = {}  # hash((parent, tokens)) -> the block's hash
        self._key: dict[Hashable, int] = {}  # a block's hash -> its key in _chain
        self._ends: dict[Hashable, set[int]] = {}  # a block -> the fingerprints that end in it
        self._block_of: dict[int, Hashable] = {}  # a held fingerprint -> the block it ends in
        self._pending: collections.OrderedDict[str, Prompt] = collections.OrderedDict()
        self._listeners: list[Changes] = []

    # --- who is told -------------------------------------------------------------------------

    def listen(self) -> Changes:
        """A new front link: it is told everything held now, then every change."""
        changes = Changes(held=set(self._block_of))
        self._listeners.append(changes)
        return changes

    def resync(self, changes: Changes) -> None:
        """The front forgot this worker (it restarted): tell it everything held again."""
        changes.held |= set(self._block_of)

    def unlisten(self, changes: Changes) -> None:
        self._listeners.remove(changes)

    def held(self) -> int:
        return len(self._block_of)

    def _tell(self, fingerprint: int, held: bool) -> None:
        for changes in self._listeners:
            (changes.dropped if held else changes.held).discard(fingerprint)
            (changes.held if held else changes.dropped).add(fingerprint)

    # --- the engine's events -----------------------------------------------------------------

    def stored(self, hashes: Sequence[Hashable], parent: Hashable | None,
               tokens: Sequence[Hashable], block_size: int) -> None:
        """Blocks the engine cached, in chain order: the first's parent is `parent`."""
        self.block_size = block_size
        for index, block in enumerate(hashes):
            key = hash((parent, tuple(tokens[index * block_size:(index + 1) * block_size])))
            self._chain[key] = block
            self._key[block] = key
            parent = block

    def removed(self, hashes: Sequence[Hashable]) -> None:
        for block in hashes:
            key = self._key.pop(block, None)
            if key is not None and self._chain.get(key) == block:
                del self._chain[key]
            for fingerprint in self._ends.pop(block, ()):
                del self._block_of[fingerprint]
                self._tell(fingerprint, held=False)

    def cleared(self) -> None:
        for fingerprint in self._block_of:
            self._tell(fingerprint, held=False)
        self._chain.clear()
        self._key.clear()
        self._ends.clear()
        self._block_of.clear()

    # --- requests ----------------------------------------------------------------------------

    def link(self, request_id: str, fingerprints: Sequence[int], prompt_chars: int,
             tokens: Sequence[Hashable]) -> None:
        """A request's prompt, once the engine has prefilled it: its fingerprints are held as far
        as its blocks are stored, now or once their events arrive (`settle`)."""
        if not fingerprints or prompt_chars <= 0:
            return
        prompt = Prompt(fingerprints, prompt_chars, tokens)
        for k, fingerprint in enumerate(fingerprints, 1):
            prompt.left[fingerprint] = len(tokens) * min(k * BLOCK_CHARS, prompt_chars) // prompt_chars
        if self._link(prompt):
            return
        self._pending[request_id] = prompt
        while len(self._pending) > self.max_pending:
            self._give_up(self._pending.popitem(last=False)[1])

    def settle(self) -> None:
        """Link again the prompts that waited for blocks (after a batch of events)."""
        for request_id, prompt in list(self._pending.items()):
            if self._link(prompt):
                del self._pending[request_id]

    def _link(self, prompt: Prompt) -> bool:
        """Link what the stored blocks allow; True once nothing of the prompt is left."""
        if not self.block_size:
            return False
        size, chain, parent = self.block_size, [], None
        for start in range(0, len(prompt.tokens) - size + 1, size):
            block = self._chain.get(hash((parent, tuple(prompt.tokens[start:start + size]))))
            if block is None:
                break
            chain.append(block)
            parent = block
        for fingerprint, tokens in list(prompt.left.items()):
            blocks = tokens // size
            if blocks == 0:  # under one block: no engine caches that
                del prompt.left[fingerprint]
                if fingerprint not in self._block_of:  # (a longer prompt may hold it)
                    self._tell(fingerprint, held=False)
            elif blocks <= len(chain):
                del prompt.left[fingerprint]
                self._hold(fingerprint, chain[blocks - 1])
        return not prompt.left

    def _hold(self, fingerprint: int, block: Hashable) -> None:
        old = self._block_of.pop(fingerprint, None)
        if old is not None:
            self._ends[old].discard(fingerprint)
        self._block_of[fingerprint] = block
        self._ends.setdefault(block, set()).add(fingerprint)
        if old is None:
            self._tell(fingerprint, held=True)
        while len(self._block_of) > self.max_fingerprints:  # the oldest held, forgotten
            oldest = next(iter(self._block_of))
            self._ends[self._block_of.pop(oldest)].discard(oldest)
            self._tell(oldest, held=False)

    def _give_up(self, prompt: Prompt) -> None:
        for fingerprint in prompt.left:
            if fingerprint not in self._block_of:
                self._tell(fingerprint, held=False)
