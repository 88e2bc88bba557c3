"""The worker's join of engine block events and the fronts' fingerprints, without an engine."""

from common.prefix import BLOCK_CHARS
from worker.residency import Residency

SIZE = 4  # tokens per engine block in these tests


def blocks_of(tokens: list[int], start: int = 0) -> list[str]:
    """Block hashes as an engine would name them (any hashable does: the join never computes one)."""
    return [f"block{i}" for i in range(start, len(tokens) // SIZE)]


def store(residency: Residency, tokens: list[int]) -> list[str]:
    hashes = blocks_of(tokens)
    residency.stored(hashes, None, tokens[:len(hashes) * SIZE], SIZE)
    return hashes


def test_a_prompt_is_held_as_far_as_its_blocks_are_and_every_front_is_told():
    residency = Residency()
    front_a, tokens = residency.listen(), list(range(16))  # 4 blocks
    hashes = store(residency, tokens)
    # 3 fingerprints over 3 blocks of characters: the first stands for a third of the 16 tokens
    # (5: one whole block), the second for 10 (2 blocks), the third for all four
    residency.link("r1", [11, 12, 13], 3 * BLOCK_CHARS, tokens)
    assert front_a.take() == ([11, 12, 13], [])
    front_b = residency.listen()  # a front that connects later hears what is held
    assert sorted(front_b.take()[0]) == [11, 12, 13]
    residency.removed([hashes[3]])  # the last block went: the fingerprint ending in it
    assert front_a.take() == ([], [13]) and front_b.take() == ([], [13])
    assert residency.held() == 2
    residency.cleared()
    assert sorted(front_a.take()[1]) == [11, 12] and residency.held() == 0


def test_a_prompt_linked_before_its_events_waits_for_them_and_is_given_up_past_a_bound():
    residency = Residency(max_pending=1)
    front = residency.listen()
    store(residency, list(range(100, 104)))  # another prompt's block: the block size is known
    tokens = list(range(8))
    residency.link("r1", [21], BLOCK_CHARS, tokens)  # needs both blocks, not stored yet
    assert front.take() == ([], [])
    residency.stored(["x0"], None, tokens[:4], SIZE)
    residency.settle()
    assert front.take() == ([], [])  # half its prefix: not yet
    residency.stored(["x1"], "x0", tokens[4:], SIZE)  # chained to its parent, as vLLM sends it
    residency.settle()
    assert front.take() == ([21], [])
    residency.link("r2", [31], BLOCK_CHARS, list(range(50, 58)))
    residency.link("r3", [41], BLOCK_CHARS, list(range(60, 68)))  # r2 is given up
    assert front.take() == ([], [31])


def test_a_prefix_shorter_than_a_block_is_never_held_and_tokens_must_match_the_chain():
    residency = Residency()
    front = residency.listen()
    tokens = list(range(8))
    store(residency, tokens)
    residency.link("short", [51], 10 * BLOCK_CHARS, tokens)  # a tenth of 8 tokens: no block
    assert front.take() == ([], [51])
    other = [0, 1, 2, 3, 9, 9, 9, 9]  # same first block, another second one
    residency.link("other", [61, 62], 2 * BLOCK_CHARS, other)
    held, dropped = front.take()
    assert held == [61] and dropped == []  # 62 waits: its second block is not the stored one


def test_a_front_that_forgot_the_worker_hears_everything_again_and_a_gone_link_nothing():
    residency = Residency()
    front = residency.listen()
    tokens = list(range(8))
    store(residency, tokens)
    residency.link("r", [71], BLOCK_CHARS, tokens)
    front.take()
    residency.resync(front)
    assert front.take() == ([71], [])
    residency.unlisten(front)
    residency.removed(["block0", "block1"])
    assert front.take() == ([], [])


def test_what_is_held_is_bounded_oldest_first():
    residency = Residency(max_fingerprints=2)
    front = residency.listen()
    for n in range(3):
        tokens = [n * 10 + i for i in range(4)]
        residency.stored([f"b{n}"], None, tokens, SIZE)
        residency.link(f"r{n}", [n], BLOCK_CHARS, tokens)
    held, dropped = front.take()
    assert sorted(held) == [1, 2] and dropped == [0] and residency.held() == 2
