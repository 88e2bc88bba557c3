"""The mock engine's cost model and output, exactly, in virtual time."""

import pytest
import trio

from common.config import WorkerSettings, load
from worker.__main__ import WholeChoices
from worker.engines.mock import MockEngine, tokenize

TTFT, TOKEN, GROWTH = 0.05, 0.01, 0.5


def engine(**env) -> MockEngine:
    return MockEngine(load(WorkerSettings, {"MOCK_TTFT_S": str(TTFT), "MOCK_TOKEN_S": str(TOKEN),
                                            "MOCK_BATCH_GROWTH": str(GROWTH), **env}))


def request(i: int, prompt: str = "hi", **params) -> dict:
    return {"id": f"r{i}", "kind": "completion", "prompt": prompt, "batch_id": "b7",
            "params": {"n": 1, **params}}


async def run(mock: MockEngine, requests: list[dict]) -> dict[str, list[tuple[float, dict]]]:
    seen: dict[str, list[tuple[float, dict]]] = {r["id"]: [] for r in requests}
    start = trio.current_time()

    def emit(item):
        seen[item["id"]].append((round(trio.current_time() - start, 9), item))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mock.run)
        async with trio.open_nursery() as inner:
            for r in requests:
                inner.start_soon(mock.generate, r, emit)
        nursery.cancel_scope.cancel()
    return seen


async def test_one_request_streams_token_by_token_at_the_modelled_pace(autojump_clock):
    seen = (await run(engine(), [request(1)]))["r1"]
    text = "[Batched mock response b7] Mock response to: hi"
    assert "".join(item["text"] for _, item in seen) == text
    assert [t for t, _ in seen] == [round(TTFT + TOKEN * (k + 1), 9) for k in range(len(tokenize(text)))]
    assert seen[-1][1]["finish"] == "stop" and sum(i["tokens"] for _, i in seen) == len(tokenize(text))
    assert seen[0][1]["prompt_tokens"] == 1


async def test_a_step_costs_more_with_more_sequences(autojump_clock):
    seen = await run(engine(), [request(1), request(2)])
    times = [t for t, _ in seen["r1"]]
    assert times[0] == round(TTFT + TOKEN * (1 + GROWTH), 9)  # both admitted in one step
    assert round(times[1] - times[0], 9) == round(TOKEN * (1 + GROWTH), 9)


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
        with trio.move_on_after(TTFT + 2.5 * TOKEN):
            await mock.generate(request(1, prompt="word " * 100), emitted.append)
        await trio.sleep(1)
        assert len(emitted) == 2 and mock.active == 0
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
