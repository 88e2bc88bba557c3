"""The mock engine's cost model and output, exactly, in virtual time."""

import json

import msgspec
import pytest
import trio

from common import protocol
from common.prefix import BLOCK_CHARS, text_fingerprints
from common.config import WorkerSettings, load
from worker.engines.mock import MockEngine
from worker.engines.mock_answers import tokenize

PREFILL, TOKEN, GROWTH = 0.001, 0.01, 0.5


def engine(**env) -> MockEngine:
    return MockEngine(load(WorkerSettings, {"MOCK_TTFT_S": "0", "MOCK_PREFILL_TOKEN_S": str(PREFILL),
                                            "MOCK_TOKEN_S": str(TOKEN),
                                            "MOCK_BATCH_GROWTH": str(GROWTH), **env}))


def request(i: int, prompt: str = "hi", stream: bool = True, **body) -> protocol.RequestItem:
    return protocol.RequestItem(f"r{i}", "completions", {"model": "m", "prompt": prompt, **body},
                                stream=stream, batch_id="b7")


def chat(i: int, content: str = "hi", stream: bool = False, **body) -> protocol.RequestItem:
    return protocol.RequestItem(f"r{i}", "chat", {
        "model": "m", "messages": [{"role": "user", "content": content}], **body},
        stream=stream, batch_id="b7")


async def run(mock: MockEngine, requests: list[dict], *, gap_s: float = 0.0
              ) -> dict[str, list[tuple[float, protocol.OutItem]]]:
    """Run requests (each `gap_s` after the last) and record when each delta came out."""
    seen: dict[str, list[tuple[float, protocol.OutItem]]] = {r.id: [] for r in requests}
    start = trio.current_time()

    def emit(item):
        seen[item.id].append((round(trio.current_time() - start, 9), item))

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


def chunks(seen, request_id: str) -> list[tuple[float, protocol.OutItem]]:
    """Each streamed choice delta, with the time its event came out."""
    found = []
    for t, item in seen[request_id]:
        for event in item.data.split(b"\n\n"):
            if event.startswith(b"data: "):
                found.extend((t, choice) for choice in json.loads(event[6:])["choices"])
    return found


def times(seen, request_id: str) -> list[float]:
    return [t for t, _ in chunks(seen, request_id)]


def text(seen, request_id: str) -> str:
    return "".join(choice["text"] for _, choice in chunks(seen, request_id))


def finish(seen, request_id: str) -> str:
    return chunks(seen, request_id)[-1][1]["finish_reason"]


async def test_one_request_prefills_then_streams_token_by_token(autojump_clock):
    seen = await run(engine(), [request(1)])
    reply = "[Batched mock response b7] Mock response to: hi"
    assert text(seen, "r1") == reply
    # the prefill pass (one prompt token) samples the first token, then a decode step per token
    assert times(seen, "r1") == [round(PREFILL + TOKEN * (k + 1), 9)
                                 for k in range(len(tokenize(reply)))]
    assert finish(seen, "r1") == "stop"
    last = seen["r1"][-1][1]
    assert last.done and last.usage == {"prompt_tokens": 1,
                                              "completion_tokens": len(tokenize(reply))}


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


async def test_waiting_requests_start_by_priority_then_arrival_as_in_vllm(autojump_clock):
    mock = engine(COHORT_MAX_NUM_SEQS="1")
    order = [("r1", 0), ("r2", 5), ("r3", 5), ("r4", 1)]  # r1 runs; the rest wait behind it
    requests = [msgspec.structs.replace(request(int(rid[1]), max_tokens=2, stream=False),
                                        priority=p) for rid, p in order]
    seen = await run(mock, requests, gap_s=0.001)  # in this order, all before r1 ends
    done_at = {rid: seen[rid][-1][0] for rid, _ in order}
    assert sorted(done_at, key=done_at.get) == ["r1", "r4", "r2", "r3"]


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


async def test_what_the_cache_holds_is_reported_unless_kv_events_are_off(autojump_clock):
    prompt = "shared " * 300  # whole 256-character blocks to fingerprint
    fingerprinted = msgspec.structs.replace(request(1, prompt=prompt, max_tokens=1),
                                            prefix=text_fingerprints(prompt, BLOCK_CHARS),
                                            prompt_chars=len(prompt))
    reporting = engine()
    await run(reporting, [fingerprinted])
    assert reporting.residency is not None and reporting.stats().prefixes_held > 0
    quiet = engine(COHORT_KV_EVENTS="0")  # the fronts estimate, as for vLLM without events
    await run(quiet, [fingerprinted])
    assert quiet.residency is None and quiet.stats().prefixes_held == 0
    assert quiet.stats().prefix_hit_rate == reporting.stats().prefix_hit_rate  # it still caches


async def test_reply_length_follows_max_tokens_when_asked(autojump_clock):
    seen = await run(engine(MOCK_REPLY_LENGTH="max_tokens"), [request(1, max_tokens=40)])
    assert len(chunks(seen, "r1")) == 40 and finish(seen, "r1") == "length"
    seen = await run(engine(), [request(1, max_tokens=40, ignore_eos=True), request(2, max_tokens=40)])
    assert len(chunks(seen, "r1")) == 40 and len(chunks(seen, "r2")) == 8
    assert finish(seen, "r2") == "stop"


async def test_the_kv_budget_makes_requests_wait_and_refuses_what_never_fits(autojump_clock):
    from worker.engines import InvalidRequest
    mock = engine(MOCK_KV_TOKENS="30")
    seen = await run(mock, [request(1, max_tokens=20), request(2, max_tokens=20)])
    first, second = sorted((times(seen, "r1"), times(seen, "r2")))
    assert second[0] > first[-1]  # 21 + 21 tokens do not fit 30: one waits for the other
    with pytest.raises(InvalidRequest, match="MOCK_KV_TOKENS"):
        await mock.generate(request(3, max_tokens=40), lambda item: None)


async def test_max_tokens_stop_and_n(autojump_clock):
    seen = await run(engine(), [request(1, max_tokens=3), request(2, stop=["Mock"]),
                                request(3, n=2), request(4, stop="Mock", include_stop_str_in_output=True)])
    assert finish(seen, "r1") == "length" and len(chunks(seen, "r1")) == 3
    assert text(seen, "r2") == "[Batched mock response b7] "
    assert chunks(seen, "r2")[-1][1]["finish_reason"] == "stop"
    assert text(seen, "r4") == "[Batched mock response b7] Mock"
    assert {choice["index"] for _, choice in chunks(seen, "r3")} == {0, 1}


async def test_cancelling_a_request_stops_its_sequences(autojump_clock):
    mock = engine()
    emitted = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mock.run)
        with trio.move_on_after(PREFILL + 2.5 * TOKEN):
            await mock.generate(request(1), emitted.append)
        await trio.sleep(1)
        assert len(emitted) == 2 and not emitted[-1].done
        assert mock.unfinished() == 0 and mock.stats().running == 0
        nursery.cancel_scope.cancel()


async def test_injected_errors():
    from worker.engines import EngineError
    with pytest.raises(EngineError, match="MOCK_ERROR_RATE"):
        await engine(MOCK_ERROR_RATE="1").generate(request(1), lambda item: None)


