"""The mock engine's cost model and output, exactly, in virtual time."""

import pytest
import trio

from common.config import WorkerSettings, load
from worker.__main__ import WholeChoices
from worker.engines.mock import MockEngine, tokenize

PREFILL, TOKEN, GROWTH = 0.001, 0.01, 0.5


def engine(**env) -> MockEngine:
    return MockEngine(load(WorkerSettings, {"MOCK_TTFT_S": "0", "MOCK_PREFILL_TOKEN_S": str(PREFILL),
                                            "MOCK_TOKEN_S": str(TOKEN),
                                            "MOCK_BATCH_GROWTH": str(GROWTH), **env}))


def request(i: int, prompt: str = "hi", **params) -> dict:
    return {"id": f"r{i}", "kind": "completion", "prompt": prompt, "batch_id": "b7",
            "params": {"n": 1, **params}}


async def run(mock: MockEngine, requests: list[dict], *, gap_s: float = 0.0
              ) -> dict[str, list[tuple[float, dict]]]:
    """Run requests (each `gap_s` after the last) and record when each delta came out."""
    seen: dict[str, list[tuple[float, dict]]] = {r["id"]: [] for r in requests}
    start = trio.current_time()

    def emit(item):
        seen[item["id"]].append((round(trio.current_time() - start, 9), item))

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as inner:
            for i, r in enumerate(requests):
                inner.start_soon(mock.generate, r, emit)
                if gap_s or i == len(requests) - 1:
                    await trio.sleep(0)  # queued in the engine before its next step begins
                    if not nursery.child_tasks:
                        nursery.start_soon(mock.run)
                    await trio.sleep(gap_s)
        nursery.cancel_scope.cancel()
    return seen


def times(seen, request_id: str) -> list[float]:
    return [t for t, _ in seen[request_id]]


async def test_one_request_prefills_then_streams_token_by_token(autojump_clock):
    seen = (await run(engine(), [request(1)]))["r1"]
    text = "[Batched mock response b7] Mock response to: hi"
    assert "".join(item["text"] for _, item in seen) == text
    # the prefill pass (one prompt token) samples the first token, then a decode step per token
    assert [t for t, _ in seen] == [round(PREFILL + TOKEN * (k + 1), 9)
                                    for k in range(len(tokenize(text)))]
    assert seen[-1][1]["finish"] == "stop" and sum(i["tokens"] for _, i in seen) == len(tokenize(text))
    assert seen[0][1]["prompt_tokens"] == 1


async def test_a_step_costs_more_with_more_sequences(autojump_clock):
    seen = await run(engine(), [request(1), request(2)])
    both = round(2 * PREFILL + TOKEN * (1 + GROWTH), 9)  # one pass prefills both
    assert times(seen, "r1")[0] == times(seen, "r2")[0] == both
    assert round(times(seen, "r1")[1] - times(seen, "r1")[0], 9) == round(TOKEN * (1 + GROWTH), 9)


async def test_chunked_prefill_never_stalls_running_sequences_for_a_whole_long_prompt(autojump_clock):
    mock = engine(COHORT_MAX_NUM_BATCHED_TOKENS="8", MOCK_BATCH_GROWTH="0", MOCK_REPLY_LENGTH="max_tokens")
    seen = await run(mock, [request(1, max_tokens=20), request(2, prompt="w " * 40, max_tokens=2)],
                     gap_s=PREFILL + 2 * TOKEN + 0.001)
    gaps = [round(b - a, 9) for a, b in zip(times(seen, "r1"), times(seen, "r1")[1:])]
    # while r2's 40 prompt tokens are prefilled, r1 decodes on: each step takes 1 + 7 tokens
    # (5 in the last), so r1 is never held up by more than 7 tokens of someone else's prefill
    assert [gap for gap in gaps if gap != TOKEN] == [round(TOKEN + 7 * PREFILL, 9)] * 5 + [
        round(TOKEN + 5 * PREFILL, 9)]


