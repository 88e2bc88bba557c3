"""The benchmark's own HTTP client against a real front: its figures are counted, not assumed."""

from harness.load import run_load

URL_PATH = "/v1/completions"


def body_for(i: int) -> dict:
    return {"model": "cohort-mock", "prompt": f"{i} hello there", "max_tokens": 5}


async def test_load_counts_plain_and_streamed_answers(shared):
    headers = {"Authorization": f"Bearer {shared.api_key}"}
    plain = await run_load(shared.url + URL_PATH, body_for, total=12, concurrency=4,
                           headers=headers, timeout_s=60)
    streamed = await run_load(shared.url + URL_PATH, body_for, total=12, concurrency=4,
                              headers=headers, stream=True, timeout_s=60)
    for result in (plain, streamed):
        assert (result.requests, result.errors) == (12, 0)
        assert result.tokens == 12 * 5  # every reply is cut at max_tokens
        assert len(result.latencies_s) == 12
    # one first token per stream; at most 4 gaps after it (ready tokens may share an event)
    assert len(streamed.ttfts_s) == 12 and len(streamed.itls_s) <= 12 * 4
    assert max(streamed.ttfts_s) <= max(streamed.latencies_s)


async def test_load_counts_refused_requests_as_errors(shared):
    result = await run_load(shared.url + URL_PATH, body_for, total=6, concurrency=2,
                            headers={"Authorization": "Bearer wrong"}, timeout_s=60)
    assert (result.requests, result.errors, result.tokens) == (6, 6, 0)
