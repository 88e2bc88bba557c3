"""Prompt prefixes as the front sees them: chained hashes of fixed-size blocks of text.

The front does not tokenize, so it fingerprints characters: block k's hash stands for the whole
prompt up to the end of block k, as vLLM's block hashes do for tokens. Two requests that share a
system prompt or a conversation share their leading hashes; a worker that was sent those blocks
probably still holds them in its engine's prefix cache.
"""

from __future__ import annotations

import collections
from typing import Any

BLOCK_CHARS = 256  # below this a shared prefix saves too little prefill to steer by
MAX_BLOCKS = 512  # 128k characters: enough to tell prompts apart, bounded cost per request
MEMORY_BLOCKS = 65_536  # per worker, about 16M characters of recent prefixes


def prompt_text(kind: str, prompt: str, messages: list[dict[str, Any]]) -> str:
    """The text a prefix is read from: the prompt, or the messages with their roles in order."""
    if kind != "chat":
        return prompt
    return "".join(f"\x1e{m['role']}\x1f{m['content']}" for m in messages)


def prefix_blocks(text: str) -> tuple[int, ...]:
    """Chained hashes of the text's full blocks (none for a text shorter than one block)."""
    hashes, running = [], 0
    for start in range(0, min(len(text), BLOCK_CHARS * MAX_BLOCKS) - BLOCK_CHARS + 1, BLOCK_CHARS):
        running = hash((running, text[start:start + BLOCK_CHARS]))
        hashes.append(running)
    return tuple(hashes)


class PrefixMemory:
    """The prefixes the front sent to one worker, most recent last, bounded."""

    def __init__(self, max_blocks: int = MEMORY_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def match(self, blocks: tuple[int, ...]) -> int:
        """How many leading blocks of a prompt this worker was sent before."""
        found = 0
        for block in blocks:
            if block not in self._blocks:
                break
            found += 1
        return found

    def remember(self, blocks: tuple[int, ...]) -> None:
        for block in blocks:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