async def test_requests_wait_in_the_engine_beyond_max_num_seqs(autojump_clock):
    mock = engine(COHORT_MAX_NUM_SEQS="1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mock.run)
        nursery.start_soon(mock.generate, request(1, max_tokens=5), lambda item: None)
        nursery.start_soon(mock.generate, request(2, max_tokens=5), lambda item: None)
        await trio.sleep(PREFILL + TOKEN)
        stats = mock.stats()
        assert (stats.running, stats.waiting, stats.max_num_seqs) == (1, 1, 1)
        await trio.sleep(1)
        assert mock.stats().running == mock.stats().waiting == 0
        nursery.cancel_scope.cancel()


async def test_the_prefix_cache_skips_the_prefill_of_a_shared_prompt(autojump_clock):
    prompt = "shared " * 64
    seen = await run(engine(), [request(1, prompt=prompt, max_tokens=1),
                                request(2, prompt=prompt + "tail", max_tokens=1)], gap_s=1)
    assert times(seen, "r1") == [round(TOKEN + 64 * PREFILL, 9)]
    assert times(seen, "r2") == [round(1 + TOKEN + 1 * PREFILL, 9)]  # 64 cached, 1 new token
    mock = engine(MOCK_PREFIX_CACHE_TOKENS="0")
    seen = await run(mock, [request(1, prompt=prompt, max_tokens=1),
                            request(2, prompt=prompt, max_tokens=1)], gap_s=1)
    assert times(seen, "r2") == [round(1 + TOKEN + 64 * PREFILL, 9)]
    assert mock.stats().prefix_hit_rate == 0


async def test_reply_length_follows_max_tokens_when_asked(autojump_clock):
    seen = await run(engine(MOCK_REPLY_LENGTH="max_tokens"), [request(1, max_tokens=40)])
    assert len(seen["r1"]) == 40 and seen["r1"][-1][1]["finish"] == "length"
    seen = await run(engine(), [request(1, max_tokens=40, ignore_eos=True), request(2, max_tokens=40)])
    assert len(seen["r1"]) == 40 and len(seen["r2"]) == 8 and seen["r2"][-1][1]["finish"] == "stop"


async def test_the_kv_budget_makes_requests_wait_and_refuses_what_never_fits(autojump_clock):
    from worker.engines import InvalidRequest
    mock = engine(MOCK_KV_TOKENS="30")
    seen = await run(mock, [request(1, max_tokens=20), request(2, max_tokens=20)])
    first, second = sorted(seen.values(), key=lambda items: items[0][0])
    assert second[0][0] > first[-1][0]  # 21 + 21 tokens do not fit 30: one waits for the other
    with pytest.raises(InvalidRequest, match="MOCK_KV_TOKENS"):
        await mock.generate(request(3, max_tokens=40), lambda item: None)


async def test_max_tokens_stop_and_n(autojump_clock):
    seen = await run(engine(), [request(1, max_tokens=3), request(2, stop=["Mock"]),
                                request(3, n=2)])
    assert [i["finish"] for _, i in seen["r1"]][-1] == "length" and len(seen["r1"]) == 3
    assert "".join(i["text"] for _, i in seen["r2"]) == "[Batched mock response b7] "
    assert {i["index"] for _, i in seen["r3"]} == {0, 1}


async def test_cancelling_a_request_stops_its_sequences(autojump_clock):
    mock = engine()
    emitted = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mock.run)
        with trio.move_on_after(PREFILL + 2.5 * TOKEN):
            await mock.generate(request(1), emitted.append)
        await trio.sleep(1)
        assert len(emitted) == 2 and mock.unfinished() == 0 and mock.stats().running == 0
        nursery.cancel_scope.cancel()


async def test_injected_errors():
    from worker.engines import EngineError
    with pytest.raises(EngineError, match="MOCK_ERROR_RATE"):
        await engine(MOCK_ERROR_RATE="1").generate(request(1), lambda item: None)


def test_whole_choices_sends_each_choice_once_at_its_end():
    sent = []
    buffer = WholeChoices(sent.append)
    for index, text, finish in [(0, "a", None), (1, "x", None), (0, "b", None), (1, "y", "stop"),
                                (0, "c", "length")]:
        buffer({"id": "r", "index": index, "text": text, "tokens": 1, "finish": finish,
                "prompt_tokens": 4})
    assert [(s["index"], s["text"], s["tokens"], s["finish"]) for s in sent] == [
        (1, "xy", 2, "stop"), (0, "abc", 3, "length")]
